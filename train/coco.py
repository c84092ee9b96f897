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
"""

import argparse
import contextlib
import io
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from fss.constants import IGNORE_INDEX
from fss.errors import FssError
from fss.io import write_json, write_label_png

PROG = "python -m fss.train.coco"


def class_folder_name(category_name: str) -> str:
    return category_name.strip().replace(" ", "_").replace("/", "_")


def load_coco(annotations: Path) -> COCO:
    if not annotations.is_file():
        raise FssError("COCO annotations not found", annotations)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            return COCO(str(annotations))
    except Exception as exc:  # json errors, missing keys: all mean "not a COCO instances file"
        raise FssError(f"not a COCO instances file: {str(exc).splitlines()[0][:200]}", annotations) from None


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
            write_label_png(folder / f"{path.stem}.png", mask)
            sources.setdefault(path.stem, {**source, "classes": []})["classes"].append(name)
    write_json(out / "sources.json", sources)
    return {name: len(items) for name, items in kept.items()}


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
    try:
        counts = convert(
            args.coco,
            args.out,
            args.split,
            args.min_area,
            args.min_images,
            licenses=args.licenses,
            classes=None if args.classes is None else [c.strip() for c in args.classes.split(",")],
        )
    except FssError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for name, n in counts.items():
        print(f"{name}: {n}")
    print(f"{len(counts)} classes, {sum(counts.values())} image+mask pairs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
