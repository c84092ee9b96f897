"""The page's mask editor: painted layers (RGBA) to an ``H x W`` mask, and a mask back to a layer."""

import numpy as np
from PIL import Image

from fss.constants import IGNORE_INDEX
from fss.demo.session import DemoError

BRUSH = (255, 0, 0)  # the editor's brush colour: foreground
IGNORED = (128, 128, 128)  # ignored pixels of a mask file are shown grey


def mask_from_layers(
    layers: list[np.ndarray], size: tuple[int, int], base: np.ndarray | None = None
) -> np.ndarray:
    """Painted editor layers (``H x W x 4`` RGBA) -> ``H x W`` uint8 mask, 1 wherever anything is painted.

    ``base`` (a mask file's mask: 0 / 1 / 255) is kept and the paint is added to it as foreground.
    The editor's canvas may differ from the image by rounding: paint is resized (nearest) to ``size``.
    """
    mask = np.zeros((size[1], size[0]), np.uint8) if base is None else base.copy()
    for layer in layers:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[-1] != 4:
            raise DemoError("the editor sent a layer that is not RGBA")
        painted = (layer[..., 3] > 0).astype(np.uint8)
        if painted.shape != mask.shape:
            painted = np.asarray(Image.fromarray(painted).resize(size, Image.NEAREST))
        mask[painted == 1] = 1
    return mask


def mask_layer(mask: np.ndarray, alpha: int = 255) -> np.ndarray:
    """``H x W`` mask -> ``H x W x 4`` RGBA overlay: foreground in the brush colour, ignored grey."""
    layer = np.zeros((*mask.shape, 4), np.uint8)
    layer[mask == 1] = (*BRUSH, alpha)
    layer[mask == IGNORE_INDEX] = (*IGNORED, alpha)
    return layer
