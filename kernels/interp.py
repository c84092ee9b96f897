"""Bilinear interpolation as a matrix, so that its adjoint can be applied to masks and gradients.

``F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)`` equals
``A_H @ x @ A_W.T`` with ``A_H = bilinear_matrix(H, h)``; pooling an upsampled map against a mask
``m`` is then ``sum(x * (A_H.T @ m @ A_W))`` (the adjoint), without ever forming the upsampled map.
"""

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)
def _bilinear_matrix_cpu(out_size: int, in_size: int) -> torch.Tensor:
    # Interpolating the identity gives exactly torch's own weights (same float arithmetic).
    eye = torch.eye(in_size, dtype=torch.float32).view(in_size, 1, in_size, 1)
    rows = F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=False)
    return rows.view(in_size, out_size).t().contiguous()  # out_size x in_size


def bilinear_matrix(out_size: int, in_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``out_size x in_size`` matrix of torch's bilinear (align_corners=False) weights along one axis."""
    return _bilinear_matrix_cpu(int(out_size), int(in_size)).to(device=device, dtype=dtype)


def bilinear_adjoint(maps: torch.Tensor, low_hw: tuple[int, int]) -> torch.Tensor:
    """``... x H x W`` -> ``... x h x w``: ``A_H^T m A_W``, the adjoint of upsampling ``h x w -> H x W``.

    Applied to a mask it gives the weights that pool low-resolution features as their upsampled copy
    would be pooled; applied to a gradient it is the backward of the upsampling.
    """
    H, W = maps.shape[-2:]
    h, w = low_hw
    a_h = bilinear_matrix(H, h, maps.device, maps.dtype)
    a_w = bilinear_matrix(W, w, maps.device, maps.dtype)
    return a_h.t() @ maps @ a_w


def as_size(size) -> tuple[int, int]:
    """``int`` or ``(H, W)`` -> ``(H, W)``."""
    H, W = (size, size) if isinstance(size, int) else size
    if H < 1 or W < 1:
        raise ValueError(f"output size must be positive, got {size}")
    return int(H), int(W)
