"""Matching query features against prototypes: ``scale * cosine``, bilinear upsampling, argmax."""

import torch
import torch.nn.functional as F

from fss.constants import COSINE_EPS, PROTOTYPE_SCALE


def check_match_inputs(qry_feats, protos):
    if qry_feats.dim() != 5:
        raise ValueError(f"qry_feats must be B x Q x C x h x w, got {tuple(qry_feats.shape)}")
    if protos.dim() != 3 or protos.shape[0] != qry_feats.shape[0] or protos.shape[2] != qry_feats.shape[2]:
        raise ValueError(
            f"protos must be B x (1+N) x C matching qry_feats {tuple(qry_feats.shape)}, got {tuple(protos.shape)}"
        )


def cosine_logits(qry_feats, protos, scale=PROTOTYPE_SCALE):
    """``B x Q x C x h x w`` and ``B x P x C`` -> ``B x Q x P x h x w`` of ``scale * cos``.

    Norms are clamped at 1e-8 before dividing, as ``F.cosine_similarity`` does.
    """
    q = qry_feats / torch.linalg.vector_norm(qry_feats, dim=2, keepdim=True).clamp_min(COSINE_EPS)
    p = protos / torch.linalg.vector_norm(protos, dim=2, keepdim=True).clamp_min(COSINE_EPS)
    return torch.einsum("bqchw,bpc->bqphw", q, p) * scale


def upsample(logits, out_size):
    """``B x Q x P x h x w`` -> ``B x Q x P x H x W``, bilinear, align_corners=False."""
    B, Q = logits.shape[:2]
    up = F.interpolate(logits.flatten(0, 1), size=tuple(out_size), mode="bilinear", align_corners=False)
    return up.unflatten(0, (B, Q))


def match_torch(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE):
    return upsample(cosine_logits(qry_feats, protos, scale), out_size)


def segment_torch(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE, return_prob=False):
    logits = match_torch(qry_feats, protos, out_size, scale)
    labels = logits.argmax(dim=2).to(torch.uint8)
    if not return_prob:
        return labels
    return labels, logits.softmax(dim=2).amax(dim=2)


def match(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE, impl="auto"):
    """Logits ``B x Q x (1+N) x H x W`` (background first) for training and evaluation.

    Args:
        qry_feats: ``B x Q x C x h x w``; protos: ``B x (1+N) x C``; out_size: ``(H, W)``.
    """
    check_match_inputs(qry_feats, protos)
    from fss.kernels.dispatch import resolve_impl

    impl = resolve_impl(impl, qry_feats, "match")
    if impl == "torch":
        return match_torch(qry_feats, protos, out_size, scale)
    raise NotImplementedError(f"match impl={impl!r} is not built yet")


def segment(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE, return_prob=False, impl="auto"):
    """Labels ``B x Q x H x W`` uint8 (0 background, n way n) [+ max softmax probability ``B x Q x H x W``].

    Equal to ``match(...).argmax(2)`` except at float ties.
    """
    check_match_inputs(qry_feats, protos)
    from fss.kernels.dispatch import resolve_impl

    impl = resolve_impl(impl, qry_feats, "segment")
    if impl == "torch":
        return segment_torch(qry_feats, protos, out_size, scale, return_prob)
    raise NotImplementedError(f"segment impl={impl!r} is not built yet")
