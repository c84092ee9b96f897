"""Files in and out: support folders, images and masks, palette PNGs, overlays, atomic writes.

Images are read as a person sees them: the EXIF orientation is applied, 16-bit and float pixels are
scaled by their value range to 8 bits, and an image may have at most :func:`max_pixels` pixels
(checked from the header, before decoding; a JPEG up to ``DRAFT_FACTOR`` times larger is decoded at
half its side by the JPEG decoder itself; Pillow's own bound never refuses first: :func:`pillow_allows`).

Mask conventions (one parser, :func:`parse_mask`, for files, PIL images and arrays): palette PNGs
(mode P, VOC style) read 0 as background, 255 as ignored and any other index as foreground; every
other mode (grey, 16-bit grey, RGB, binary) reads 0 as background and anything else as foreground
(FSS-1000 stores 0/255). With transparency (RGBA, LA), the colour is read while the alpha is uniform,
the alpha (0 background) while the colour is: :func:`colour_or_alpha`. An array is read as a
greyscale image (``H x W x 2`` / ``x 4``: grey / RGB and alpha), except one that holds only 0, 1
and 255 with at least one 1: that is an already parsed mask (what :func:`read_mask` returns).
Parsed masks are ``uint8`` with 0 background, 1 foreground, 255 ignored. Masks have no orientation:
they refer to the image as displayed.
"""

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from fss.constants import IGNORE_INDEX, voc_palette
from fss.errors import FssError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MASK_SUFFIX = "_mask"
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; an RGB decode of that is 192 MB
MAX_PIXELS_ENV = "FSS_MAX_PIXELS"
DRAFT_FACTOR = 4  # JPEGs up to 4x the pixel limit decode at half side (JPEG draft mode)
FULL_SIZE_KEY = "fss_full_size"  # PIL info key: (w, h) as displayed when decoded at a reduced size
MAX_CLASSES = 254  # labels 1..254 in a uint8 PNG; 0 is background, 255 reads back as "ignored"
RESERVED_CLASS_NAMES = ("background",)  # label 0
TEMP_PREFIX = ".fss-partial."  # atomic_write's temporaries: .fss-partial.<name>.<random>.tmp
TEMP_FILE = re.compile(r"^\.fss-partial\..+\.tmp$")
LOCK_FILE = ".fss.lock"  # also the folder's journal: JSON lines, see folder_lock

_open_lock = threading.Lock()  # warnings filters are process-wide: one Image.open at a time
_journals: dict[Path, int] = {}  # locked folder (resolved) -> its journal's file descriptor
_max_pixels_override: int | None = None

Warn = Callable[[str, Path], None]


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


