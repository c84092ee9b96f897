"""OSLSM's head: a per-pixel logistic regression whose weights come from the support, K-shot OR, N ways.

Every shot ``k`` of way ``n`` gives ``D + 1`` numbers ``(w, b)``; at each feature location the logit
is ``w . f + b`` (the 1x1 product, one GEMM per query at feature resolution), upsampled bilinearly to
the output; the way's logit is the max over its shots (the logical OR of the K thresholded masks:
``max_k l_k > 0`` iff some ``sigmoid(l_k) > 0.5``, so the max is taken after the upsampling, on the
maps whose thresholds the OR combines). A pixel is labelled ``1 + argmax_n`` where the largest way
logit is positive, else background 0 (N-way: OSLSM is binary per way; overlaps go to the highest logit,
ties to the lowest way). The probability returned is that of the label: ``sigmoid(|max_n l_n|)``.

Upsampling geometry (``geometry``): ``None`` is torch's bilinear ``align_corners=False`` from the
feature grid to the output (as the prototype methods); ``(stride, offset, in_h, in_w)`` is an FCN's:
the feature coordinate of input pixel ``x`` is ``(x + offset) / stride`` (OSLSM's VGG16: stride 32,
offset 8.5, the official deconvolution with its crop), and an output of another size than the
``in_h x in_w`` input is that input frame resized (pixel centres, as ``align_corners=False``). Samples
are clamped to the grid (edge values), as torch's bilinear upsampling does.

Implementations (``impl``): ``torch`` (the reference: gathers of the four taps per pixel), ``separable``
(the CPU fast path, ``auto`` on CPU: upsampling as two small GEMMs per map, ``A_H @ L @ A_W^T``, in torch's
BLAS, folded into running maxima so only a few image-size maps exist at once), ``triton`` (GPU; one
fused kernel: upsampling, max over shots, argmax over ways, threshold, probability, without writing
image-size float maps). This op has no C++ kernel: ``native``, which a model passes to all its kernels
for their C++ paths, runs ``separable`` here. :func:`logits` (training) is differentiable.

Shapes: ``B`` episodes, ``Q`` queries, ``N`` ways, ``K`` shots, ``D`` feature channels, ``h x w``
features, ``H x W`` output.
"""

import torch

from fss.kernels.dispatch import resolve_impl, triton_available
from fss.kernels.interp import as_size

SEPARABLE = "separable"  # the CPU fast path (torch BLAS), also what impl="native" runs here


def check_head_inputs(qry_feats, weights):
    if qry_feats.dim() != 5:
        raise ValueError(f"qry_feats must be B x Q x D x h x w, got {tuple(qry_feats.shape)}")
    B, _, D = qry_feats.shape[:3]
    if weights.dim() != 4 or weights.shape[0] != B or weights.shape[3] != D + 1:
        raise ValueError(
            f"weights must be B x N x K x (D+1) = {B} x N x K x {D + 1}, got {tuple(weights.shape)}"
        )
    if weights.shape[1] > 255:
        raise ValueError(f"uint8 labels hold at most 255 ways, got {weights.shape[1]}")


def low_logits(qry_feats, weights):
    """``B x Q x D x h x w`` features, ``B x N x K x (D+1)`` weights -> ``B x Q x N x K x h x w``:
    ``w . f + b`` at every feature location (the 1x1 product)."""
    w, b = weights[..., :-1], weights[..., -1]
    return torch.einsum("bqdyx,bnkd->bqnkyx", qry_feats, w) + b[:, None, :, :, None, None]


def source_coords(out_n: int, feat_n: int, axis: tuple | None, device=None) -> torch.Tensor:
    """Feature coordinate (float64) of each of ``out_n`` output pixels; ``axis`` is ``None`` or
    ``(stride, offset, in_n)``."""
    x = torch.arange(out_n, dtype=torch.float64, device=device) + 0.5
    if axis is None:
        return x * (feat_n / out_n) - 0.5
    stride, offset, in_n = axis
    return (x * (in_n / out_n) - 0.5 + offset) / stride


def taps(out_n: int, feat_n: int, axis: tuple | None, device=None):
    """``(i0, i1, w1)`` per output pixel: the two feature indices and the weight of the second,
    the source coordinate clamped to the grid."""
    src = source_coords(out_n, feat_n, axis, device).clamp(0, feat_n - 1)
    i0 = src.floor().long().clamp(max=feat_n - 1)
    i1 = (i0 + 1).clamp(max=feat_n - 1)
    return i0, i1, (src - i0).clamp(0, 1).float()


def interp_matrix(out_n: int, feat_n: int, axis: tuple | None, device=None, dtype=torch.float32):
    """``out_n x feat_n`` interpolation weights along one axis (rows sum to 1)."""
    i0, i1, w1 = taps(out_n, feat_n, axis, device)
    rows = torch.arange(out_n, device=device)
    m = torch.zeros(out_n, feat_n, device=device, dtype=dtype)
    m.index_put_((rows, i0), (1 - w1).to(dtype), accumulate=True)
    m.index_put_((rows, i1), w1.to(dtype), accumulate=True)
    return m


