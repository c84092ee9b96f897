"""Triton kernels of :func:`fss.kernels.prototypes` (CUDA; CPU under ``TRITON_INTERPRET=1``).

Two launches per batch of episodes:
1. ``pool_masks_kernel``: every fg / bg mask pooled down to feature resolution by the adjoint of the
   upsampling, ``A_H^T m A_W``, as two ``tl.dot`` per tile with the interpolation matrices built on the
   fly from their two taps per row (only the mask rows that reach the program's feature rows are read).
2. ``prototype_sums_kernel``: per channel block, the weighted sums of all shots' features, each
   normalised by its mask sum (= the sum of its pooled weights: bilinear rows sum to one) and averaged
   into the foreground prototypes and the background prototype.
"""

import torch
import triton
import triton.language as tl

from fss.constants import POOL_EPS
from fss.kernels.triton_interp import FP_FUSION, bilinear_taps, interp_scale

POOL_BLOCK_I = 16  # feature rows per program
POOL_BLOCK_Y = 32  # mask rows per tile
POOL_BLOCK_X = 64  # mask columns per tile
SUM_BLOCK_C = 16  # channels per program
SUM_BLOCK_Q = 256  # feature locations per tile


@triton.jit
def pool_masks_kernel(
    fg_ptr, bg_ptr, pooled_ptr, H, W, h, w, scale_h, scale_w, inv_scale_h,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    shot = tl.program_id(0).to(tl.int64)
    is_bg = tl.program_id(1)
    i_start = tl.program_id(2) * BLOCK_I
    mask_ptr = (fg_ptr if is_bg == 0 else bg_ptr) + shot * H * W
    offs_i = i_start + tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, BLOCK_J)
    # Mask rows whose taps reach feature rows [i_start, i_start + BLOCK_I), with a row of slack.
    y_lo = tl.maximum(((i_start - 0.5) * inv_scale_h - 0.5).to(tl.int32) - 1, 0)
    y_hi = tl.minimum(((i_start + BLOCK_I + 0.5) * inv_scale_h - 0.5).to(tl.int32) + 2, H)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for x_start in range(0, W, BLOCK_X):
        offs_x = x_start + tl.arange(0, BLOCK_X)
        x0, x1, wx0, wx1 = bilinear_taps(offs_x, scale_w, w)
        a_w = tl.where(x0[:, None] == offs_j[None, :], wx0[:, None], 0.0)  # BLOCK_X x BLOCK_J of A_W
        a_w += tl.where(x1[:, None] == offs_j[None, :], wx1[:, None], 0.0)
        rows = tl.zeros((BLOCK_I, BLOCK_X), dtype=tl.float32)  # (A_H^T m)[feature rows, mask columns]
        for y_start in range(y_lo, y_hi, BLOCK_Y):
            offs_y = y_start + tl.arange(0, BLOCK_Y)
            y_ok = offs_y < y_hi
            y0, y1, wy0, wy1 = bilinear_taps(offs_y, scale_h, h)
            a_h_t = tl.where(offs_i[:, None] == y0[None, :], wy0[None, :], 0.0)  # BLOCK_I x BLOCK_Y of A_H^T
            a_h_t += tl.where(offs_i[:, None] == y1[None, :], wy1[None, :], 0.0)
            m_ok = y_ok[:, None] & (offs_x < W)[None, :]
            m = tl.load(mask_ptr + offs_y[:, None] * W + offs_x[None, :], mask=m_ok, other=0).to(tl.float32)
            rows = tl.dot(a_h_t, m, rows, input_precision="ieee")
        acc = tl.dot(rows, a_w, acc, input_precision="ieee")
    out = pooled_ptr + (shot * 2 + is_bg) * h * w
    tl.store(
        out + offs_i[:, None] * w + offs_j[None, :], acc, mask=(offs_i < h)[:, None] & (offs_j < w)[None, :]
    )


