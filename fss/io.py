"""Files in and out: support folders, images and masks, palette PNGs, overlays, atomic writes.

Mask conventions (one place): palette PNGs (mode P, VOC style) read 0 as background, 255 as ignored
and any other index as foreground; every other mode (grey, RGB, binary) reads 0 as background and
anything else as foreground (FSS-1000 stores 0/255). Parsed masks are ``uint8`` with 0 background,
1 foreground, 255 ignored.
"""

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fss.constants import IGNORE_INDEX, voc_palette
from fss.errors import FssError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MASK_SUFFIX = "_mask"


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTS


def class_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of one class folder, sorted by image name.

    A mask is ``<stem>_mask.png`` beside any image, or ``<stem>.png`` beside a non-PNG image.
    """
    files = {p.name: p for p in folder.iterdir() if is_image_file(p)}
    masks = {name for name in files if name.lower().endswith(MASK_SUFFIX + ".png")}
    for name in masks:
        stem = name[: -len(MASK_SUFFIX + ".png")]
        if not any(other not in masks and Path(other).stem == stem for other in files):
            raise FssError("mask without image", files[name])
    non_png_stems = {Path(n).stem for n in files if n not in masks and Path(n).suffix.lower() != ".png"}
    images = [
        n
        for n in files
        if n not in masks and not (Path(n).suffix.lower() == ".png" and Path(n).stem in non_png_stems)
    ]
    pairs = []
    for name in sorted(images):
        stem = Path(name).stem
        mask = files.get(stem + MASK_SUFFIX + ".png") or files.get(stem + ".png")
        if mask is None or mask.name == name:
            raise FssError(
                f"image without mask (expected {stem}{MASK_SUFFIX}.png or {stem}.png)", files[name]
            )
        pairs.append((files[name], mask))
    return pairs


def find_support_pairs(root) -> dict[str, list[tuple[Path, Path]]]:
    """Class name -> sorted (image, mask) pairs of a support folder.

    ``root/<class>/...`` gives one class per subfolder (sorted by name); a flat ``root`` of pairs is
    one class named after the folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FssError("support folder not found", root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    folders = subdirs or [root]
    classes = {}
    for folder in folders:
        pairs = class_pairs(folder)
        if pairs:
            classes[folder.name] = pairs
        elif subdirs:
            raise FssError("class folder has no image+mask pair", folder)
    if not classes:
        raise FssError("support folder is empty: no image+mask pairs", root)
    return classes


def list_images(folder) -> tuple[list[Path], list[Path]]:
    """Sorted image files of a folder and, separately, the other files that were skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FssError("query folder not found", folder)
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in entries if is_image_file(p)]
    return images, [p for p in entries if p not in images]


def open_image(path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise FssError(f"{what} not found", path) from None
    except Exception:  # Pillow raises several types for truncated or foreign files
        raise FssError(f"unreadable or corrupt {what}", path) from None


def read_image(path) -> Image.Image:
    """An RGB image (pixels as stored: masks refer to the stored orientation)."""
    return open_image(path, "image").convert("RGB")


def read_mask(path) -> np.ndarray:
    """``H x W`` uint8: 0 background, 1 foreground, 255 ignored (see the module docstring)."""
    img = open_image(path, "mask")
    if img.mode == "P":
        index = np.asarray(img)
        mask = (index != 0).astype(np.uint8)
        mask[index == IGNORE_INDEX] = IGNORE_INDEX
        return mask
    values = np.asarray(img.convert("RGB"))
    return values.any(axis=-1).astype(np.uint8)


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


def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def write_label_png(path, labels: np.ndarray) -> None:
    """Labels (uint8, 0 background, k class k) as a palette PNG with the VOC colours."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    atomic_write(path, lambda f: img.save(f, format="PNG"))


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


def write_overlay(path, img: Image.Image, labels: np.ndarray, class_names: list[str]) -> None:
    out = overlay_image(img, labels, class_names)
    atomic_write(path, lambda f: out.save(f, format="JPEG", quality=90))