def axes(geometry, out_size) -> tuple:
    """Per-axis geometry ``(y, x)``: ``None`` each, or ``(stride, offset, in_n)`` each."""
    if geometry is None:
        return None, None
    stride, offset, in_h, in_w = geometry
    return (stride, offset, in_h), (stride, offset, in_w)


def upsample_separable(low, out_size, geometry):
    """``... x h x w`` -> ``... x H x W`` as ``A_H @ low @ A_W^T`` (differentiable)."""
    H, W = as_size(out_size)
    h, w = low.shape[-2:]
    ay, ax = axes(geometry, (H, W))
    a_h = interp_matrix(H, h, ay, low.device, low.dtype)
    a_w = interp_matrix(W, w, ax, low.device, low.dtype)
    return a_h @ low @ a_w.t()


def logits(qry_feats, weights, out_size, geometry=None):
    """Way logits ``B x Q x N x H x W``: every shot's map upsampled, max over shots (differentiable)."""
    check_head_inputs(qry_feats, weights)
    return upsample_separable(low_logits(qry_feats, weights), out_size, geometry).amax(dim=3)


def labels_of(way_logits, return_prob=False):
    """``B x Q x N x H x W`` way logits -> uint8 labels (0 where no way is positive) [+ probability]."""
    best, index = way_logits.max(dim=2)  # ties: the lowest way, as torch.max
    labels = torch.where(best > 0, index + 1, torch.zeros_like(index)).to(torch.uint8)
    return (labels, torch.sigmoid(best.abs())) if return_prob else labels


def segment_torch(qry_feats, weights, out_size, geometry=None, return_prob=False):
    """The reference: each output pixel gathers its four taps of every shot's low-resolution map."""
    H, W = as_size(out_size)
    low = low_logits(qry_feats, weights)
    h, w = low.shape[-2:]
    ay, ax = axes(geometry, (H, W))
    y0, y1, wy = taps(H, h, ay, low.device)
    x0, x1, wx = taps(W, w, ax, low.device)
    wy, wx = wy[:, None], wx[None, :]
    top = low[..., y0[:, None], x0[None, :]] * (1 - wx) + low[..., y0[:, None], x1[None, :]] * wx
    bot = low[..., y1[:, None], x0[None, :]] * (1 - wx) + low[..., y1[:, None], x1[None, :]] * wx
    return labels_of((top * (1 - wy) + bot * wy).amax(dim=3), return_prob)


def segment_separable(qry_feats, weights, out_size, geometry=None, return_prob=False):
    """The CPU fast path: each shot's map upsampled as ``A_H @ L @ A_W^T`` (BLAS) and folded at once
    into a running max over shots, then over ways: a few ``B x Q x H x W`` maps, whatever N and K."""
    H, W = as_size(out_size)
    low = low_logits(qry_feats, weights)
    ay, ax = axes(geometry, (H, W))
    a_h = interp_matrix(H, low.shape[-2], ay, low.device, low.dtype)
    a_w = interp_matrix(W, low.shape[-1], ax, low.device, low.dtype).t()
    best = torch.full((*low.shape[:2], H, W), float("-inf"), device=low.device)
    labels = torch.zeros(best.shape, dtype=torch.uint8, device=low.device)
    for n in range(low.shape[2]):
        way = a_h @ low[:, :, n, 0] @ a_w
        for k in range(1, low.shape[3]):
            torch.maximum(way, a_h @ low[:, :, n, k] @ a_w, out=way)
        better = way > best  # strict: ties keep the lowest way
        labels[better] = n + 1
        best = torch.where(better, way, best)
    labels[best <= 0] = 0
    return (labels, torch.sigmoid(best.abs())) if return_prob else labels


def fast_impl(impl: str, tensor) -> str:
    """``auto``: ``triton`` on CUDA where importable, else ``separable``; ``native`` (the C++ choice of the
    other kernels; this op has no C++ kernel) is ``separable`` too."""
    if impl == "auto":
        return "triton" if tensor.device.type == "cuda" and triton_available() else SEPARABLE
    return SEPARABLE if impl in (SEPARABLE, "native") else resolve_impl(impl, tensor, "oslsm segment")


def segment(qry_feats, weights, out_size, geometry=None, return_prob=False, impl="auto"):
    """Labels ``B x Q x H x W`` uint8 (0 background, n way n) [+ the label's probability].

    Args:
        qry_feats: ``B x Q x D x h x w``; weights: ``B x N x K x (D+1)`` (last entry the bias).
        out_size: ``(H, W)`` or ``int``; geometry: ``None`` or ``(stride, offset, in_h, in_w)``.
        impl: ``"auto" | "torch" | "triton" | "separable"`` (``"native"``: ``separable``, see the module).
    """
    check_head_inputs(qry_feats, weights)
    impl = fast_impl(impl, qry_feats)
    with torch.no_grad():
        qry_feats, weights = qry_feats.float(), weights.float()
        if impl == "torch":
            return segment_torch(qry_feats, weights, out_size, geometry, return_prob)
        if impl == "triton":
            from fss.kernels.triton_logistic import segment_triton

            return segment_triton(qry_feats, weights, out_size, geometry, return_prob)
        return segment_separable(qry_feats, weights, out_size, geometry, return_prob)