@triton.jit
def prototype_sums_kernel(
    feat_ptr, pooled_ptr, valid_ptr, protos_ptr, counts_ptr, N, K, C, HW, eps,
    HAS_SHOT_MASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    c_block = tl.program_id(1)
    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_k = tl.arange(0, BLOCK_K)
    bg = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n in range(N):
        way = b * N + n
        if HAS_SHOT_MASK:
            n_valid = tl.sum(tl.load(valid_ptr + way * K + offs_k, mask=offs_k < K, other=0).to(tl.float32))
        else:
            n_valid = K * 1.0
        fg = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for k in range(K):
            shot = (way * K + k).to(tl.int64)
            valid = tl.load(valid_ptr + shot).to(tl.int32) if HAS_SHOT_MASK else 1
            if valid != 0:
                w_fg = pooled_ptr + shot * 2 * HW
                x_base = feat_ptr + (shot * C + offs_c[:, None]) * HW
                sum_fg = tl.zeros((BLOCK_C,), dtype=tl.float32)
                sum_bg = tl.zeros((BLOCK_C,), dtype=tl.float32)
                wsum_fg = tl.zeros((BLOCK_Q,), dtype=tl.float32)
                wsum_bg = tl.zeros((BLOCK_Q,), dtype=tl.float32)
                for q_start in range(0, HW, BLOCK_Q):
                    offs_q = q_start + tl.arange(0, BLOCK_Q)
                    q_ok = offs_q < HW
                    wf = tl.load(w_fg + offs_q, mask=q_ok, other=0.0)
                    wb = tl.load(w_fg + HW + offs_q, mask=q_ok, other=0.0)
                    x = tl.load(x_base + offs_q[None, :], mask=c_ok[:, None] & q_ok[None, :], other=0.0)
                    x = x.to(tl.float32)
                    sum_fg += tl.sum(x * wf[None, :], axis=1)
                    sum_bg += tl.sum(x * wb[None, :], axis=1)
                    wsum_fg += wf
                    wsum_bg += wb
                count_fg = tl.sum(wsum_fg, axis=0)
                count_bg = tl.sum(wsum_bg, axis=0)
                fg += sum_fg / (count_fg + eps)
                bg += sum_bg / ((count_bg + eps) * n_valid)
                if c_block == 0:
                    tl.store(counts_ptr + shot * 2, count_fg)
                    tl.store(counts_ptr + shot * 2 + 1, count_bg)
            elif c_block == 0:
                tl.store(counts_ptr + shot * 2, 0.0)
                tl.store(counts_ptr + shot * 2 + 1, 0.0)
        tl.store(protos_ptr + (b * (N + 1) + 1 + n) * C + offs_c, fg / n_valid, mask=c_ok)
    tl.store(protos_ptr + b * (N + 1) * C + offs_c, bg / N, mask=c_ok)


def as_kernel_mask(fg, bg):
    """bool / uint8 masks are read as they are; any other pair as fp32."""
    if fg.dtype == bg.dtype and fg.dtype in (torch.bool, torch.uint8, torch.float32):
        return fg.detach().contiguous(), bg.detach().contiguous()
    return fg.detach().to(torch.float32).contiguous(), bg.detach().to(torch.float32).contiguous()


def prototypes_triton(supp_feats, supp_fg, supp_bg, shot_mask=None):
    """``(protos B x (1+N) x C, pooled B x N x K x 2 x h x w, counts B x N x K x 2)``; fp32 accumulation."""
    B, N, K, C, h, w = supp_feats.shape
    H, W = supp_fg.shape[-2:]
    feats = supp_feats.detach().contiguous()
    fg, bg = as_kernel_mask(supp_fg, supp_bg)
    valid = feats if shot_mask is None else shot_mask.detach().contiguous()  # feats: unused placeholder
    device = feats.device
    protos = torch.empty(B, 1 + N, C, device=device, dtype=feats.dtype)
    pooled = torch.empty(B, N, K, 2, h, w, device=device, dtype=torch.float32)
    counts = torch.empty(B, N, K, 2, device=device, dtype=torch.float32)
    for t in (feats, fg, bg, valid):
        assert t.is_contiguous() and t.device == device
    assert fg.shape == bg.shape == (B, N, K, H, W)
    assert shot_mask is None or valid.shape == (B, N, K)

    pool_masks_kernel[(B * N * K, 2, triton.cdiv(h, POOL_BLOCK_I))](
        fg, bg, pooled, H, W, h, w, interp_scale(h, H), interp_scale(w, W), H / h,
        BLOCK_I=POOL_BLOCK_I, BLOCK_J=max(16, triton.next_power_of_2(w)), BLOCK_Y=POOL_BLOCK_Y,
        BLOCK_X=POOL_BLOCK_X,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    prototype_sums_kernel[(B, triton.cdiv(C, SUM_BLOCK_C))](
        feats, pooled, valid, protos, counts, N, K, C, h * w, POOL_EPS,
        HAS_SHOT_MASK=shot_mask is not None, BLOCK_C=SUM_BLOCK_C, BLOCK_Q=SUM_BLOCK_Q,
        BLOCK_K=triton.next_power_of_2(K),
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return protos, pooled, counts
