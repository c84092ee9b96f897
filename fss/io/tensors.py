"""Images and parsed masks as the model's input tensors, resized as the official pipeline does."""

from functools import lru_cache

import numpy as np
import torch
from PIL import Image


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