# -- folders -----------------------------------------------------------------------------------------
def scan_folder(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Sorted image files of a folder, and the entries skipped with the reason (hidden files and
    plain subfolders are neither)."""
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        named_like_image = path.suffix.lower() in IMAGE_EXTS
        if path.is_symlink() and not path.exists():
            skipped.append((path, "dangling or looping symbolic link"))
        elif path.is_dir():
            if named_like_image:
                skipped.append((path, "folder named like an image"))
        elif not path.is_file():
            skipped.append((path, "special file (not a regular file)"))
        elif named_like_image:
            images.append(path)
        else:
            skipped.append((path, "non-image file"))
    return images, skipped


def warn_skipped(skipped, warn: Warn | None) -> None:
    for path, reason in skipped:
        if warn is None:
            warnings.warn(f"skipping {reason} ({path})", stacklevel=3)
        else:
            warn(f"skipping {reason}", path)


def mask_candidates(image: Path) -> list[str]:
    """Names a mask of ``image`` may have: ``<stem>_mask.png``, and ``<stem>.png`` beside a non-PNG."""
    names = [image.stem + MASK_SUFFIX + ".png"]
    if image.suffix.lower() != ".png":
        names.append(image.stem + ".png")
    return names


def class_pairs(folder: Path, warn: Warn | None = None) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of one class folder, sorted by image name.

    A mask is ``<stem>_mask.png`` beside any image, or ``<stem>.png`` beside a non-PNG image (so
    ``foo_mask.jpg`` + ``foo_mask.png`` is a pair). Every other image file is an image.
    """
    files, skipped = scan_folder(folder)
    warn_skipped(skipped, warn)
    by_name = {p.name: p for p in files}
    stems = {}
    for p in files:
        stems.setdefault(p.stem, []).append(p)

    def is_mask(p: Path) -> bool:
        if p.suffix.lower() != ".png":
            return False
        base = p.stem[: -len(MASK_SUFFIX)] if p.stem.endswith(MASK_SUFFIX) else None
        if base is not None and any(o != p for o in stems.get(base, [])):
            return True  # <stem>_mask.png beside an image <stem>.*
        return any(o.suffix.lower() != ".png" for o in stems.get(p.stem, []))  # <stem>.png beside a JPEG...

    masks = {p.name for p in files if is_mask(p)}
    owner: dict[str, Path] = {}
    pairs = []
    for image in files:
        if image.name in masks:
            continue
        found = [by_name[n] for n in mask_candidates(image) if n in masks]
        if not found:
            if image.stem.endswith(MASK_SUFFIX) and image.suffix.lower() == ".png":
                raise FssError("mask without image", image)
            expected = " or ".join(mask_candidates(image))
            raise FssError(f"image without mask (expected {expected})", image)
        if len(found) > 1:
            raise FssError(f"two masks for one image ({found[0].name} and {found[1].name})", image)
        mask = found[0]
        if mask.name in owner:
            raise FssError(f"one mask for two images ({owner[mask.name].name} and {image.name})", mask)
        owner[mask.name] = image
        pairs.append((image, mask))
    return pairs


def find_support_pairs(root, warn: Warn | None = None) -> dict[str, list[tuple[Path, Path]]]:
    """Class name -> sorted (image, mask) pairs of a support folder.

    ``root/<class>/...`` gives one class per subfolder (sorted by name); a flat ``root`` of pairs is
    one class named after the folder. Pairs beside class subfolders are an error (they would belong
    to no class). ``warn(message, path)`` hears of skipped entries (default: ``warnings.warn``).
    """
    root = Path(root)
    if not root.is_dir():
        raise FssError("support folder not found", root)
    # scan_folder warns of folders named like images
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and is_class_folder_name(p.name))
    if subdirs:
        loose, _ = scan_folder(root)
        if loose:
            raise FssError(
                f"support folder has class subfolders and loose images ({loose[0].name}): move the "
                "image+mask pairs into a class folder",
                root,
            )
        _, skipped = scan_folder(root)
        warn_skipped([s for s in skipped if s[1] != "non-image file"], warn)
    classes = {}
    for folder in subdirs or [root]:
        pairs = class_pairs(folder, warn)
        if pairs:
            classes[folder.name] = pairs
        elif subdirs:
            raise FssError("class folder has no image+mask pair", folder)
    if not classes:
        raise FssError("support folder is empty: no image+mask pairs", root)
    return classes


def is_class_folder_name(name: str) -> bool:
    """Whether a subfolder so named is a class of a support folder: not hidden, not named like an image."""
    return not name.startswith(".") and Path(name).suffix.lower() not in IMAGE_EXTS


def check_class_names(classes: list[str], where=None) -> None:
    """Class names fit the label format: not a reserved name, at most ``MAX_CLASSES`` classes.

    ``fss-run``'s rule, applied as well wherever class names come from elsewhere (fss-serve, fss-demo).
    """
    for name in classes:
        if name.lower() in RESERVED_CLASS_NAMES:
            raise FssError(f"class {name!r} collides with label 0 (background): rename the class", where)
    if len(classes) > MAX_CLASSES:
        raise FssError(
            f"{len(classes)} classes, more than the {MAX_CLASSES} a label PNG can hold "
            f"(labels 1..{MAX_CLASSES}; 0 is background, 255 means ignored)",
            where,
        )


def list_images(folder) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Sorted image files of a folder and, separately, the entries skipped with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FssError("query folder not found", folder)
    return scan_folder(folder)


