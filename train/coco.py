"""Convert a COCO-layout folder to fss's folder layout (one subfolder per class).

Input: ``COCO/annotations/instances_<split>.json`` and the images in ``COCO/<split>/``. For every
image and category, the non-crowd instances are merged into one foreground mask; crowd regions
become 255 (ignored) where no instance covers them. A class folder gets the image (its original
bytes, so the copies in several class folders are recognisably one photo) and a palette PNG mask
(0 background, 1 foreground, 255 ignored) when the class covers at least ``min_area`` of the
picture; classes with fewer than ``min_images`` such images are dropped. Folder names are the COCO
category names with spaces as underscores. ``OUT/sources.json`` records each image's origin and
licence (Flickr url, licence name and url), for attribution.

    python -m fss.train.coco --coco ../shared/data/coco-mini --out runs/coco-mini-folders

:class:`CocoDataset` reads the same folder directly for COCO-20i episodes (no conversion).
"""

import argparse
import contextlib
import io
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from fss.command import run_command
from fss.constants import IGNORE_INDEX
from fss.errors import FssError, summary
from fss.io.images import orient_array, orientation
from fss.io.outputs import write_json, write_label_png
from fss.io.tensors import mask_tensor
from fss.train.data import EpisodeDataset, Item

PROG = "python -m fss.train.coco"
COCO_CLASSES = 80
FOLD_CONVENTIONS = ("consecutive", "interleaved")
DEFAULT_SPLIT = "train2017"


def class_folder_name(category_name: str) -> str:
    return category_name.strip().replace(" ", "_").replace("/", "_")


def load_coco(annotations: Path) -> COCO:
    if not annotations.is_file():
        raise FssError("COCO annotations not found", annotations)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            return COCO(str(annotations))
    except Exception as exc:  # json errors, missing keys: all mean "not a COCO instances file"
        raise FssError(f"not a COCO instances file: {summary(exc)}", annotations) from None


def class_masks(coco, image: dict) -> dict[int, np.ndarray]:
    """Category id -> ``H x W`` uint8 mask of one image: 1 instances, 255 crowd only, 0 elsewhere."""
    fg: dict[int, np.ndarray] = {}
    crowd: dict[int, np.ndarray] = {}
    shape = (image["height"], image["width"])
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"], iscrowd=None)):
        target = crowd if ann.get("iscrowd") else fg
        mask = target.setdefault(ann["category_id"], np.zeros(shape, bool))
        mask |= coco.annToMask(ann).astype(bool)
    masks = {}
    for cat_id in fg.keys() | crowd.keys():
        mask = np.zeros(shape, np.uint8)
        if cat_id in crowd:
            mask[crowd[cat_id]] = IGNORE_INDEX
        if cat_id in fg:
            mask[fg[cat_id]] = 1
        masks[cat_id] = mask
    return masks


def coco20i_fold_indices(fold: int, convention: str = "consecutive") -> list[int]:
    """Class indices (1..80, COCO category order) tested in COCO-20i fold ``fold``.

    ``consecutive``: 20i+1 .. 20i+20 (PANet); ``interleaved``: 4k+i+1 for k = 0..19 (as in FWB/PFENet).
    """
    if convention == "consecutive":
        return list(range(20 * fold + 1, 20 * fold + 21))
    if convention == "interleaved":
        return [4 * k + fold + 1 for k in range(20)]
    raise ValueError(f"fold convention must be one of {FOLD_CONVENTIONS}, got {convention!r}")


class CocoDataset(EpisodeDataset):
    """COCO-20i episodes straight from a COCO folder (``annotations/instances_<split>.json``, ``<split>/``).

    Classes are the 80 categories in COCO category order (sorted ids: class index k = k-th), named as
    in the annotations. A photo is listed for a class when it has a non-crowd instance of it; a class's
    instances are merged into one mask and its crowd regions are ignored (255). Several splits (e.g.
    ``train2017`` and ``val2017``) are pooled.
    """

    orient_exif = False  # annotations refer to the stored pixels

    def __init__(self, root, size: int, splits=(DEFAULT_SPLIT,), cache_mb: float = 2048, normalisation=None):
        super().__init__(root, size, cache_mb, normalisation)
        self.splits = list(splits)
        self.cocos: dict[str, COCO] = {}
        self.images: dict[str, tuple[str, dict]] = {}  # photo -> (split, COCO image record)
        category_ids = None
        for split in self.splits:
            coco = load_coco(self.root / "annotations" / f"instances_{split}.json")
            ids = sorted(coco.getCatIds())
            if len(ids) != COCO_CLASSES or (category_ids is not None and ids != category_ids):
                raise FssError(
                    f"COCO-20i needs the {COCO_CLASSES} COCO categories; instances_{split}.json has "
                    f"{len(ids)}{' (other ids than the first split)' if len(ids) == COCO_CLASSES else ''}",
                    self.root / "annotations" / f"instances_{split}.json",
                )
            category_ids = ids
            self.cocos[split] = coco
        self.category_ids = category_ids
        self.names = {cat["id"]: cat["name"] for cat in coco.loadCats(category_ids)}
        self.items = {self.names[cat]: [] for cat in category_ids}
        for split, coco in self.cocos.items():
            for image in coco.loadImgs(sorted(coco.getImgIds())):
                photo = f"{split}/{image['id']}"
                self.images[photo] = (split, image)
                anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"], iscrowd=False))
                for cat in sorted({ann["category_id"] for ann in anns}):
                    self.items[self.names[cat]].append(Item(photo, self.root / split / image["file_name"]))

    def class_names(self, indices: list[int]) -> list[str]:
        """Class indices (1..80) -> names."""
        return [self.names[self.category_ids[k - 1]] for k in indices]

    def photo_masks(self, photo: str) -> dict[str, torch.Tensor]:
        split, image = self.images[photo]

        def load():
            masks = class_masks(self.cocos[split], image)
            return {self.names[cat]: mask_tensor(mask, self.size) for cat, mask in masks.items()}

        return self.cached(("masks", photo), load)

    def instances(self, item: Item, cls: str) -> list[np.ndarray]:
        split, image = self.images[item.photo]
        coco = self.cocos[split]
        cat = next(c for c, name in self.names.items() if name == cls)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"], catIds=[cat], iscrowd=False))
        return [mask_tensor(coco.annToMask(ann), self.size).numpy() == 1 for ann in anns]


