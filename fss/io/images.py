"""Images read as a person sees them, under a pixel limit.

The EXIF orientation is applied, 16-bit and float pixels are scaled by their value range to 8 bits,
and an image may have at most :func:`max_pixels` pixels (checked from the header, before decoding; a
JPEG up to ``DRAFT_FACTOR`` times larger is decoded at half its side by the JPEG decoder itself;
Pillow's own bound never refuses first: :func:`pillow_allows`).
"""

import contextlib
import math
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

from fss.errors import CorruptImageError, FssError, ImageError, ImageFormatError, ImageTooLargeError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; an RGB decode of that is 192 MB
MAX_PIXELS_ENV = "FSS_MAX_PIXELS"
DRAFT_FACTOR = 4  # JPEGs up to 4x the pixel limit decode at half side (JPEG draft mode)
FULL_SIZE_KEY = "fss_full_size"  # PIL info key: (w, h) as displayed when decoded at a reduced size

_open_lock = threading.Lock()  # warnings filters are process-wide: one Image.open at a time
_max_pixels_override: int | None = None


def max_pixels() -> int:
    """The largest image (width x height) read: ``pixel_limit``, else ``$FSS_MAX_PIXELS``, else 64 M."""
    if _max_pixels_override is not None:
        return _max_pixels_override
    text = os.environ.get(MAX_PIXELS_ENV)
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        raise FssError(f"{MAX_PIXELS_ENV} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise FssError(f"{MAX_PIXELS_ENV} must be a positive integer, got {text!r}")
    return value


@contextlib.contextmanager
def pixel_limit(limit: int | None):
    """Within the block, images may have at most ``limit`` pixels (None: the default)."""
    global _max_pixels_override
    previous, _max_pixels_override = _max_pixels_override, limit
    try:
        yield
    finally:
        _max_pixels_override = previous


@contextlib.contextmanager
def pillow_allows(pixels: int):
    """Within the block (under ``_open_lock``), Pillow's own decompression-bomb check lets images of
    ``pixels`` through. It is a process-wide setting that refuses, on opening, images over twice
    ``Image.MAX_IMAGE_PIXELS``: raised, never lowered, so that no other thread's image is refused by
    it meanwhile; ours, checked from the header before anything is decoded, is the limit that refuses.
    Yields the bound in force."""
    previous = Image.MAX_IMAGE_PIXELS
    if previous is not None:
        Image.MAX_IMAGE_PIXELS = max(previous, pixels)
    try:
        yield Image.MAX_IMAGE_PIXELS
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_image(
    source, what: str = "image", limit: int | None = None, draft=False, formats=None
) -> Image.Image:
    """A decoded image (a path or file object) of at most ``limit`` pixels (default
    :func:`max_pixels`), checked from the header before decoding: the one bounded opening of fss.

    ``draft``: a JPEG of up to ``DRAFT_FACTOR`` times the limit is decoded at half side instead, and
    ``info[FULL_SIZE_KEY]`` keeps its stored size. ``formats``: the Pillow formats taken (default all).
    Raises :class:`ImageError` (no image; :class:`CorruptImageError` once the header read;
    :class:`ImageFormatError`) or :class:`ImageTooLargeError`, worded with ``what``.
    """
    hint = f"${MAX_PIXELS_ENV}" if limit is None else ""
    limit = max_pixels() if limit is None else limit
    allowed = DRAFT_FACTOR * limit if draft else limit
    try:
        with _open_lock, warnings.catch_warnings(), pillow_allows(allowed) as pillow_bound:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is checked below
            img = Image.open(source)
    except FileNotFoundError:
        raise ImageError(f"{what} not found", source) from None
    except IsADirectoryError:
        raise ImageError(f"{what} is a folder", source) from None
    except Image.DecompressionBombError:
        detail = f"image has more than {2 * pillow_bound:,} pixels, more than the limit of {limit:,}"
        raise ImageTooLargeError(detail, named(source), None, limit, hint) from None
    except Exception:  # Pillow raises several types for truncated or foreign files
        raise ImageError(f"unreadable or corrupt {what}", named(source)) from None
    if formats is not None and img.format not in formats:
        img.close()
        raise ImageFormatError(f"format {img.format} not accepted (use {', '.join(formats)})", named(source))
    width, height = img.size
    if width * height > limit:
        if not (draft and img.format in ("JPEG", "MPO") and width * height <= DRAFT_FACTOR * limit):
            img.close()
            detail = (
                f"image has {width} x {height} = {width * height:,} pixels, more than the limit of {limit:,}"
            )
            raise ImageTooLargeError(detail, named(source), (width, height), limit, hint)
        img.draft(img.mode, (math.ceil(width / 2), math.ceil(height / 2)))
        img.info[FULL_SIZE_KEY] = (width, height)
    try:
        img.load()
    except Exception:
        raise CorruptImageError(f"unreadable or corrupt {what}", named(source)) from None
    return img


def named(source):
    """The file an error names: a path names itself, a file object (a request's bytes) nothing."""
    return source if isinstance(source, (str, os.PathLike)) else None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, 16-bit / 32-bit / float greyscale scaled by their value range (not clipped)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        else:
            scale = 1.0 / 257 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        out = Image.fromarray(grey, mode="L").convert("RGB")
        out.info = dict(img.info)
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1 = as stored)."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block: show the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def orient(img: Image.Image) -> Image.Image:
    """The image as displayed: its EXIF orientation applied (a no-op without one)."""
    value = orientation(img)
    if value == 1:
        return img
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: show the pixels as stored
        return img
    if FULL_SIZE_KEY in img.info:
        stored = tuple(img.info[FULL_SIZE_KEY])
        out.info[FULL_SIZE_KEY] = stored[::-1] if orientation_swaps(value) else stored
    return out