# -- images and masks --------------------------------------------------------------------------------
def too_many_pixels(width: int, height: int, limit: int) -> str:
    return (
        f"image has {width} x {height} = {width * height:,} pixels, more than the limit of {limit:,} "
        f"(--max-pixels or ${MAX_PIXELS_ENV})"
    )


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


def open_image(path, what: str, draft: bool = False) -> Image.Image:
    """A decoded image of at most :func:`max_pixels` pixels (checked before decoding).

    ``draft``: a JPEG of up to ``DRAFT_FACTOR`` times the limit is decoded at half side instead, and
    ``info[FULL_SIZE_KEY]`` keeps its stored size.
    """
    limit = max_pixels()
    allowed = DRAFT_FACTOR * limit if draft else limit
    try:
        with _open_lock, warnings.catch_warnings(), pillow_allows(allowed) as pillow_bound:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is checked below
            img = Image.open(path)
    except FileNotFoundError:
        raise FssError(f"{what} not found", path) from None
    except IsADirectoryError:
        raise FssError(f"{what} is a folder", path) from None
    except Image.DecompressionBombError:
        raise FssError(
            f"image has more than {2 * pillow_bound:,} pixels, more than the limit of {limit:,} "
            f"(--max-pixels or ${MAX_PIXELS_ENV})",
            path,
        ) from None
    except Exception:  # Pillow raises several types for truncated or foreign files
        raise FssError(f"unreadable or corrupt {what}", path) from None
    width, height = img.size
    if width * height > limit:
        if not (draft and img.format in ("JPEG", "MPO") and width * height <= DRAFT_FACTOR * limit):
            img.close()
            raise FssError(too_many_pixels(width, height, limit), path)
        img.draft(img.mode, (math.ceil(width / 2), math.ceil(height / 2)))
        img.info[FULL_SIZE_KEY] = (width, height)
    try:
        img.load()
    except Exception:
        raise FssError(f"unreadable or corrupt {what}", path) from None
    return img


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
    datasets whose annotations refer to the stored pixels). ``draft``: see :func:`open_image` (off
    for an image whose mask must match it pixel for pixel)."""
    img = open_image(path, "image", draft=draft)
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


def parse_mask(mask, where=None) -> np.ndarray:
    """A mask file, PIL image or array -> ``H x W`` uint8: 0 background, 1 foreground, 255 ignored.

    The one mask parser of fss (rules in the module docstring). ``where``: the file named in errors (a
    path given as ``mask`` names itself).
    """
    if isinstance(mask, (str, os.PathLike)):
        mask, where = open_image(mask, "mask"), mask
    if isinstance(mask, Image.Image):
        if mask.mode == "P":
            index = np.asarray(mask)
            parsed = (index != 0).astype(np.uint8)
            parsed[index == IGNORE_INDEX] = IGNORE_INDEX
            return parsed
        if "A" in mask.getbands():  # RGBA, LA, PA
            return colour_or_alpha(np.asarray(mask.convert("RGB")), np.asarray(mask.getchannel("A")), where)
        if len(mask.getbands()) > 1:
            return np.asarray(mask.convert("RGB")).any(axis=-1).astype(np.uint8)
        return (np.asarray(mask) != 0).astype(np.uint8)
    values = np.asarray(mask)
    if values.ndim == 3 and values.shape[-1] in (2, 4):  # grey or RGB, then alpha (as PIL's LA / RGBA)
        return colour_or_alpha(values[..., :-1], values[..., -1], where)
    if values.ndim == 3:
        values = values.any(axis=-1)
    if values.ndim != 2:
        raise ValueError(f"a mask is H x W (or H x W x C), got shape {values.shape}")
    if values.dtype == bool:
        return values.astype(np.uint8)
    if (values == 1).any() and np.isin(values, (0, 1, IGNORE_INDEX)).all():
        return values.astype(np.uint8)  # already parsed: 0 / 1 / 255 ignored
    return (values != 0).astype(np.uint8)


def colour_or_alpha(colour: np.ndarray, alpha: np.ndarray, where=None) -> np.ndarray:
    """The mask of an image with transparency (``colour`` ``H x W x C``, ``alpha`` ``H x W``): its colour
    (0 background) while the alpha is uniform (opaque); its alpha (0 background) where only the alpha
    varies, as in an object cut out of a white or black layer. Where both vary, they must agree."""
    by_colour = colour.any(axis=-1)
    if alpha.size == 0 or (alpha == alpha.flat[0]).all():
        return by_colour.astype(np.uint8)
    by_alpha = alpha != 0
    if (colour == colour[0, 0]).all() or np.array_equal(by_colour, by_alpha):
        return by_alpha.astype(np.uint8)
    raise FssError(
        "mask with transparency whose colour and alpha mark different pixels: keep the object in one of "
        "them (alpha with a uniform colour, or colour on an opaque image)",
        where,
    )


def read_mask(path) -> np.ndarray:
    """``H x W`` uint8: 0 background, 1 foreground, 255 ignored (see the module docstring); ``path``
    may be a file object (a served request's bytes)."""
    return parse_mask(open_image(path, "mask"), path if isinstance(path, (str, os.PathLike)) else None)


@lru_cache(maxsize=16)
def _norm_tensors(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)  # built once, not per query


def image_tensor(img: Image.Image, size: int, normalisation: dict) -> torch.Tensor:
    """``3 x size x size`` float32: bilinear resize, [0, 1], then ``(x - mean) / std`` with the model's
    ``meta["normalisation"]`` (ImageNet's for PANet: the official pipeline)."""
    mean, std = _norm_tensors(tuple(normalisation["mean"]), tuple(normalisation["std"]))
    resized = img.resize((size, size), Image.BILINEAR) if img.size != (size, size) else img
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - mean) / std


