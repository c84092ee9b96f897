"""Weak support annotations for evaluation (paper, Table 6): bounding boxes and scribbles.

- Box: the box of one random instance of the class is foreground; everything outside all boxes of the
  class's instances is background.
- GrabCut: that box refined by GrabCut as ``fss-run --box-supports grabcut`` refines a user's box
  (:func:`fss.io.boxes.grabcut`): its object is foreground; the box's other pixels join the background.
- Scribble: strokes drawn inside the dense foreground and inside the dense background, one through
  each large connected part, kept away from the borders as a person would draw them.

Both are made at the input size from the dense masks and instances, with a random generator seeded
by the photo and the class alone: a support image gets the same weak annotation in every episode
and every run, as a dataset of stored annotations would give.
"""

import hashlib

import numpy as np

SCRIBBLE_MIN_SHARE = 0.1  # a connected part gets a stroke when it holds this share of the region
SCRIBBLE_HALF_WIDTH = 1  # strokes are 3 pixels wide
SCRIBBLE_TURN_STD = 0.3  # radians: how much a stroke's direction wanders per pixel step
ERODE_FRACTION, ERODE_MAX = 0.075, 16  # keep strokes this far (x sqrt(area), at most 16 px) from borders


def annotation_rng(photo: str, cls: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{photo}\0{cls}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def shifted_min(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour erosion (outside the image counts as outside the mask)."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected parts of a bool mask, largest first.

    Label propagation with pointer jumping: every pixel holds the flat index of a pixel of its part and
    takes the minimum over its neighbours and over the pixel it points to, until nothing changes.
    """
    H, W = mask.shape
    outside = H * W
    labels = np.where(mask, np.arange(H * W).reshape(H, W), outside)
    while True:
        low = labels.copy()
        np.minimum(low[1:], labels[:-1], out=low[1:])
        np.minimum(low[:-1], labels[1:], out=low[:-1])
        np.minimum(low[:, 1:], labels[:, :-1], out=low[:, 1:])
        np.minimum(low[:, :-1], labels[:, 1:], out=low[:, :-1])
        flat = low.ravel()
        pointed = np.append(flat, outside)[flat].reshape(H, W)  # the label of the pixel each label names
        low = np.where(mask, np.minimum(low, pointed), outside)
        if np.array_equal(low, labels):
            break
        labels = low
    roots, sizes = np.unique(labels[mask], return_counts=True)
    return [labels == roots[i] for i in np.argsort(-sizes, kind="stable")]


def bounding_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.zeros_like(mask)
    box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    return box


def box_masks(
    instances: list[np.ndarray], shape: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) from the class's instance masks: a random instance's box, and the
    outside of all the boxes. No instance (the class vanished at this size): no foreground."""
    present = [m for m in instances if m.any()]
    if not present:
        return np.zeros(shape, bool), np.ones(shape, bool)
    boxes = [bounding_box(m) for m in present]
    return boxes[rng.integers(len(boxes))], ~np.logical_or.reduce(boxes)


def grabcut_masks(image: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The box annotation (``fg``, ``bg`` of :func:`box_masks`) of an ``S x S x 3`` uint8 ``image``
    refined by GrabCut: (the object in the box, the background plus the rest of the box)."""
    from fss.io.boxes import grabcut

    if not fg.any():
        return fg, bg
    rows, cols = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
    found = grabcut(image, [(cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)]).astype(bool)
    return found, bg | (fg & ~found)


def interior(region: np.ndarray) -> np.ndarray:
    """The region eroded by a margin that grows with its size, shrunk until something is left."""
    margin = min(int(ERODE_FRACTION * np.sqrt(region.sum())), ERODE_MAX)
    while margin > 0:
        inner = region
        for _ in range(margin):
            inner = shifted_min(inner)
        if inner.any():
            return inner
        margin = int(margin * 0.7)
    return region


def stroke(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A wandering stroke about as long as the region is wide, inside its interior."""
    inside = interior(region)
    ys, xs = np.nonzero(inside)
    start = rng.integers(len(ys))
    y, x = float(ys[start]), float(xs[start])
    angle = rng.uniform(0, 2 * np.pi)
    path = np.zeros_like(region)
    path[int(y), int(x)] = True
    H, W = region.shape
    for _ in range(int(np.sqrt(region.sum()))):
        angle += rng.normal(0, SCRIBBLE_TURN_STD)
        for _ in range(8):  # at the interior's edge, turn back inwards
            ny, nx = y + np.sin(angle), x + np.cos(angle)
            iy, ix = int(round(ny)), int(round(nx))
            if 0 <= iy < H and 0 <= ix < W and inside[iy, ix]:
                break
            angle += rng.uniform(0.5 * np.pi, 1.5 * np.pi)
        else:
            break
        y, x = ny, nx
        path[iy, ix] = True
    return dilate(path, SCRIBBLE_HALF_WIDTH) & region


def scribble(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strokes inside a bool region: one through each connected part holding at least 10% of it."""
    out = np.zeros_like(region)
    total = region.sum()
    for part in connected_components(region):
        if out.any() and part.sum() < SCRIBBLE_MIN_SHARE * total:
            break
        out |= stroke(part, rng)
    return out


def scribble_masks(fg: np.ndarray, bg: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) scribbles inside the dense foreground and background."""
    return scribble(fg, rng), scribble(bg, rng)
