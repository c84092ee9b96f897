"""Triton kernel of :func:`fss.kernels.match` and :func:`fss.kernels.segment` (CUDA; CPU under
``TRITON_INTERPRET=1``).

One launch per batch: a program owns ``BLOCK_Y`` output rows of one query. It computes the
``scale * cosine`` logits of the few feature rows those output rows interpolate from (``tl.dot`` over
channel tiles; recomputing a shared row in two neighbouring programs is cheaper than a second launch),
parks them in a per-program scratch tile, then upsamples them bilinearly and either writes the logits
(``match``) or reduces them to uint8 labels and the max softmax probability (``segment``), so the image-size
float maps are never written on the segment path.
"""

import torch
import triton
import triton.language as tl

from fss.constants import COSINE_EPS, PROTOTYPE_SCALE
from fss.kernels.interp import as_size
from fss.kernels.triton_interp import FP_FUSION, bilinear_taps, interp_scale

BLOCK_Y = 16  # output rows per program
BLOCK_X = 64  # output columns per tile
BLOCK_C = 32  # channels per tile of the cosine


@triton.jit
def head_kernel(
    qry_ptr, proto_ptr, scratch_ptr, logits_ptr, labels_ptr, prob_ptr,
    Q, C, h, w, H, W, scale_h, scale_w, logit_scale, eps,
    P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
    WRITE_LOGITS: tl.constexpr, WRITE_LABELS: tl.constexpr, WRITE_PROB: tl.constexpr,
):  # fmt: skip
    bq = tl.program_id(0).to(tl.int64)
    y_block = tl.program_id(1)
    b = bq // Q
    y_start = y_block * BLOCK_Y
    # (1) Logits of the band of feature rows [r_lo, r_lo + BLOCK_R) these output rows read.
    r_lo = bilinear_taps(y_start, scale_h, h)[0]
    offs_l = tl.arange(0, BLOCK_R * BLOCK_W)
    band_rows = r_lo + offs_l // BLOCK_W
    band_cols = offs_l % BLOCK_W
    l_ok = (band_rows < h) & (band_cols < w)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    q_base = qry_ptr + bq * C * h * w + band_rows * w + band_cols
    p_base = proto_ptr + b * P * C + offs_p * C
    norm2_p = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c_start in range(0, C, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        pt = tl.load(p_base[:, None] + offs_c[None, :], mask=p_ok[:, None] & (offs_c < C)[None, :], other=0.0)
        norm2_p += tl.sum(pt.to(tl.float32) * pt.to(tl.float32), axis=1)
    inv_norm_p = 1.0 / tl.maximum(tl.sqrt(norm2_p), eps)
    acc = tl.zeros((BLOCK_P, BLOCK_R * BLOCK_W), dtype=tl.float32)
    norm2_q = tl.zeros((BLOCK_R * BLOCK_W,), dtype=tl.float32)
    for c_start in range(0, C, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        pt = tl.load(p_base[:, None] + offs_c[None, :], mask=p_ok[:, None] & c_ok[None, :], other=0.0)
        qt = tl.load(q_base[None, :] + offs_c[:, None] * h * w, mask=c_ok[:, None] & l_ok[None, :], other=0.0)
        qt = qt.to(tl.float32)
        acc = tl.dot(pt.to(tl.float32) * inv_norm_p[:, None], qt, acc, input_precision="ieee")
        norm2_q += tl.sum(qt * qt, axis=0)
    low = acc * (logit_scale / tl.maximum(tl.sqrt(norm2_q), eps))[None, :]
    scratch = scratch_ptr + (bq * tl.num_programs(1) + y_block) * BLOCK_P * BLOCK_R * BLOCK_W
    tl.store(scratch + offs_p[:, None] * BLOCK_R * BLOCK_W + offs_l[None, :], low)
    tl.debug_barrier()  # the band is read back below by other threads of this program

    # (2) Bilinear upsampling of the band, then logits or argmax (+ online softmax) per pixel.
    offs_y = y_start + tl.arange(0, BLOCK_Y)
    y_ok = offs_y < H
    y0, y1, wy0, wy1 = bilinear_taps(offs_y, scale_h, h)
    band_y0 = (y0 - r_lo) * BLOCK_W
    band_y1 = (y1 - r_lo) * BLOCK_W
    for x_start in range(0, W, BLOCK_X):
        offs_x = x_start + tl.arange(0, BLOCK_X)
        ok = y_ok[:, None] & (offs_x < W)[None, :]
        x0, x1, wx0, wx1 = bilinear_taps(offs_x, scale_w, w)
        i00 = band_y0[:, None] + x0[None, :]
        i01 = band_y0[:, None] + x1[None, :]
        i10 = band_y1[:, None] + x0[None, :]
        i11 = band_y1[:, None] + x1[None, :]
        pixel = offs_y[:, None] * W + offs_x[None, :]
        best = tl.full((BLOCK_Y, BLOCK_X), float("-inf"), dtype=tl.float32)
        label = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.int32)
        total = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
        for p in tl.static_range(P):
            band = scratch + p * BLOCK_R * BLOCK_W
            top = (
                tl.load(band + i00, mask=ok, other=0.0) * wx0[None, :]
                + tl.load(band + i01, mask=ok, other=0.0) * wx1[None, :]
            )
            bot = (
                tl.load(band + i10, mask=ok, other=0.0) * wx0[None, :]
                + tl.load(band + i11, mask=ok, other=0.0) * wx1[None, :]
            )
            v = top * wy0[:, None] + bot * wy1[:, None]
            if WRITE_LOGITS:
                tl.store(logits_ptr + (bq * P + p) * H * W + pixel, v, mask=ok)
            if WRITE_LABELS:
                new_best = tl.maximum(best, v)
                if WRITE_PROB:
                    total = total * tl.exp(best - new_best) + tl.exp(v - new_best)
                label = tl.where(v > best, p, label)  # strict: ties keep the first class, as torch.argmax
                best = new_best
        if WRITE_LABELS:
            tl.store(labels_ptr + bq * H * W + pixel, label, mask=ok)
        if WRITE_PROB:
            tl.store(prob_ptr + bq * H * W + pixel, 1.0 / total, mask=ok)


def launch_head(qry_feats, protos, out_size, scale, logits=None, labels=None, prob=None):
    qry = qry_feats.detach().contiguous()
    prt = protos.detach().contiguous()
    B, Q, C, h, w = qry.shape
    P = prt.shape[1]
    H, W = as_size(out_size)
    assert prt.shape == (B, P, C) and prt.device == qry.device
    for out, shape in ((logits, (B, Q, P, H, W)), (labels, (B, Q, H, W)), (prob, (B, Q, H, W))):
        assert out is None or (out.shape == shape and out.is_contiguous() and out.device == qry.device)
    # Feature rows one program's BLOCK_Y output rows reach: span (BLOCK_Y - 1) * h / H, two taps, slack.
    band = int((BLOCK_Y - 1) * h / H + 1e-6) + 3
    block_r, block_w = triton.next_power_of_2(band), max(16, triton.next_power_of_2(w))
    block_p = max(16, triton.next_power_of_2(P))
    grid = (B * Q, triton.cdiv(H, BLOCK_Y))
    scratch = torch.empty(
        grid[0] * grid[1] * block_p * block_r * block_w, device=qry.device, dtype=torch.float32
    )
    head_kernel[grid](
        qry, prt, scratch, qry if logits is None else logits, qry if labels is None else labels,
        qry if prob is None else prob, Q, C, h, w, H, W, interp_scale(h, H), interp_scale(w, W), float(scale),
        COSINE_EPS, P=P, BLOCK_P=block_p, BLOCK_C=BLOCK_C, BLOCK_R=block_r, BLOCK_W=block_w, BLOCK_Y=BLOCK_Y,
        BLOCK_X=BLOCK_X, WRITE_LOGITS=logits is not None, WRITE_LABELS=labels is not None,
        WRITE_PROB=prob is not None,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def match_triton(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE):
    """Logits ``B x Q x P x H x W`` in the features' dtype."""
    B, Q = qry_feats.shape[:2]
    logits = torch.empty(
        B, Q, protos.shape[1], *as_size(out_size), device=qry_feats.device, dtype=qry_feats.dtype
    )
    launch_head(qry_feats, protos, out_size, scale, logits=logits)
    return logits


def segment_triton(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE, return_prob=False):
    """uint8 labels ``B x Q x H x W`` [+ max softmax probability in the features' dtype]."""
    B, Q = qry_feats.shape[:2]
    size = as_size(out_size)
    labels = torch.empty(B, Q, *size, device=qry_feats.device, dtype=torch.uint8)
    prob = torch.empty(B, Q, *size, device=qry_feats.device, dtype=qry_feats.dtype) if return_prob else None
    launch_head(qry_feats, protos, out_size, scale, labels=labels, prob=prob)
    return (labels, prob) if return_prob else labels
