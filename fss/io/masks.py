"""Masks: the one parser of fss (files, PIL images, arrays) and the one check of a support shot.

Palette PNGs (mode P, VOC style) read 0 as background, 255 as ignored and any other index as
foreground; every other mode (grey, 16-bit grey, RGB, binary) reads 0 as background and anything else
as foreground (FSS-1000 stores 0/255). With transparency (RGBA, LA), the colour is read while the
alpha is uniform, the alpha (0 background) while the colour is: :func:`colour_or_alpha`. An array is
read as a greyscale image (``H x W x 2`` / ``x 4``: grey / RGB and alpha), except one that holds only
0, 1 and 255 with at least one 1: that is an already parsed mask (what :func:`read_mask` returns).
Parsed masks are ``uint8`` with 0 background, 1 foreground, 255 ignored. Masks have no orientation:
they refer to the image as displayed.
"""

import os

import numpy as np
from PIL import Image

from fss.constants import IGNORE_INDEX
from fss.errors import EmptyMaskError, FssError, ShotError
from fss.io.images import decode_image, named


def parse_mask(mask, where=None) -> np.ndarray:
    """A mask file, PIL image or array -> ``H x W`` uint8: 0 background, 1 foreground, 255 ignored.

    The one mask parser of fss (rules in the module docstring). ``where``: the file named in errors (a
    path given as ``mask`` names itself).
    """
    if isinstance(mask, (str, os.PathLike)):
        mask, where = decode_image(mask, "mask"), mask
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
    return parse_mask(decode_image(path, "mask"), named(path))


def check_shot(image_size: tuple[int, int], mask: np.ndarray, where=None) -> None:
    """A support shot's parsed ``mask`` fits its image of ``image_size`` (w, h) as displayed and marks
    some foreground: :class:`ShotError` (:class:`EmptyMaskError`) otherwise. ``where``: the mask file."""
    width, height = image_size
    if mask.shape != (height, width):
        hint = ""
        if mask.shape == (width, height):
            hint = "; masks refer to the image as displayed (EXIF orientation applied)"
        raise ShotError(
            f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size {width}x{height}{hint}", where
        )
    if not (mask == 1).any():
        raise EmptyMaskError("mask has no foreground pixel", where)


def read_support_shots(
    pairs: dict, box_supports: str = "mask"
) -> tuple[list[str], list[list[Image.Image]], list[list[np.ndarray]]]:
    """A support folder's ``{class: [(image, mask), ...]}`` (:func:`fss.io.folders.find_support_pairs`)
    read and checked shot by shot: class names, per-class images at full size (no draft decoding: a mask
    fits its image pixel for pixel) and parsed masks; a bad shot is an error naming its mask file. A box
    file in place of a mask becomes a mask as ``box_supports`` says (:func:`fss.io.boxes.boxes_mask`)."""
    from fss.io.boxes import boxes_mask, check_box_mode, is_box_file, read_boxes
    from fss.io.images import read_image

    check_box_mode(box_supports)
    classes, images, masks = [], [], []
    for name, class_pairs in pairs.items():
        class_images, class_masks = [], []
        for image_path, mask_path in class_pairs:
            if is_box_file(mask_path):
                boxes = read_boxes(mask_path)  # a malformed file is refused before its image is decoded
                image = read_image(image_path, draft=False)
                mask = boxes_mask(image, boxes, box_supports, mask_path)
            else:
                image, mask = read_image(image_path, draft=False), read_mask(mask_path)
                check_shot(image.size, mask, mask_path)
            class_images.append(image)
            class_masks.append(mask)
        classes.append(name)
        images.append(class_images)
        masks.append(class_masks)
    return classes, images, masks
