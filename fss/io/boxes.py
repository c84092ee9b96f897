"""Box annotations of support shots: box files, and boxes made into masks (filled, or by GrabCut).

A box file beside a support image stands in for its mask: ``<stem>.box.json`` (a list of
``[x0, y0, x1, y1]`` boxes, or ``{"boxes": [...]}``) or ``<stem>.box.txt`` (one box per line, numbers
separated by spaces or commas; blank lines and ``#`` comments are skipped). Coordinates are pixel edges
of the image as displayed, as in PIL's crop box: a box covers columns ``x0`` to ``x1 - 1`` and rows
``y0`` to ``y1 - 1``; fractions are rounded to the nearest edge. Every box lies inside the image and
covers at least one pixel.

The boxes become the shot's mask in one of :data:`BOX_MODES`: ``mask`` fills them (PANet's
weak-annotation setting: inside a box is the object, outside every box is background); ``grabcut``
refines them with OpenCV's GrabCut (the optional ``box`` extra), never to less than a pixel per box.
"""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from fss.errors import FssError, ShotError

BOX_SUFFIXES = (".box.json", ".box.txt")
BOX_MODES = ("mask", "grabcut")
MAX_BOX_FILE_BYTES = 1 << 20  # a box file is a few numbers; a larger one is not a box file
GRABCUT_SIDE = 512  # GrabCut runs on the image shrunk to this longer side: ~0.2 s, edges still fine
GRABCUT_ITERATIONS = 5
GRABCUT_MIN_BOX = 4  # a box narrower than this at GrabCut's scale holds too few colours: kept as a box
CV2_HINT = 'OpenCV is not installed: pip install "fss[box]" (opencv-python-headless) for GrabCut box supports'


class BoxFileError(ShotError):
    """A box file that does not hold boxes inside its image (malformed, empty, a box outside the image)."""


def box_file_names(image: Path) -> list[str]:
    """Names a box file of ``image`` may have: ``<stem>.box.json``, ``<stem>.box.txt``."""
    return [image.stem + suffix for suffix in BOX_SUFFIXES]


def is_box_file(path: Path) -> bool:
    return path.name.lower().endswith(BOX_SUFFIXES)


def box_file_stem(path: Path) -> str:
    """The stem of the image a box file belongs to: ``foo`` of ``foo.box.json``."""
    return path.name[: -len(".box") - len(path.suffix)]


def box_files(pairs: dict) -> list[Path]:
    """The box files standing in for masks in a support folder's ``{class: [(image, mask), ...]}``."""
    return [mask for class_pairs in pairs.values() for _, mask in class_pairs if is_box_file(Path(mask))]


def read_boxes(path) -> list[tuple[float, float, float, float]]:
    """The boxes of a box file (format in the module docstring), checked as boxes: four finite numbers,
    ``x1 > x0`` and ``y1 > y0``, at least one box. :class:`BoxFileError` names the file otherwise."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BOX_FILE_BYTES:
            raise BoxFileError(f"box file over {MAX_BOX_FILE_BYTES // 1024} KiB: not a list of boxes", path)
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BoxFileError("box file is not UTF-8 text", path) from None
    except OSError as error:
        raise BoxFileError(f"cannot read box file: {error.strerror or error}", path) from None
    rows = json_rows(text, path) if path.name.lower().endswith(".json") else text_rows(text)
    if not rows:
        raise BoxFileError("box file holds no box", path)
    return [checked_box(number, row, path) for number, row in enumerate(rows, 1)]


def json_rows(text: str, path: Path) -> list:
    try:
        data = json.loads(text)
    except RecursionError:
        raise BoxFileError("box file nests lists too deeply to be a list of boxes", path) from None
    except ValueError as error:
        raise BoxFileError(f"box file is not JSON ({str(error).splitlines()[0]})", path) from None
    if isinstance(data, dict) and set(data) == {"boxes"}:
        data = data["boxes"]
    if not isinstance(data, list):
        raise BoxFileError('expected a list of [x0, y0, x1, y1] boxes, or {"boxes": [...]}', path)
    return data


def text_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].replace(",", " ").split()
        if line:
            rows.append(line)
    return rows


def checked_box(number: int, row, path: Path) -> tuple[float, float, float, float]:
    """Box ``number`` (1-based) of a file as four floats, or a :class:`BoxFileError` saying why not."""
    if not isinstance(row, list) or len(row) != 4:
        raise BoxFileError(f"box {number} is not four numbers x0 y0 x1 y1 ({short(row)})", path)
    values = []
    for value in row:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise BoxFileError(f"box {number} holds a non-number ({short(value)})", path)
        try:
            value = float(value)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise BoxFileError(f"box {number} holds a non-number ({short(row)})", path)
        values.append(value)
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise BoxFileError(f"box {number} ({short(row)}) is empty: x1 must exceed x0 and y1 exceed y0", path)
    return x0, y0, x1, y1


def short(value) -> str:
    """A box file's row as the error quotes it: a text row as written, a JSON value as its repr."""
    is_text_row = isinstance(value, list) and all(isinstance(v, str) for v in value)
    text = " ".join(value) if is_text_row else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def pixel_boxes(boxes, size: tuple[int, int], where=None) -> list[tuple[int, int, int, int]]:
    """Boxes rounded to pixel edges, each inside an image of ``size`` (w, h) and at least a pixel."""
    width, height = size
    out = []
    for number, box in enumerate(boxes, 1):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        written = " ".join(f"{v:g}" for v in box)
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise BoxFileError(f"box {number} ({written}) reaches outside the image {width}x{height}", where)
        if x1 <= x0 or y1 <= y0:
            raise BoxFileError(f"box {number} ({written}) covers no whole pixel", where)
        out.append((x0, y0, x1, y1))
    return out


