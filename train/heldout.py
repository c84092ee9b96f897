"""Held-out episode sets like users' photos, with negative queries, built from ``../shared/data``.

    python -m fss.train.heldout --shared ../shared/data --out runs/heldout

The bundled model (docs/demo-model.md) trained on the COCO ``train2017`` photos, 15 DAVIS videos and
two pet breeds. Every query here is a photo it never trained on; every set has, per class, positive
queries (the class is on the photo) and negative ones (it is not: an evaluation that always assumes
the class is present cannot see a model that paints absent classes). Three sets:

- ``cluttered``: every annotated class of the ``val2017`` photos of coco-mini and tiny-coco (people,
  tables, cups, chairs ... several per photo). A class is on a photo where it covers >= 1 % of it;
  a negative query has no instance of the class at all (crowd and tiny ones included).
- ``unseen``: the held-out classes of the bundled model (``fss.train.demo_data``); negatives are the
  held-out COCO photos without the class (COCO classes), or the other held-out videos / breeds.
- ``objects``: DAVIS and pets with the support and the query from different videos or breeds (a
  support may be a training photo, never a query): car, dog, cat; negatives are the other held-out
  videos / breeds.

Writes ``OUT/<set>/episodes.json``: ``{"classes": [...], "episodes": [{"class", "support": [path],
"query": path, "present": bool}]}``, paths relative to the folder holding the json (photos are links
into the shared folder, masks beside them as ``<stem>.png``; a negative query's mask is that of
another class). ``OUT/cluttered/`` and ``OUT/unseen/`` are also class folders for ``fss-eval``.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from fss.command import run_command
from fss.errors import FssError
from fss.train.coco import class_folder_name, convert, load_coco
from fss.train.demo_data import COCO_SOURCES, link_files
from fss.train.demo_data import build as build_demo_data

PROG = "python -m fss.train.heldout"
HELDOUT_SPLIT = "val2017"  # the bundled model trained on no photo of it
EPISODES_PER_CLASS = 12  # positive episodes per class, and as many negative ones
# objects: class -> (support folders, query folders) of the demo data; queries from held-out ones only
CROSS_VIDEO_CLASSES = {
    "car": (("davis-car-shadow", "davis-drift-chicane", "davis-drift-straight"), ("davis-car-roundabout",)),
    "dog": (("davis-libby", "pets-american_bulldog"), ("davis-dog",)),
    "cat": (("pets-Abyssinian",), ("pets-Bengal",)),
}
CROSS_VIDEO_NEGATIVES = ("davis-blackswan", "davis-horsejump-high", "davis-paragliding-launch")


def coco_categories_present(shared: Path) -> dict[str, set[str]]:
    """Held-out COCO photo (file name) -> class folder names of every annotation on it (both sources)."""
    present = defaultdict(set)
    for source in COCO_SOURCES:
        coco = load_coco(shared / source / "annotations" / f"instances_{HELDOUT_SPLIT}.json")
        names = {cat["id"]: class_folder_name(cat["name"]) for cat in coco.loadCats(coco.getCatIds())}
        for image in coco.loadImgs(sorted(coco.getImgIds())):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"], iscrowd=None))
            present[image["file_name"]] |= {f"coco-{names[ann['category_id']]}" for ann in anns}
    return present


def class_photos(folder: Path, classes) -> dict[str, list[Path]]:
    """Class -> its images (paths relative to ``folder``, the masks beside them as ``<stem>.png``), sorted."""
    return {
        cls: sorted(
            p.relative_to(folder)
            for p in (folder / cls).iterdir()
            if p.suffix.lower() != ".png" and p.with_suffix(".png").exists()
        )
        for cls in classes
    }


def draw_episodes(rng, cls, supports, queries, negatives, per_class) -> list[dict]:
    """``per_class`` positive and as many negative 1-shot episodes of one class, support != query."""
    pairs = [(s, q) for s in supports for q in queries if s.name != q.name or s.parent != q.parent]
    picked = [pairs[i] for i in sorted(rng.choice(len(pairs), min(per_class, len(pairs)), replace=False))]
    episodes = [{"class": cls, "support": [str(s)], "query": str(q), "present": True} for s, q in picked]
    for _ in picked:
        support = supports[rng.integers(len(supports))]
        query = negatives[rng.integers(len(negatives))]
        episodes.append({"class": cls, "support": [str(support)], "query": str(query), "present": False})
    return episodes


def negative_photos(photos: dict[str, list[Path]], folder: Path, contains) -> dict[str, list[Path]]:
    """Class -> one path per photo of ``photos`` that ``contains(path, cls)`` says lacks the class."""
    unique = {}
    for paths in photos.values():
        for path in paths:
            unique.setdefault((folder / path).resolve(), path)
    return {cls: [p for real, p in sorted(unique.items()) if not contains(real, cls)] for cls in photos}


def write_set(folder: Path, classes, supports, queries, negatives, seed: int, per_class: int) -> int:
    rng = np.random.default_rng(seed)
    episodes = []
    for cls in classes:
        if len(negatives[cls]) and len(supports[cls]) and len(queries[cls]):
            episodes += draw_episodes(rng, cls, supports[cls], queries[cls], negatives[cls], per_class)
    kept = sorted({e["class"] for e in episodes})
    (folder / "episodes.json").write_text(json.dumps({"classes": kept, "episodes": episodes}, indent=1))
    return len(episodes)


def build_cluttered(shared: Path, out: Path, present, seed: int, per_class: int) -> int:
    folder = out / "cluttered"
    for source in COCO_SOURCES:
        converted = out / "coco" / f"{source}-{HELDOUT_SPLIT}"
        convert(shared / source, converted, [HELDOUT_SPLIT], min_images=1)
        for class_dir in sorted(p for p in converted.iterdir() if p.is_dir()):
            link_files(class_dir, folder / f"coco-{class_dir.name}")
    # a 1-shot positive episode needs two photos of the class
    for class_dir in list(folder.iterdir()):
        if len(list(class_dir.glob("*.png"))) < 2:
            for path in class_dir.iterdir():
                path.unlink()
            class_dir.rmdir()
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    photos = class_photos(folder, classes)
    negatives = negative_photos(photos, folder, lambda real, cls: cls in present[real.name])
    return write_set(folder, classes, photos, photos, negatives, seed, per_class)


def build_unseen(out: Path, present, seed: int, per_class: int) -> int:
    folder = out / "unseen"
    demo_root = out / "demo-data" / "all"
    classes = (out / "demo-data" / "heldout.txt").read_text().strip().split(",")
    for cls in classes:
        link_files(demo_root / cls, folder / cls)
    photos = class_photos(folder, classes)
    coco = {c: p for c, p in photos.items() if c.startswith("coco-")}
    other = {c: p for c, p in photos.items() if not c.startswith("coco-")}
    negatives = negative_photos(coco, folder, lambda real, cls: cls in present[real.name])
    for cls in other:  # another held-out video or breed: a different animal or object
        negatives[cls] = [p for c, paths in other.items() if c != cls for p in paths]
    return write_set(folder, classes, photos, photos, negatives, seed, per_class)


def build_objects(out: Path, seed: int, per_class: int) -> int:
    folder, demo_root = out / "objects", out / "demo-data" / "all"
    folder.mkdir(parents=True)
    (folder / "photos").symlink_to(demo_root.resolve(), target_is_directory=True)
    videos = {v for s, q in CROSS_VIDEO_CLASSES.values() for v in s + q} | set(CROSS_VIDEO_NEGATIVES)
    photos = {v: [Path("photos") / p for p in paths] for v, paths in class_photos(demo_root, videos).items()}
    supports, queries, negatives = {}, {}, defaultdict(list)
    for cls, (support_videos, query_videos) in CROSS_VIDEO_CLASSES.items():
        supports[cls] = [p for v in support_videos for p in photos[v]]
        queries[cls] = [p for v in query_videos for p in photos[v]]
        for other, (_, other_queries) in CROSS_VIDEO_CLASSES.items():
            if other != cls:
                negatives[cls] += [p for v in other_queries for p in photos[v]]
        negatives[cls] += [p for v in CROSS_VIDEO_NEGATIVES for p in photos[v]]
    return write_set(folder, sorted(CROSS_VIDEO_CLASSES), supports, queries, negatives, seed, per_class)


def build(shared: Path, out: Path, seed: int = 0, per_class: int = EPISODES_PER_CLASS) -> dict[str, int]:
    """Build the three sets under ``out``; returns set name -> number of episodes."""
    shared, out = Path(shared), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FssError("output folder is not empty", out)
    build_demo_data(shared, out / "demo-data")
    present = coco_categories_present(shared)
    return {
        "cluttered": build_cluttered(shared, out, present, seed, per_class),
        "unseen": build_unseen(out, present, seed, per_class),
        "objects": build_objects(out, seed, per_class),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Build held-out episode sets with negative queries.")
    p.add_argument("--shared", type=Path, default=Path("../shared/data"), help="the shared data folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the episodes (default 0)")
    p.add_argument(
        "--per-class", type=int, default=EPISODES_PER_CLASS, help="positive (and negative) episodes per class"
    )
    args = p.parse_args(argv)

    def work() -> int:
        for name, count in build(args.shared, args.out, args.seed, args.per_class).items():
            print(f"{name}: {count} episodes in {args.out / name / 'episodes.json'}")
        return 0

    return run_command(PROG, work)


if __name__ == "__main__":
    sys.exit(main())
