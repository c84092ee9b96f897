"""Bilinear taps inside Triton kernels; imported only by the triton implementations (never at
``import fss.kernels``)."""

import numpy as np
import triton
import triton.language as tl

# Launch option of every fss kernel: multiply-adds as fma, as torch's CPU (AVX2) and CUDA bilinear
# kernels compute them (and explicit, which Triton 3.9 asks for).
FP_FUSION = True


def interp_scale(in_size: int, out_size: int) -> float:
    """torch's ``in / out`` computed in float32 (exactly representable as a kernel's fp32 argument)."""
    return float(np.float32(in_size) / np.float32(out_size))


@triton.jit
def bilinear_taps(dst, scale, in_size):
    """torch's upsample_bilinear2d (align_corners=False) for output indices ``dst``: ``(i0, i1, w0, w1)``.

    ``src = max(scale * (dst + 0.5) - 0.5, 0)`` with one fma, as torch's x86 kernels compute it.
    """
    src = tl.maximum(tl.fma(scale, dst.to(tl.float32) + 0.5, -0.5), 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0, so truncation is floor
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, 1.0 - lam, lam
