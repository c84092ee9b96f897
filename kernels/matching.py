"""Matching query features against prototypes: ``scale * cosine``, bilinear upsampling, argmax.

``match`` returns the upsampled logits (training, evaluation); ``segment`` fuses the upsampling with
the argmax (and the max softmax probability when asked), so the float maps at image size are never
written. Implementations (``impl``): ``torch`` (plain differentiable ops), ``native`` (C++/OpenMP,
CPU), ``triton`` (GPU, :mod:`fss.kernels.triton_matching`). The fast ``match`` paths share one
backward (:class:`FastMatch`): the adjoint of the upsampling brings the logit gradient down to
feature resolution, where the cheap cosine is recomputed and differentiated by torch.
"""

import torch
import torch.nn.functional as F

from fss.constants import COSINE_EPS, PROTOTYPE_SCALE
from fss.kernels.dispatch import native_threads, resolve_impl
from fss.kernels.interp import as_size, bilinear_adjoint


def check_match_inputs(qry_feats, protos):
    if qry_feats.dim() != 5:
        raise ValueError(f"qry_feats must be B x Q x C x h x w, got {tuple(qry_feats.shape)}")
    if protos.dim() != 3 or protos.shape[0] != qry_feats.shape[0] or protos.shape[2] != qry_feats.shape[2]:
        raise ValueError(
            f"protos must be B x (1+N) x C matching qry_feats {tuple(qry_feats.shape)}, "
            f"got {tuple(protos.shape)}"
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
    up = F.interpolate(logits.flatten(0, 1), size=as_size(out_size), mode="bilinear", align_corners=False)
    return up.unflatten(0, (B, Q))


def match_torch(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE):
    return upsample(cosine_logits(qry_feats, protos, scale), out_size)


def segment_torch(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE, return_prob=False):
    logits = match_torch(qry_feats, protos, out_size, scale)
    labels = logits.argmax(dim=2).to(torch.uint8)
    if not return_prob:
        return labels
    return labels, logits.softmax(dim=2).amax(dim=2)


def native_inputs(qry_feats, protos):
    return (t.detach().to(torch.float32).contiguous() for t in (qry_feats, protos))


def match_native(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE):
    """C++ kernel (fp32); logits in the features' dtype."""
    from fss.kernels import _native

    qry, prt = native_inputs(qry_feats, protos)
    B, Q = qry.shape[:2]
    logits = torch.empty(B, Q, prt.shape[1], *as_size(out_size))
    _native.match(qry.numpy(), prt.numpy(), float(scale), logits.numpy(), native_threads())
    return logits.to(qry_feats.dtype)


def segment_native(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE, return_prob=False):
    """C++ kernel (fp32): uint8 labels [+ max softmax probability in the features' dtype]."""
    from fss.kernels import _native

    qry, prt = native_inputs(qry_feats, protos)
    B, Q = qry.shape[:2]
    size = as_size(out_size)
    labels = torch.empty(B, Q, *size, dtype=torch.uint8)
    prob = torch.empty(B, Q, *size) if return_prob else None
    _native.segment(
        qry.numpy(),
        prt.numpy(),
        float(scale),
        labels.numpy(),
        None if prob is None else prob.numpy(),
        native_threads(),
    )
    return (labels, prob.to(qry_feats.dtype)) if return_prob else labels


def fast_kernels(impl):
    """``(match, segment)`` launchers of a fast implementation."""
    if impl == "native":
        return match_native, segment_native
    from fss.kernels.triton_matching import match_triton, segment_triton

    return match_triton, segment_triton


class FastMatch(torch.autograd.Function):
    """A fast forward; backward = upsampling adjoint, then autograd through the low-resolution cosine."""

    @staticmethod
    def forward(ctx, qry_feats, protos, out_size, scale, impl):
        ctx.save_for_backward(qry_feats, protos)
        ctx.scale = scale
        return fast_kernels(impl)[0](qry_feats, protos, out_size, scale)

    @staticmethod
    def backward(ctx, grad_logits):
        qry_feats, protos = ctx.saved_tensors
        grad_low = bilinear_adjoint(grad_logits.to(qry_feats.dtype), qry_feats.shape[-2:])
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (qry_feats, protos)]
            low = cosine_logits(*inputs, ctx.scale)
            grad_qry, grad_protos = torch.autograd.grad(low, inputs, grad_low)
        return grad_qry, grad_protos, None, None, None


def match(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE, impl="auto"):
    """Logits ``B x Q x (1+N) x H x W`` (background first) for training and evaluation.

    Args:
        qry_feats: ``B x Q x C x h x w``; protos: ``B x (1+N) x C``; out_size: ``(H, W)`` or ``int``.
        impl: ``"auto" | "torch" | "triton" | "native"``; ``auto`` is ``native`` on CPU, ``triton`` on
            CUDA (``torch`` where those are unavailable). Differentiable with every impl.
    """
    check_match_inputs(qry_feats, protos)
    impl = resolve_impl(impl, qry_feats, "match")
    if impl == "torch":
        return match_torch(qry_feats, protos, out_size, scale)
    if torch.is_grad_enabled() and (qry_feats.requires_grad or protos.requires_grad):
        return FastMatch.apply(qry_feats, protos, out_size, scale, impl)
    return fast_kernels(impl)[0](qry_feats, protos, out_size, scale)


def segment(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE, return_prob=False, impl="auto"):
    """Labels ``B x Q x H x W`` uint8 (0 background, n way n) [+ max softmax probability ``B x Q x H x W``].

    Equal to ``match(...).argmax(2)`` except at float ties (ties keep the lowest class). Not
    differentiable.
    """
    check_match_inputs(qry_feats, protos)
    if protos.shape[1] > 256:
        raise ValueError(f"segment: uint8 labels hold at most 256 classes, got {protos.shape[1]}")
    impl = resolve_impl(impl, qry_feats, "segment")
    if impl == "torch":
        with torch.no_grad():
            return segment_torch(qry_feats, protos, out_size, scale, return_prob)
    return fast_kernels(impl)[1](qry_feats, protos, out_size, scale, return_prob)
