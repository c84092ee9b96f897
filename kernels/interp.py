"""Bilinear interpolation as a matrix, so that its adjoint can be applied to masks.

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
