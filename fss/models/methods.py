"""The method registry: one entry per few-shot method, keyed by the name in a checkpoint's ``meta["method"]``.

An entry owns everything callers need to know about its method: how to build the network (an encoder
from :mod:`fss.models.encoders` plus the method's own parameters), the support state (per-shot
poolings, cacheable: a shot is added or removed without re-encoding the others), how that state
segments queries (logits, or the fused labels of the fast path), its training losses, and the
test-time refinement its checkpoints use by default. ``load_model``, ``Segmenter``, ``fss-run``,
``fss-eval``, the trainer and bundles go through :func:`get_method` / :func:`method_of` only.

Adding a method: one module that calls :func:`register`, named in ``METHOD_MODULES`` (two files; a
method with another head passes its own ``prototypes`` / ``logits`` / ``segment`` functions).

Shapes: ``B`` episodes, ``N`` ways, ``K`` shots, ``Q`` queries, ``P = 1 + N`` classes (background
first), ``C x h x w`` features, ``H x W`` images.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fss import kernels
from fss.constants import PROTOTYPE_REFINEMENTS, PROTOTYPE_SCALE, REFINEMENTS
from fss.errors import CheckpointError, FssError
from fss.models.registry import Registry

METHOD_MODULES = ("fss.models.panet", "fss.models.prnet", "fss.models.sst", "fss.models.oslsm")
DEFAULT_METHOD = "panet"  # checkpoints written before the registry, and official snapshots


# -- refinements --------------------------------------------------------------------------------------


def resolve_refine(refine: str | None, model) -> str:
    """``refine`` (None: the method's default) checked against :data:`REFINEMENTS`."""
    method = method_of(model)
    refine = method.default_refine if refine in (None, "auto") else refine
    if refine not in REFINEMENTS:
        raise FssError(f"unknown refinement {refine!r} (choose one of {', '.join(REFINEMENTS)})")
    if refine not in method.refinements:
        raise FssError(
            f"{method.name} has no refinement {refine!r} (choose one of {', '.join(method.refinements)})"
        )
    return refine


def adapts(refine: str) -> bool:
    """Whether ``refine`` fine-tunes the encoder on each support set first (:mod:`fss.models.adaptation`)."""
    return refine.startswith("adapt+")


def refine_prototypes(qry_feats, protos, refine: str):
    """``B x P x C`` support prototypes refined on the ``B x Q x C x h x w`` queries of each episode
    (the fusion part of ``refine``; adaptation happens before the features are computed)."""
    if not refine.endswith("fusion"):
        return protos
    from fss.models.fusion import fuse_prototypes

    return fuse_prototypes(qry_feats, protos)


# -- the prototype head (masked average pooling + scaled cosine), shared by PANet and PRNet ---------------
def shot_poolings(feats, fg, bg, impl="auto"):
    """``K x C x h x w`` features of K shots, ``K x S x S`` fg / bg masks -> ``K x C`` fg, ``K x C`` bg."""
    pooled = kernels.prototypes(feats[:, None, None], fg[:, None, None], bg[:, None, None], impl=impl)
    return pooled[:, 1], pooled[:, 0]  # each shot as its own 1-way 1-shot episode: [bg, fg]


def combine(fg: list[torch.Tensor], bg: list[torch.Tensor]) -> torch.Tensor:
    """Per-shot poolings (``fg[n]``, ``bg[n]``: ``K_n x C``) -> ``(1+N) x C`` prototypes: foreground mean
    over shots, background mean over ways of the per-way means."""
    fg_protos = torch.stack([pools.mean(dim=0) for pools in fg])
    bg_proto = torch.stack([pools.mean(dim=0) for pools in bg]).mean(dim=0, keepdim=True)
    return torch.cat([bg_proto, fg_protos])


def prototypes(supp_feats, supp_fg, supp_bg, shot_mask=None, impl="auto"):
    """``B x N x K x C x h x w`` features, ``B x N x K x H x W`` masks -> ``B x P x C`` prototypes."""
    return kernels.prototypes(supp_feats, supp_fg, supp_bg, shot_mask, impl=impl)


def logits(qry_feats, protos, out_size, scale=PROTOTYPE_SCALE, impl="auto", refine="none"):
    """``B x Q x C x h x w`` queries, ``B x P x C`` prototypes -> ``B x Q x P x H x W`` logits."""
    protos = refine_prototypes(qry_feats, protos, refine)
    return kernels.match(qry_feats, protos, tuple(out_size), scale, impl=impl)


def segment(
    qry_feats, protos, out_size, scale=PROTOTYPE_SCALE, impl="auto", refine="none", return_prob=False
):
    """The fused fast path of :func:`logits` + argmax: ``B x Q x H x W`` uint8 labels (+ max probability)."""
    protos = refine_prototypes(qry_feats, protos, refine)
    return kernels.segment(qry_feats, protos, tuple(out_size), scale, return_prob=return_prob, impl=impl)


@dataclass(frozen=True)
class Method:
    """What the rest of fss knows about one method.

    Attributes:
        name: the registry key (``meta["method"]``).
        build: ``(encoder name, width, meta, impl) -> nn.Module`` with ``encode``, ``meta``, ``scale``,
            ``impl``; raises ``ValueError`` / ``TypeError`` for parameters that do not fit.
        losses: ``(model, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, shot_mask, second) ->
            (query_loss, second_loss)``; the training loss is ``query_loss + weight * second_loss``.
        default_refine: the test-time refinement (:data:`REFINEMENTS`) its checkpoints use unless told.
        train_defaults: ``fss-train`` options the method's paper recipe sets (e.g. ``{"lr": 7e-3}``).
        scale: the cosine scale of its logits (``model.scale``).
        shot_poolings, combine, prototypes, logits, segment: the support state (per-shot poolings
            combined into prototypes; episodes batched) and how it meets queries, test-time fusion
            included (``refine``); the prototype methods share the functions above. Test-time
            adaptation (:mod:`fss.models.adaptation`) needs only ``prototypes`` and ``encode``.
        refinements: the :data:`REFINEMENTS` that apply to it.
        bind: ``(entry, model, refine) -> entry`` whose functions use the model's own head weights
            (a method with a learned head, e.g. SST); the prototype methods' entries are weight-free.
            Callers holding a model go through :func:`bound_method`.
        support_state: for a method whose support state is computed from the support images themselves
            (OSLSM's conditioning branch) rather than pooled from encoder features: ``(model, supp_imgs,
            supp_fg, supp_bg, shot_mask, impl) -> B x N x K x ...`` per-shot state, which ``combine``
            (per way ``K_n x ...`` lists) and ``segment`` / ``logits`` take in place of prototypes;
            None for the prototype methods.
        head_options: ``(model, query input size) -> dict`` of keyword arguments that ``logits`` and
            ``segment`` also take (e.g. OSLSM's upsampling geometry); None: none.
    """

    name: str
    build: Callable[..., nn.Module]
    losses: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    default_refine: str = "none"
    train_defaults: dict = field(default_factory=dict)
    scale: float = PROTOTYPE_SCALE
    shot_poolings: Callable = shot_poolings
    combine: Callable = combine
    prototypes: Callable = prototypes
    logits: Callable = logits
    segment: Callable = segment
    refinements: tuple = PROTOTYPE_REFINEMENTS
    bind: Callable = field(default=lambda entry, model, refine: entry)
    support_state: Callable | None = None
    head_options: Callable | None = None

    def options(self, model, in_size) -> dict:
        """The extra keyword arguments of ``logits`` / ``segment`` for ``model``'s queries of ``in_size``."""
        return {} if self.head_options is None else self.head_options(model, in_size)


_REGISTRY = Registry("method", METHOD_MODULES)
register = _REGISTRY.register
method_names = _REGISTRY.names


def get_method(name: str, path=None) -> Method:
    """The entry called ``name``; an unknown name is a one-line error naming the known ones."""
    return _REGISTRY.get(name, path)


def method_of(model) -> Method:
    """The entry of a model (or bundle) by its ``meta["method"]``."""
    return get_method(model.meta.get("method", DEFAULT_METHOD))


def bound_method(model, refine: str = "none") -> Method:
    """The entry of ``model`` with its functions bound to the model's head and ``refine``."""
    entry = method_of(model)
    return entry.bind(entry, model, refine)


def build_model(
    method: str, encoder: str, width: float, meta: dict | None = None, impl: str = "auto", path=None
):
    """A fresh network of ``method`` on ``encoder`` at ``width``; bad parameters are a one-line error."""
    entry = get_method(method, path)
    try:
        return entry.build(encoder, float(width), {**(meta or {}), "method": entry.name}, impl)
    except (ValueError, TypeError) as exc:
        message = f"checkpoint does not fit {method} on {encoder}: {exc}"
        raise CheckpointError(message, path) if path is not None else FssError(message) from None


# -- episodes ---------------------------------------------------------------------------------------------
def encode_episode(encode, supp_imgs, qry_imgs):
    """One ``encode`` call over supports and queries: ``B x N x K x C x h x w``, ``B x Q x C x h x w``."""
    B, N, K = supp_imgs.shape[:3]
    Q = qry_imgs.shape[1]
    feats = encode(torch.cat([supp_imgs.flatten(0, 2), qry_imgs.flatten(0, 1)]))
    supp_feats = feats[: B * N * K].unflatten(0, (B, N, K))
    qry_feats = feats[B * N * K :].unflatten(0, (B, Q))
    return supp_feats, qry_feats


def episode_logits(
    encode,
    method: Method,
    supp_imgs,
    supp_fg,
    supp_bg,
    qry_imgs,
    shot_mask=None,
    scale=None,
    impl="auto",
    refine="none",
    model=None,
):
    """A method's logits for a batch of episodes, whatever computes the features (torch, ONNX Runtime, ...).

    Args:
        encode: ``M x 3 x H x W`` normalised images -> ``M x C x h x w`` features.
        method: the :class:`Method` whose head turns features into logits.
        supp_imgs: ``B x N x K x 3 x H x W`` normalised support images.
        supp_fg, supp_bg: ``B x N x K x H x W`` foreground / background masks.
        qry_imgs: ``B x Q x 3 x H x W`` normalised query images.
        shot_mask: optional ``B x N x K`` bool for ways with fewer than K shots.
        scale: the cosine scale (default: the method's); refine: a :data:`REFINEMENTS` name.
        model: the model (or bundle) ``encode`` belongs to: a method with a ``support_state`` needs it.

    Returns:
        ``B x Q x (1+N) x H x W`` logits, background first.
    """
    check_episode(supp_imgs, supp_fg, supp_bg, qry_imgs)
    if method.support_state is not None:  # the support state comes from the images (OSLSM)
        B, Q = qry_imgs.shape[:2]
        qry_feats = encode(qry_imgs.flatten(0, 1)).unflatten(0, (B, Q))
        state = method.support_state(model, supp_imgs, supp_fg, supp_bg, shot_mask, impl=impl)
        size = qry_imgs.shape[-2:]
        return method.logits(qry_feats, state, size, impl=impl, **method.options(model, tuple(size)))
    supp_feats, qry_feats = encode_episode(encode, supp_imgs, qry_imgs)
    protos = method.prototypes(supp_feats, supp_fg, supp_bg, shot_mask, impl=impl)
    scale = method.scale if scale is None else scale
    return method.logits(qry_feats, protos, qry_imgs.shape[-2:], scale, impl=impl, refine=refine)


def check_episode(supp_imgs, supp_fg, supp_bg, qry_imgs):
    if supp_imgs.dim() != 6 or supp_imgs.shape[3] != 3:
        raise ValueError(f"supp_imgs must be B x N x K x 3 x H x W, got {tuple(supp_imgs.shape)}")
    B, N, K = supp_imgs.shape[:3]
    H, W = supp_imgs.shape[-2:]
    for name, mask in (("supp_fg", supp_fg), ("supp_bg", supp_bg)):
        if tuple(mask.shape) != (B, N, K, H, W):
            raise ValueError(f"{name} must be B x N x K x H x W = {(B, N, K, H, W)}, got {tuple(mask.shape)}")
    if qry_imgs.dim() != 5 or qry_imgs.shape[0] != B or qry_imgs.shape[2] != 3:
        raise ValueError(f"qry_imgs must be B x Q x 3 x H x W with B = {B}, got {tuple(qry_imgs.shape)}")
