"""Triton kernel of :func:`fss.kernels.logistic.segment` (CUDA; CPU under ``TRITON_INTERPRET=1``).

The 1x1 products ``w . f + b`` are one batched GEMM at feature resolution (cuBLAS, through torch);
one launch then fuses, per output pixel, the bilinear upsampling of every shot's map, the max over
shots (K-shot OR), the argmax over ways, the threshold and the probability: only uint8 labels (and
the probability when asked) are written at image size. A program owns ``BLOCK_Y`` rows of one query;
the per-axis taps come from :func:`fss.kernels.logistic.taps`, shared with the reference.
"""

import torch
import triton
import triton.language as tl

from fss.kernels.interp import as_size
from fss.kernels.logistic import axes, low_logits, taps
from fss.kernels.triton_interp import FP_FUSION

BLOCK_Y = 16
BLOCK_X = 64


@triton.jit
def or_head_kernel(
    low_ptr, y0_ptr, y1_ptr, wy_ptr, x0_ptr, x1_ptr, wx_ptr, labels_ptr, prob_ptr,
    N, K, h, w, H, W,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, WRITE_PROB: tl.constexpr,
):  # fmt: skip
    bq = tl.program_id(0).to(tl.int64)
    offs_y = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    y_ok = offs_y < H
    y0 = tl.load(y0_ptr + offs_y, mask=y_ok, other=0)
    y1 = tl.load(y1_ptr + offs_y, mask=y_ok, other=0)
    wy = tl.load(wy_ptr + offs_y, mask=y_ok, other=0.0)[:, None]
    base = low_ptr + bq * N * K * h * w
    for x_start in range(0, W, BLOCK_X):
        offs_x = x_start + tl.arange(0, BLOCK_X)
        x_ok = offs_x < W
        ok = y_ok[:, None] & x_ok[None, :]
        x0 = tl.load(x0_ptr + offs_x, mask=x_ok, other=0)
        x1 = tl.load(x1_ptr + offs_x, mask=x_ok, other=0)
        wx = tl.load(wx_ptr + offs_x, mask=x_ok, other=0.0)[None, :]
        i00 = y0[:, None] * w + x0[None, :]
        i01 = y0[:, None] * w + x1[None, :]
        i10 = y1[:, None] * w + x0[None, :]
        i11 = y1[:, None] * w + x1[None, :]
        best = tl.full((BLOCK_Y, BLOCK_X), float("-inf"), dtype=tl.float32)
        label = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.int32)
        for n in range(N):
            way = tl.full((BLOCK_Y, BLOCK_X), float("-inf"), dtype=tl.float32)
            for k in range(K):
                m = base + (n * K + k) * h * w
                top = (
                    tl.load(m + i00, mask=ok, other=0.0) * (1 - wx)
                    + tl.load(m + i01, mask=ok, other=0.0) * wx
                )
                bot = (
                    tl.load(m + i10, mask=ok, other=0.0) * (1 - wx)
                    + tl.load(m + i11, mask=ok, other=0.0) * wx
                )
                way = tl.maximum(way, top * (1 - wy) + bot * wy)
            label = tl.where(way > best, n + 1, label)  # strict: ties keep the lowest way
            best = tl.maximum(best, way)
        pixel = offs_y[:, None] * W + offs_x[None, :]
        tl.store(labels_ptr + bq * H * W + pixel, tl.where(best > 0, label, 0).to(tl.uint8), mask=ok)
        if WRITE_PROB:
            tl.store(prob_ptr + bq * H * W + pixel, 1.0 / (1.0 + tl.exp(-tl.abs(best))), mask=ok)


def segment_triton(qry_feats, weights, out_size, geometry=None, return_prob=False):
    """uint8 labels ``B x Q x H x W`` [+ the label's probability, float32]."""
    low = low_logits(qry_feats.float(), weights.float()).contiguous()
    B, Q, N, K, h, w = low.shape
    H, W = as_size(out_size)
    ay, ax = axes(geometry, (H, W))
    y0, y1, wy = (t.contiguous() for t in taps(H, h, ay, low.device))
    x0, x1, wx = (t.contiguous() for t in taps(W, w, ax, low.device))
    labels = torch.empty(B, Q, H, W, device=low.device, dtype=torch.uint8)
    prob = torch.empty(B, Q, H, W, device=low.device) if return_prob else None
    grid = (B * Q, triton.cdiv(H, BLOCK_Y))
    or_head_kernel[grid](
        low, y0, y1, wy, x0, x1, wx, labels, labels if prob is None else prob, N, K, h, w, H, W,
        BLOCK_Y=BLOCK_Y, BLOCK_X=BLOCK_X, WRITE_PROB=return_prob, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return (labels, prob) if return_prob else labels
