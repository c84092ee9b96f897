"""The training and held-out folders of the bundled demo model, built from ``../shared/data``.

    python -m fss.train.demo_data --shared ../shared/data --out runs/demo-data

Writes ``OUT/all/<class>/`` (symbolic links to the photos and masks, one folder per class) and
``OUT/heldout.txt`` (the held-out classes, comma-separated, for ``fss-train --val-classes``):

- COCO (coco-mini and tiny-coco, converted with :func:`fss.train.coco.convert`): training classes from
  the ``train2017`` photos, held-out classes from the ``val2017`` photos only, so no photo is on both
  sides; ``HELDOUT_COCO`` are the held-out classes (the examples' bus and pizza among them);
- DAVIS: every 4th video (in name order) held out, whole videos, never frames of one video on both sides;
- pets: Bengal held out, Abyssinian and american_bulldog trained on.

Class folders are prefixed with their source (``coco-bus``, ``davis-camel``, ``pets-Bengal``).
"""

import argparse
import sys
from pathlib import Path

from fss.command import run_command
from fss.errors import FssError
from fss.train.coco import convert

PROG = "python -m fss.train.demo_data"
COCO_SOURCES = ("coco-mini", "tiny-coco")
HELDOUT_COCO = frozenset(
    {"bear", "bench", "bird", "boat", "broccoli", "bus", "cat", "couch", "cow", "cup", "elephant",
     "fire_hydrant", "giraffe", "motorcycle", "orange", "pizza", "stop_sign", "train"}
)  # fmt: skip
HELDOUT_PETS = frozenset({"Bengal"})
DAVIS_HELDOUT_EVERY = 4
MIN_COCO_IMAGES = 2  # per class and split: enough for a 1-shot episode


def link_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and not (target / path.name).exists():
            (target / path.name).symlink_to(path.resolve())


def build(shared: Path, out: Path) -> list[str]:
    """Build ``out/all`` and ``out/heldout.txt``; returns the held-out classes."""
    shared, out = Path(shared), Path(out)
    for name in (*COCO_SOURCES, "davis", "pets"):
        if not (shared / name).is_dir():
            raise FssError(f"no {name}/ in the shared data folder", shared)
    if out.exists() and any(out.iterdir()):
        raise FssError("output folder is not empty", out)
    all_classes, heldout = out / "all", set()
    for source in COCO_SOURCES:
        for split, held in (("train2017", False), ("val2017", True)):
            converted = out / "coco" / f"{source}-{split}"
            convert(shared / source, converted, [split], min_images=MIN_COCO_IMAGES)
            for folder in sorted(p for p in converted.iterdir() if p.is_dir()):
                if (folder.name in HELDOUT_COCO) == held:
                    link_files(folder, all_classes / f"coco-{folder.name}")
                    if held:
                        heldout.add(f"coco-{folder.name}")
    videos = sorted(p for p in (shared / "davis").iterdir() if p.is_dir())
    for index, video in enumerate(videos):
        link_files(video, all_classes / f"davis-{video.name}")
        if index % DAVIS_HELDOUT_EVERY == 0:
            heldout.add(f"davis-{video.name}")
    for breed in sorted(p for p in (shared / "pets").iterdir() if p.is_dir()):
        link_files(breed, all_classes / f"pets-{breed.name}")
        if breed.name in HELDOUT_PETS:
            heldout.add(f"pets-{breed.name}")
    classes = sorted(heldout)
    (out / "heldout.txt").write_text(",".join(classes) + "\n")
    return classes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Build the demo model's training / held-out folders.")
    p.add_argument("--shared", type=Path, default=Path("../shared/data"), help="the shared data folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    args = p.parse_args(argv)

    def work() -> int:
        classes = build(args.shared, args.out)
        heldout, folders = args.out / "heldout.txt", args.out / "all"
        print(f"{len(classes)} held-out classes in {heldout}; class folders in {folders}")
        return 0

    return run_command(PROG, work)


if __name__ == "__main__":
    sys.exit(main())
