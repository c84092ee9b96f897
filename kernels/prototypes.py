"""Masked average pooling of support features into PANet prototypes.

The official model upsamples every ``C x h x w`` support feature map to the mask size and pools it
against the mask. Bilinear upsampling is linear, so the same numbers come from pooling the mask
*down* with the transposed interpolation weights (its adjoint) and taking one small weighted sum per
channel: ``sum_p up(F)[p] m[p] = sum_q F[q] (A_H^T m A_W)[q]``.

Implementations (``impl``): ``torch`` (plain differentiable ops), ``native`` (C++/OpenMP, CPU),
``triton`` (GPU, :mod:`fss.kernels.triton_prototypes`). The prototypes are linear in the features,
so the fast paths share one exact backward (:class:`FastPrototypes`): the gradient of a shot's
features is the outer product of the prototype gradients with that shot's pooled mask weights.
Masks are constants for every implementation but ``torch``.
"""

import torch

from fss.constants import POOL_EPS
from fss.kernels.dispatch import native_threads, resolve_impl
from fss.kernels.interp import bilinear_adjoint


def check_prototype_inputs(supp_feats, supp_fg, supp_bg, shot_mask):
    if supp_feats.dim() != 6:
        raise ValueError(f"supp_feats must be B x N x K x C x h x w, got {tuple(supp_feats.shape)}")
    B, N, K = supp_feats.shape[:3]
    for name, mask in (("supp_fg", supp_fg), ("supp_bg", supp_bg)):
        if mask.dim() != 5 or tuple(mask.shape[:3]) != (B, N, K):
            raise ValueError(
                f"{name} must be B x N x K x H x W = {B} x {N} x {K} x H x W, got {tuple(mask.shape)}"
            )
    if supp_fg.shape != supp_bg.shape:
        raise ValueError(f"supp_fg {tuple(supp_fg.shape)} and supp_bg {tuple(supp_bg.shape)} differ")
    if shot_mask is not None:
        if tuple(shot_mask.shape) != (B, N, K):
            raise ValueError(f"shot_mask must be B x N x K = {B} x {N} x {K}, got {tuple(shot_mask.shape)}")
        # Checked where it costs no device sync; on CUDA a way without shots gives NaN prototypes.
        if shot_mask.device.type == "cpu" and not bool(shot_mask.any(dim=2).all()):
            raise ValueError("shot_mask: every way needs at least one valid shot")


def shot_coefficients(counts: torch.Tensor, shot_mask: torch.Tensor | None) -> torch.Tensor:
    """``B x N x K x 2`` (fg, bg) mask sums -> weight of each shot's pooled sum in its prototype.

    Foreground of way n: mean over its valid shots of ``sum(F m) / (sum(m) + eps)``. Background: mean
    over ways of the same per-way mean (the official ``getPrototype``).
    """
    N = counts.shape[1]
    if shot_mask is None:
        per_way = torch.full_like(counts[..., 0], 1.0 / counts.shape[2])
    else:
        valid = shot_mask.to(counts.dtype)
        per_way = valid / valid.sum(dim=2, keepdim=True)  # B x N x K
    return torch.stack([per_way, per_way / N], dim=-1) / (counts + POOL_EPS)


def sources_to_prototypes(per_source: torch.Tensor) -> torch.Tensor:
    """``B x N x 2 x C`` (fg of way n, way n's share of the background) -> ``B x (1+N) x C``."""
    return torch.cat([per_source[:, :, 1].sum(dim=1, keepdim=True), per_source[:, :, 0]], dim=1)


def prototypes_torch(supp_feats, supp_fg, supp_bg, shot_mask=None):
    """Plain differentiable torch ops through the adjoint; see :func:`prototypes`."""
    # Masks stay fp32 whatever the feature dtype: a 417 x 417 mask sum overflows fp16.
    masks = torch.stack([supp_fg, supp_bg], dim=3).to(torch.float32)  # B x N x K x 2 x H x W
    pooled = bilinear_adjoint(masks, supp_feats.shape[-2:])  # B x N x K x 2 x h x w
    coef = shot_coefficients(masks.sum(dim=(-2, -1)), shot_mask)
    weights = (pooled * coef[..., None, None]).to(supp_feats.dtype).flatten(-2)  # B x N x K x 2 x hw
    per_shot = weights @ supp_feats.flatten(-2).transpose(-1, -2)  # B x N x K x 2 x C
    return sources_to_prototypes(per_shot.sum(dim=2))


