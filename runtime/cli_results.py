"""``fss-run``'s presence and object outputs: ``--min-score``, ``--instances`` / ``--min-area``, the
per-class scores of each ``results.json`` entry and ``instances.json`` (COCO) beside the masks."""

import argparse
from pathlib import Path

import numpy as np

from fss.errors import FssError
from fss.io.instances import DEFAULT_MIN_AREA, coco_document, find_instances, instance_record

INSTANCES_FILE = "instances.json"


def add_result_args(p: argparse.ArgumentParser, positive_int) -> None:
    """The flags; ``positive_int``: the commands' argument type (1 or more)."""
    p.add_argument(
        "--instances",
        action="store_true",
        help=f"also write {INSTANCES_FILE}: one COCO mask (RLE), score and box per connected object of "
        "each class; overlays outline each object",
    )
    p.add_argument(
        "--min-area",
        type=positive_int,
        default=DEFAULT_MIN_AREA,
        metavar="PIXELS",
        help=f"with --instances, the smallest object kept (default {DEFAULT_MIN_AREA} pixels)",
    )


def result_settings(args, seg) -> dict:
    """What these flags add to the run's settings (a resumed run must match them)."""
    instances = args.min_area if args.instances else None
    return {"min_score": seg.min_score, "edges": seg.edges, "instances": instances}


def full_size_prob(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The winner's probability of an image decoded at a reduced size, at its full ``size`` (w, h)."""
    from PIL import Image

    if prob.shape == (size[1], size[0]):
        return prob
    return np.asarray(Image.fromarray(prob.astype(np.float32), mode="F").resize(size, Image.NEAREST))


def presence_fields(result) -> dict:
    """A query's per-class presence scores and the classes judged absent (they got no pixels)."""
    segmentation = result.result
    return {"score": segmentation.class_scores(), "absent": segmentation.absent}


def query_instances(result, labels: np.ndarray, min_area: int | None, classes: list[str]):
    """(objects of the full-size ``labels``, their COCO records), scored with the winner's probability;
    (None, None) where no objects are asked for (``min_area`` None)."""
    if min_area is None:
        return None, None
    prob = full_size_prob(result.prob, (labels.shape[1], labels.shape[0]))
    instances = find_instances(labels, prob, min_area)
    return instances, [instance_record(i, classes) for i in instances]


def instances_document(results: dict, classes: list[str]) -> dict:
    """``instances.json`` from the results entries that have objects (in file-name order)."""
    images = [
        {"file_name": e["file"], "width": e["size"][0], "height": e["size"][1], "instances": e["instances"]}
        for _, e in sorted(results.items())
        if isinstance(e.get("instances"), list) and not e.get("error")
    ]
    return coco_document(images, classes)


def write_instances(out: Path, results: dict, classes: list[str], asked: bool) -> None:
    from fss.io.outputs import write_json

    if asked:
        write_json(out / INSTANCES_FILE, instances_document(results, classes))


def objects_mask(instances, size: tuple[int, int]) -> np.ndarray:
    """The union of the objects' masks, at ``size`` (w, h) (an overlay of an image decoded smaller)."""
    from PIL import Image

    union = np.zeros(instances[0].mask.shape if instances else (size[1], size[0]), bool)
    for instance in instances:
        union |= instance.mask
    if union.shape == (size[1], size[0]):
        return union
    return np.asarray(Image.fromarray(union).resize(size, Image.NEAREST))


def check_instances_file(out: Path, overwrite: bool) -> None:
    """Refuse to replace an ``instances.json`` that fss-run did not write (its journal does not record
    it), unless ``overwrite``."""
    from fss.io.outputs import journal_outputs
    from fss.runtime.cli_resume import file_sha256

    path = out / INSTANCES_FILE
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if (
        path.is_file()
        and not path.is_symlink()
        and journal_outputs(out).get(INSTANCES_FILE) == file_sha256(path)
    ):
        return
    raise FssError(
        f"--out holds {INSTANCES_FILE}, which fss-run did not write: move it away, choose another --out, "
        "or pass --overwrite",
        path,
    )