def convert(
    coco_root,
    out,
    splits: list[str] | None = None,
    min_area: float = 0.01,
    min_images: int = 5,
    licenses: set[int] | None = None,
    classes: list[str] | None = None,
) -> dict[str, int]:
    """Write the folder dataset; returns class name -> number of images.

    ``splits`` default to every ``annotations/instances_<split>.json`` that has its image folder;
    ``licenses`` keeps only images with those licence ids; ``classes`` keeps only those folder names.
    """
    coco_root, out = Path(coco_root), Path(out)
    if not coco_root.is_dir():
        raise FssError("COCO folder not found", coco_root)
    if splits is None:
        found = [
            p.stem.removeprefix("instances_") for p in (coco_root / "annotations").glob("instances_*.json")
        ]
        splits = sorted(split for split in found if (coco_root / split).is_dir())
        if not splits:
            raise FssError("no annotations/instances_<split>.json with a <split>/ image folder", coco_root)
    if out.exists() and any(out.iterdir()):
        raise FssError("output folder is not empty", out)

    chosen = defaultdict(list)  # class folder -> (image path, mask, source record)
    for split in splits:
        coco = load_coco(coco_root / "annotations" / f"instances_{split}.json")
        licence_table = {lic["id"]: lic for lic in coco.dataset.get("licenses", [])}
        names = {cat["id"]: class_folder_name(cat["name"]) for cat in coco.loadCats(coco.getCatIds())}
        for image in coco.loadImgs(sorted(coco.getImgIds())):
            if licenses is not None and image.get("license") not in licenses:
                continue
            path = coco_root / split / image["file_name"]
            for cat_id, mask in class_masks(coco, image).items():
                name = names[cat_id]
                if (classes is not None and name not in classes) or (mask == 1).mean() < min_area:
                    continue
                licence = licence_table.get(image.get("license"), {})
                source = {
                    "split": split,
                    "id": image["id"],
                    "file_name": image["file_name"],
                    "flickr_url": image.get("flickr_url"),
                    "coco_url": image.get("coco_url"),
                    "license": image.get("license"),
                    "license_name": licence.get("name"),
                    "license_url": licence.get("url"),
                }
                chosen[name].append((path, mask, source))

    kept = {name: items for name, items in sorted(chosen.items()) if len(items) >= min_images}
    if not kept:
        raise FssError(
            f"no class has {min_images} images covering at least {min_area:.0%} of the picture", coco_root
        )
    sources = {}
    for name, items in kept.items():
        for path, mask, source in items:
            if not path.is_file():
                raise FssError("image listed in the annotations not found", path)
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / path.name)
            # COCO masks refer to the stored pixels, folder masks to the photo as displayed.
            write_label_png(folder / f"{path.stem}.png", displayed_mask(mask, path))
            sources.setdefault(path.stem, {**source, "classes": []})["classes"].append(name)
    write_json(out / "sources.json", sources)
    return {name: len(items) for name, items in kept.items()}


def displayed_mask(mask: np.ndarray, image_path: Path) -> np.ndarray:
    """A mask of an image's stored pixels turned as the image is displayed (its EXIF orientation)."""
    with Image.open(image_path) as img:
        return orient_array(mask, orientation(img))


def id_set(text: str) -> set[int]:
    try:
        return {int(v) for v in text.split(",") if v.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG, description="Convert a COCO-layout folder to fss's class-folder layout."
    )
    p.add_argument("--coco", type=Path, required=True, help="COCO folder (annotations/ and <split>/ images)")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    p.add_argument(
        "--split", action="append", default=None, help="split to convert, repeatable (default: all found)"
    )
    p.add_argument("--min-area", type=float, default=0.01, help="min class area fraction per image (0.01)")
    p.add_argument("--min-images", type=int, default=5, help="min images per class (default 5)")
    p.add_argument(
        "--licenses",
        type=id_set,
        default=None,
        metavar="ID,ID",
        help="keep only images with these licence ids (e.g. 4,5,7,8)",
    )
    p.add_argument("--classes", default=None, metavar="A,B", help="keep only these classes (folder names)")
    args = p.parse_args(argv)
    return run_command(PROG, lambda: convert_main(args))


def convert_main(args) -> int:
    counts = convert(
        args.coco,
        args.out,
        args.split,
        args.min_area,
        args.min_images,
        licenses=args.licenses,
        classes=None if args.classes is None else [c.strip() for c in args.classes.split(",")],
    )
    for name, n in counts.items():
        print(f"{name}: {n}")
    print(f"{len(counts)} classes, {sum(counts.values())} image+mask pairs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
