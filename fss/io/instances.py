"""Objects of a label map: one mask per connected region of each class, with a score and a box.

An *instance* is a 4-connected region of one label; its score is the mean probability of its label
over its pixels (the winning probability, so what the head was sure of), its box the smallest
rectangle holding it, COCO's ``[x, y, width, height]`` in pixels. Regions smaller than ``min_area``
pixels are dropped (specks at the edge of a mask are not objects). Masks go out as COCO run-length
encodings (``pycocotools.mask.encode``), which ``pycocotools.mask.decode`` reads back exactly.
"""

from dataclasses import dataclass

import numpy as np

DEFAULT_MIN_AREA = 64  # pixels: an 8 x 8 patch, one cell of a stride-8 feature grid


@dataclass
class Instance:
    """One object: its label (1..N), the ``H x W`` bool mask, score, box ``[x, y, w, h]`` and area."""

    label: int
    mask: np.ndarray
    score: float
    box: list[int]
    area: int

    def rle(self) -> dict:
        """The mask as COCO's compressed RLE, ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
        from pycocotools import mask as coco_mask

        encoded = coco_mask.encode(np.asfortranarray(self.mask, dtype=np.uint8))
        return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def region_ids(labels: np.ndarray) -> np.ndarray:
    """``H x W`` labels -> ``H x W`` int64 ids, one per 4-connected region of equal nonzero labels (the
    flat index of one of its pixels), ``H * W`` on the background.

    Label propagation with pointer jumping: every pixel takes the minimum over its same-label neighbours
    and over the pixel its id names, until nothing changes.
    """
    H, W = labels.shape
    outside = H * W
    fg = labels > 0
    ids = np.where(fg, np.arange(H * W).reshape(H, W), outside)
    down = fg[1:] & (labels[1:] == labels[:-1])  # pixel (i + 1, j) joins (i, j)
    right = fg[:, 1:] & (labels[:, 1:] == labels[:, :-1])
    while True:
        low = ids.copy()
        np.minimum(low[1:], np.where(down, ids[:-1], outside), out=low[1:])
        np.minimum(low[:-1], np.where(down, ids[1:], outside), out=low[:-1])
        np.minimum(low[:, 1:], np.where(right, ids[:, :-1], outside), out=low[:, 1:])
        np.minimum(low[:, :-1], np.where(right, ids[:, 1:], outside), out=low[:, :-1])
        pointed = np.append(low.ravel(), outside)[low.ravel()].reshape(H, W)
        low = np.where(fg, np.minimum(low, pointed), outside)
        if np.array_equal(low, ids):
            return ids
        ids = low


def find_instances(labels: np.ndarray, prob: np.ndarray, min_area: int = DEFAULT_MIN_AREA) -> list[Instance]:
    """The objects of ``labels`` (``H x W``, 0 background) of at least ``min_area`` pixels, scored with
    ``prob`` (``H x W``, the winning label's probability): by label, then largest first."""
    ids = region_ids(labels)
    fg = ids.ravel() < labels.size
    roots, inverse, areas = np.unique(ids.ravel()[fg], return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=prob.ravel()[fg].astype(np.float64), minlength=len(roots))
    kept = [k for k in np.lexsort((-areas, labels.ravel()[roots])) if areas[k] >= min_area]
    instances = []
    for k in kept:
        mask = ids == roots[k]
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        score = round(float(sums[k] / areas[k]), 6)
        instances.append(Instance(int(labels.flat[roots[k]]), mask, score, box, int(areas[k])))
    return instances


def instance_record(instance: Instance, classes: list[str]) -> dict:
    """One object as a COCO result (``category_id`` the label; its class name beside it)."""
    return {
        "category_id": instance.label,
        "category": classes[instance.label - 1],
        "segmentation": instance.rle(),
        "score": instance.score,
        "bbox": instance.box,
        "area": instance.area,
        "iscrowd": 0,
    }


def coco_document(images: list[dict], classes: list[str]) -> dict:
    """A COCO file of results: ``images`` are ``{"file_name", "width", "height", "instances": [record]}``
    in order (image ids from 1); ``annotations`` is the COCO results list (``COCO.loadRes`` reads it)."""
    entries, annotations = [], []
    for image_id, image in enumerate(images, start=1):
        entries.append({k: image[k] for k in ("file_name", "width", "height")} | {"id": image_id})
        for record in image["instances"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **record})
    categories = [{"id": n, "name": name} for n, name in enumerate(classes, start=1)]
    return {"images": entries, "categories": categories, "annotations": annotations}
