"""Masked average pooling of support features into PANet prototypes.

The official model upsamples every ``C x h x w`` support feature map to the mask size and pools it
against the mask. Bilinear upsampling is linear, so the same numbers come from pooling the mask
*down* with the transposed interpolation weights (its adjoint) and taking one small weighted sum per
channel: ``sum_p up(F)[p] m[p] = sum_q F[q] (A_H^T m A_W)[q]``.
"""

import torch

from fss.constants import POOL_EPS
from fss.kernels.interp import bilinear_matrix


def pooled_mask_weights(masks: torch.Tensor, feat_hw: tuple[int, int]) -> torch.Tensor:
    """``... x H x W`` masks -> ``... x h x w`` adjoint-pooled weights ``A_H^T m A_W``."""
    H, W = masks.shape[-2:]
    h, w = feat_hw
    a_h = bilinear_matrix(H, h, masks.device, masks.dtype)
    a_w = bilinear_matrix(W, w, masks.device, masks.dtype)
    return a_h.t() @ masks @ a_w


def check_prototype_inputs(supp_feats, supp_fg, supp_bg, shot_mask):
    if supp_feats.dim() != 6:
        raise ValueError(f"supp_feats must be B x N x K x C x h x w, got {tuple(supp_feats.shape)}")
    B, N, K = supp_feats.shape[:3]
    for name, mask in (("supp_fg", supp_fg), ("supp_bg", supp_bg)):
        if mask.dim() != 5 or tuple(mask.shape[:3]) != (B, N, K):
            raise ValueError(f"{name} must be B x N x K x H x W = {B} x {N} x {K} x H x W, got {tuple(mask.shape)}")
    if supp_fg.shape != supp_bg.shape:
        raise ValueError(f"supp_fg {tuple(supp_fg.shape)} and supp_bg {tuple(supp_bg.shape)} differ")
    if shot_mask is not None and tuple(shot_mask.shape) != (B, N, K):
        raise ValueError(f"shot_mask must be B x N x K = {B} x {N} x {K}, got {tuple(shot_mask.shape)}")


def combine_shots(pooled: torch.Tensor, shot_mask: torch.Tensor | None) -> torch.Tensor:
    """``B x N x K x 2 x C`` per-shot (fg, bg) poolings -> ``B x (1+N) x C`` prototypes.

    Foreground of way n: mean over its (valid) shots. Background: mean over ways of the mean over
    each way's shots, as the official ``getPrototype``.
    """
    if shot_mask is None:
        per_way = pooled.mean(dim=2)  # B x N x 2 x C
    else:
        weights = shot_mask.to(pooled.dtype)[..., None, None]  # B x N x K x 1 x 1
        per_way = (pooled * weights).sum(dim=2) / weights.sum(dim=2)
    fg = per_way[:, :, 0]  # B x N x C
    bg = per_way[:, :, 1].mean(dim=1, keepdim=True)  # B x 1 x C
    return torch.cat([bg, fg], dim=1)


def prototypes_torch(supp_feats, supp_fg, supp_bg, shot_mask=None):
    """Plain differentiable torch ops through the adjoint; see :func:`prototypes`."""
    masks = torch.stack([supp_fg, supp_bg], dim=3).to(supp_feats.dtype)  # B x N x K x 2 x H x W
    weights = pooled_mask_weights(masks, supp_feats.shape[-2:])  # B x N x K x 2 x h x w
    sums = torch.einsum("bnkchw,bnkshw->bnksc", supp_feats, weights)
    pooled = sums / (masks.sum(dim=(-2, -1)) + POOL_EPS)[..., None]
    return combine_shots(pooled, shot_mask)


def prototypes(supp_feats, supp_fg, supp_bg, shot_mask=None, impl="auto"):
    """PANet prototypes, background first.

    Args:
        supp_feats: ``B x N x K x C x h x w`` support features.
        supp_fg, supp_bg: ``B x N x K x H x W`` foreground / background masks (float or bool; ignored
            pixels are simply 0 in both).
        shot_mask: optional ``B x N x K`` bool, False for padding shots (ways with fewer shots).
        impl: ``"auto" | "torch" | "triton" | "native"``.

    Returns:
        ``B x (1+N) x C``: the official upsample-then-pool result up to float rounding.
    """
    check_prototype_inputs(supp_feats, supp_fg, supp_bg, shot_mask)
    from fss.kernels.dispatch import resolve_impl

    impl = resolve_impl(impl, supp_feats, "prototypes")
    if impl == "torch":
        return prototypes_torch(supp_feats, supp_fg, supp_bg, shot_mask)
    raise NotImplementedError(f"prototypes impl={impl!r} is not built yet")