def prototypes_native(supp_feats, supp_fg, supp_bg, shot_mask=None):
    """C++ kernel (fp32): ``(protos, pooled B x N x K x 2 x h x w, counts B x N x K x 2)``."""
    from fss.kernels import _native

    B, N, K, C, h, w = supp_feats.shape
    feats = supp_feats.detach().to(torch.float32).contiguous()
    if supp_fg.dtype in (torch.bool, torch.uint8) and supp_bg.dtype in (torch.bool, torch.uint8):
        fg, bg = (m.detach().contiguous().view(torch.uint8) for m in (supp_fg, supp_bg))
    else:
        fg, bg = (m.detach().to(torch.float32).contiguous() for m in (supp_fg, supp_bg))
    if shot_mask is None:
        valid = torch.ones(B, N, K, dtype=torch.uint8)
    else:
        valid = shot_mask.detach().to(torch.uint8).contiguous()
    protos = torch.empty(B, 1 + N, C)
    pooled = torch.empty(B, N, K, 2, h, w)
    counts = torch.empty(B, N, K, 2)
    _native.prototypes(
        feats.numpy(),
        fg.numpy(),
        bg.numpy(),
        valid.numpy(),
        protos.numpy(),
        pooled.numpy(),
        counts.numpy(),
        native_threads(),
    )
    return protos.to(supp_feats.dtype), pooled, counts


def fast_kernel(impl):
    if impl == "native":
        return prototypes_native
    from fss.kernels.triton_prototypes import prototypes_triton

    return prototypes_triton


class FastPrototypes(torch.autograd.Function):
    """A fast forward with the exact backward ``dL/dF[n,k] = sum_s coef[n,k,s] g_s (x) pooled[n,k,s]``."""

    @staticmethod
    def forward(ctx, supp_feats, supp_fg, supp_bg, shot_mask, impl):
        protos, pooled, counts = fast_kernel(impl)(supp_feats, supp_fg, supp_bg, shot_mask)
        ctx.save_for_backward(pooled, counts, shot_mask)
        ctx.feats_dtype = supp_feats.dtype
        return protos

    @staticmethod
    def backward(ctx, grad_protos):
        pooled, counts, shot_mask = ctx.saved_tensors
        B, N, K, _, h, w = pooled.shape
        weights = pooled * shot_coefficients(counts, shot_mask)[..., None, None]  # B x N x K x 2 x h x w
        # Prototype gradient per source (fg of way n, background): B x N x C x 2.
        grad_sources = torch.stack([grad_protos[:, 1:], grad_protos[:, :1].expand(-1, N, -1)], dim=-1)
        grad_feats = grad_sources.to(weights.dtype).unsqueeze(2) @ weights.flatten(-2)  # B x N x K x C x hw
        return grad_feats.unflatten(-1, (h, w)).to(ctx.feats_dtype), None, None, None, None


def prototypes(supp_feats, supp_fg, supp_bg, shot_mask=None, impl="auto"):
    """PANet prototypes, background first.

    Args:
        supp_feats: ``B x N x K x C x h x w`` support features.
        supp_fg, supp_bg: ``B x N x K x H x W`` foreground / background masks (float or bool; ignored
            pixels are simply 0 in both).
        shot_mask: optional ``B x N x K`` bool, False for padding shots (ways with fewer shots); every
            way needs at least one valid shot.
        impl: ``"auto" | "torch" | "triton" | "native"``; ``auto`` is ``native`` on CPU, ``triton`` on
            CUDA (``torch`` where those are unavailable, or where a mask requires grad).

    Returns:
        ``B x (1+N) x C`` in the features' dtype: the official upsample-then-pool result up to float
        rounding. Differentiable w.r.t. ``supp_feats`` with every impl.
    """
    check_prototype_inputs(supp_feats, supp_fg, supp_bg, shot_mask)
    masks_need_grad = supp_fg.requires_grad or supp_bg.requires_grad
    impl = "torch" if impl == "auto" and masks_need_grad else resolve_impl(impl, supp_feats, "prototypes")
    if impl == "torch":
        return prototypes_torch(supp_feats, supp_fg, supp_bg, shot_mask)
    if masks_need_grad and torch.is_grad_enabled():
        raise ValueError(
            f"prototypes: impl={impl!r} treats masks as constants; use impl='torch' for mask grads"
        )
    if torch.is_grad_enabled() and supp_feats.requires_grad:
        return FastPrototypes.apply(supp_feats, supp_fg, supp_bg, shot_mask, impl)
    return fast_kernel(impl)(supp_feats, supp_fg, supp_bg, shot_mask)[0]
