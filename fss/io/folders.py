"""Support and query folders: which files are images, which are masks, and of which class.

A support folder is ``root/<class>/<stem>.<ext>`` + the mask ``<stem>_mask.png`` (or ``<stem>.png``
beside a non-PNG image), or a flat folder of such pairs (one class named after the folder). Where the
reader takes them (``boxes=True``), a box file ``<stem>.box.json`` / ``<stem>.box.txt``
(:mod:`fss.io.boxes`) may stand in for the mask; an image with both a mask and a box file is an error
(which one was meant is the user's to say).
"""

import warnings
from collections.abc import Callable
from pathlib import Path

from fss.errors import FssError
from fss.io.boxes import box_file_names, box_file_stem, is_box_file

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MASK_SUFFIX = "_mask"
MAX_CLASSES = 254  # labels 1..254 in a uint8 PNG; 0 is background, 255 reads back as "ignored"
RESERVED_CLASS_NAMES = ("background",)  # label 0

Warn = Callable[[str, Path], None]


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


def class_pairs(folder: Path, warn: Warn | None = None, boxes: bool = False) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of one class folder, sorted by image name.

    A mask is ``<stem>_mask.png`` beside any image, or ``<stem>.png`` beside a non-PNG image (so
    ``foo_mask.jpg`` + ``foo_mask.png`` is a pair). Every other image file is an image. With ``boxes``,
    the "mask" of a pair may be a box file ``<stem>.box.json`` / ``.box.txt``.
    """
    files, skipped = scan_folder(folder)
    found_boxes = [p for p, why in skipped if boxes and why == "non-image file" and is_box_file(p)]
    box_files = {box_file_stem(p) + p.name[len(box_file_stem(p)) :].lower(): p for p in found_boxes}
    warn_skipped([s for s in skipped if s[0] not in found_boxes], warn)
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
        found += [box_files.pop(n) for n in box_file_names(image) if n in box_files]
        if not found:
            if image.stem.endswith(MASK_SUFFIX) and image.suffix.lower() == ".png":
                raise FssError("mask without image", image)
            expected = " or ".join(mask_candidates(image) + (box_file_names(image) if boxes else []))
            raise FssError(f"image without mask (expected {expected})", image)
        if len(found) > 1:
            what = ("two masks", "a mask and a box file", "two box files")[sum(map(is_box_file, found[:2]))]
            raise FssError(f"{what} for one image ({found[0].name} and {found[1].name}): keep one", image)
        mask = found[0]
        if mask.name in owner:
            raise FssError(f"one mask for two images ({owner[mask.name].name} and {image.name})", mask)
        owner[mask.name] = image
        pairs.append((image, mask))
    if box_files:
        orphan = box_files[min(box_files)]
        raise FssError(f"box file without image (expected an image {box_file_stem(orphan)}.*)", orphan)
    return pairs


def find_support_pairs(
    root, warn: Warn | None = None, boxes: bool = False
) -> dict[str, list[tuple[Path, Path]]]:
    """Class name -> sorted (image, mask) pairs of a support folder.

    ``root/<class>/...`` gives one class per subfolder (sorted by name); a flat ``root`` of pairs is
    one class named after the folder. Pairs beside class subfolders are an error (they would belong
    to no class). ``warn(message, path)`` hears of skipped entries (default: ``warnings.warn``).
    ``boxes``: a pair's mask may be a box file (:mod:`fss.io.boxes`; read by
    :func:`fss.io.masks.read_support_shots`); without it box files are skipped as non-image files.
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
        pairs = class_pairs(folder, warn, boxes)
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