ORIENTATION_TRANSPOSE = {  # EXIF orientation -> the transpose that displays the stored pixels
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orient_array(array: np.ndarray, value: int) -> np.ndarray:
    """An ``H x W`` array of stored pixels turned as EXIF orientation ``value`` displays them."""
    if value not in ORIENTATION_TRANSPOSE:
        return array
    return np.asarray(Image.fromarray(array).transpose(ORIENTATION_TRANSPOSE[value]))


def orientation_swaps(value: int) -> bool:
    return value in (5, 6, 7, 8)  # transposes and 90-degree rotations


def read_image(path, orient_exif: bool = True, draft: bool = True) -> Image.Image:
    """An 8-bit RGB image as displayed (EXIF orientation applied, unless ``orient_exif`` is False:
    datasets whose annotations refer to the stored pixels). ``draft``: see :func:`decode_image` (off
    for an image whose mask must match it pixel for pixel)."""
    img = decode_image(path, "image", draft=draft)
    if orient_exif:
        img = orient(img)
    return to_rgb(img)


def full_size(img: Image.Image) -> tuple[int, int]:
    """(w, h) of the image as displayed at full resolution (it may be decoded at a reduced size)."""
    return tuple(img.info.get(FULL_SIZE_KEY, img.size))


def as_rgb(image) -> Image.Image:
    """A path, PIL image or ``H x W (x C)`` array (uint8, uint16 or float) as an 8-bit RGB image; a PIL
    image that still carries an EXIF orientation is turned as displayed."""
    if isinstance(image, Image.Image):
        return to_rgb(orient(image))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16:
            image = (image.astype(np.float64) / 257).round().astype(np.uint8)
        elif image.dtype.kind == "f":
            image = np.clip(np.rint(image * (255.0 if image.size and image.max() <= 1 else 1)), 0, 255)
            image = image.astype(np.uint8)
        elif image.dtype == bool:
            image = image.astype(np.uint8) * 255
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    return read_image(image)


def is_one_image(query) -> bool:
    """A single image (path, PIL image, ``H x W (x 3)`` array), not a collection of them."""
    return isinstance(query, (str, os.PathLike, Image.Image)) or (
        isinstance(query, np.ndarray) and query.ndim <= 3
    )