def filled_boxes(boxes, shape: tuple[int, int]) -> np.ndarray:
    """``H x W`` uint8 mask: 1 inside any of the pixel ``boxes``, 0 outside all of them."""
    mask = np.zeros(shape, np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 1
    return mask


def import_cv2():
    try:
        import cv2
    except ImportError:
        raise FssError(CV2_HINT) from None
    return cv2


def grabcut(image, boxes) -> np.ndarray:
    """``H x W`` uint8 mask: the object of each pixel box as GrabCut separates it from the background.

    GrabCut starts as ``GC_INIT_WITH_RECT`` does, from a mask (inside the boxes probably object,
    outside all of them background: one run learns the background colours of several boxes at once)
    on the image shrunk to :data:`GRABCUT_SIDE`; the result is scaled back up and kept inside the
    boxes. A box GrabCut empties (or cannot work on: too small, no background) stays filled, so a
    shot never loses its object.
    """
    cv2 = import_cv2()
    rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    height, width = rgb.shape[:2]
    box_mask = filled_boxes(boxes, (height, width))
    scale = min(1.0, GRABCUT_SIDE / max(height, width))
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = rgb if scale == 1.0 else np.asarray(Image.fromarray(rgb).resize(small_size, Image.BILINEAR))
    init = np.full(small.shape[:2], cv2.GC_BGD, np.uint8)
    workable = []
    for x0, y0, x1, y1 in boxes:
        sx0, sy0 = math.floor(x0 * scale), math.floor(y0 * scale)
        sx1, sy1 = math.ceil(x1 * scale), math.ceil(y1 * scale)
        init[sy0:sy1, sx0:sx1] = cv2.GC_PR_FGD
        workable.append(min(sx1 - sx0, sy1 - sy0) >= GRABCUT_MIN_BOX)
    refined = np.zeros((height, width), np.uint8)
    if any(workable) and (init == cv2.GC_BGD).any():
        cv2.setRNGSeed(0)  # GrabCut's k-means draws from OpenCV's per-thread generator: reproducible
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            small = np.ascontiguousarray(small)
            cv2.grabCut(small, init, None, bgd, fgd, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
        except cv2.error:
            init[:] = cv2.GC_PR_FGD  # a degenerate image (e.g. one colour): keep the boxes
        object_small = np.where((init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD), 255, 0).astype(np.uint8)
        up = Image.fromarray(object_small).resize((width, height), Image.BILINEAR)
        refined = (np.asarray(up) >= 128).astype(np.uint8) & box_mask
    for (x0, y0, x1, y1), works in zip(boxes, workable, strict=True):
        if not works or not refined[y0:y1, x0:x1].any():
            refined[y0:y1, x0:x1] = 1
    return refined


def boxes_mask(image: Image.Image, boxes, mode: str, where=None) -> np.ndarray:
    """A support shot's mask (``H x W`` uint8, 0 / 1) from its boxes (as :func:`read_boxes` gives them)
    in ``mode`` (:data:`BOX_MODES`); ``where`` (the box file) is named in errors."""
    check_box_mode(mode)
    pixels = pixel_boxes(boxes, image.size, where)
    if mode == "grabcut":
        return grabcut(image, pixels)
    return filled_boxes(pixels, (image.size[1], image.size[0]))


def check_box_mode(mode: str) -> None:
    if mode not in BOX_MODES:
        raise FssError(f"box supports must be one of {', '.join(BOX_MODES)}, got {mode!r}")