def mask_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """``size x size`` uint8 (0/1/255), nearest-neighbour resize as the official label pipeline."""
    if mask.shape != (size, size):
        mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    return torch.from_numpy(np.array(mask, dtype=np.uint8))  # a writable copy


# -- writing -------------------------------------------------------------------------------------------
def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    _atomic_write(Path(path), write)


def atomic_write_bytes(path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically, verified (the file holds every byte); its sha256.

    Encoders such as Pillow's write to the file descriptor themselves and let a short write pass (a
    file-size limit truncates a JPEG without an error): encode into memory, then write through this.
    """
    sha = hashlib.sha256(data).hexdigest()

    def write(f):
        f.write(data)
        f.flush()
        if os.fstat(f.fileno()).st_size != len(data):
            raise OSError(errno.EIO, f"only part of the {len(data)} bytes were written", str(path))

    _atomic_write(Path(path), write, sha)
    return sha


def _atomic_write(path: Path, write, sha: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}.tmp"
    journal("temporary", tmp)  # recorded before it exists: a kill at any point leaves it known
    try:
        with open(tmp, "xb") as f:
            write(f)
        if sha is not None:
            journal("output", path, sha)  # fss wrote it, even if killed before recording it elsewhere
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # write errors (disk full...) name no file
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def journal(kind: str, path: Path, sha: str | None = None) -> None:
    """Record a ``temporary`` or an ``output`` (with its sha256) in the journal of the locked folder
    holding ``path``, if any."""
    if not _journals:
        return
    parent = path.parent.resolve()
    for folder in (parent, *parent.parents):
        fd = _journals.get(folder)
        if fd is not None:
            record = {kind: str((parent / path.name).relative_to(folder))}
            if sha is not None:
                record["sha256"] = sha
            try:
                os.write(fd, (json.dumps(record) + "\n").encode())
            except OSError as exc:  # a full disk or a file-size limit: say which file
                raise OSError(exc.errno, exc.strerror, str(folder / LOCK_FILE)) from None
            return


def read_journal(folder: Path) -> list[dict]:
    """The records of ``folder``'s journal (lines that are not fss's records are ignored)."""
    try:
        text = (folder / LOCK_FILE).read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        name = record.get("temporary", record.get("output")) if isinstance(record, dict) else None
        if isinstance(name, str) and not Path(name).is_absolute() and ".." not in Path(name).parts:
            records.append(record)
    return records


def journal_outputs(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of the last file fss wrote there, as ``folder``'s journal records."""
    records = read_journal(folder)
    return {r["output"]: r["sha256"] for r in records if "output" in r and isinstance(r.get("sha256"), str)}


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries a killed :func:`atomic_write` left under ``folder`` (hold its lock): only
    files its journal records and named as fss names them; a user's ``.notes.tmp`` stays. The journal
    then keeps one record per output that still exists."""
    fd = _journals.get(folder.resolve())
    if fd is None:
        raise RuntimeError(f"remove_stale_temporaries needs the lock of {folder}")
    removed = []
    for record in read_journal(folder):
        path = folder / record.get("temporary", "")
        if "temporary" in record and TEMP_FILE.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)
    outputs = {name: sha for name, sha in journal_outputs(folder).items() if (folder / name).is_file()}
    os.ftruncate(fd, 0)
    os.write(fd, "".join(json.dumps({"output": n, "sha256": s}) + "\n" for n, s in outputs.items()).encode())
    return removed


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold an exclusive lock on an output folder: a second writer is refused, not interleaved.

    The lock file is also the folder's journal: while the lock is held, :func:`atomic_write` records
    there every temporary it creates under the folder, and :func:`atomic_write_bytes` the sha256 of
    every file it puts in place, so that fss later removes only its own temporaries and knows which
    files it wrote even when killed before recording them elsewhere.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FssError("another fss command is writing into this folder", folder) from None
        _journals[folder.resolve()] = fd
        try:
            yield
        finally:
            del _journals[folder.resolve()]
    finally:
        os.close(fd)


def check_output_folder(folder: Path, what: str = "--out", need_bytes: int = 0) -> None:
    """Before any work: ``folder`` is (or can be made) a writable folder with ``need_bytes`` free."""
    if folder.exists() and not folder.is_dir():
        raise FssError(f"{what} is a file, not a folder", folder)
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FssError(f"{what} is inside a file, not a folder", parent)
            break
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}write-probe.", suffix=".tmp")
    os.close(fd)
    Path(probe).unlink(missing_ok=True)  # another process may clean temporaries meanwhile
    check_free_space(folder, need_bytes, what)


def check_output_file(path: Path, what: str) -> None:
    """Before any work: ``path`` can be written as a file (not a folder; its folder writable)."""
    if path.is_dir():
        raise FssError(f"{what} is a folder, not a file", path)
    check_output_folder(path.parent, f"the folder of {what}")


def check_free_space(folder: Path, need_bytes: int, what: str = "--out") -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise FssError(
            f"not enough free space for {what}: {free / 2**20:.0f} MiB free, about "
            f"{need_bytes / 2**20:.0f} MiB needed",
            folder,
        )


def write_json(path, obj) -> str:
    return atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def encoded(img: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, **options)
    return buffer.getvalue()


def write_label_png(path, labels: np.ndarray) -> str:
    """Labels (uint8, 0 background, k class k) as a palette PNG with the VOC colours; its sha256."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    return atomic_write_bytes(path, encoded(img, format="PNG"))


def overlay_image(
    img: Image.Image, labels: np.ndarray, class_names: list[str], alpha: float = 0.5
) -> Image.Image:
    """The image with each class coloured (VOC palette) and a legend of the classes present."""
    palette = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)
    base = np.asarray(img.convert("RGB"), dtype=np.float32)
    fg = labels > 0
    blended = base.copy()
    blended[fg] = (1 - alpha) * base[fg] + alpha * palette[labels[fg]]
    out = Image.fromarray(blended.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    y = 4
    for k, name in enumerate(class_names, start=1):
        if not (labels == k).any():
            continue
        colour = tuple(int(c) for c in palette[k])
        draw.rectangle([4, y, 18, y + 12], fill=colour, outline=(255, 255, 255))
        draw.text((23, y), name, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
        y += 16
    return out


def write_overlay(path, img: Image.Image, labels: np.ndarray, class_names: list[str]) -> str:
    """The overlay as a JPEG; its sha256."""
    out = overlay_image(img, labels, class_names)
    return atomic_write_bytes(path, encoded(out, format="JPEG", quality=90))
