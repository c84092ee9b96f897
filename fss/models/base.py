"""The few-shot model interface every method implements, and the registry from method name to class.

A method is one module defining a :class:`FewShotModel` subclass decorated with ``@register_method(name)``;
``name`` is what checkpoints store in ``meta["method"]``. Loading, training, evaluation, ``fss-run``,
``Segmenter``, export, bundles and the server go through this interface only (:func:`build_model`,
:func:`method_of`), never through a method's name.

A model's support state is opaque to callers: :meth:`FewShotModel.shot_states` turns K shots of one
class into a pair of ``K x ...`` tensors (cacheable: a shot is added or removed by concatenating or
indexing along the first dimension), :meth:`FewShotModel.combine` turns the pairs of N classes into one
episode state, which :meth:`FewShotModel.segment` / :meth:`FewShotModel.logits` meet queries with.
Prototypes are one kind of state (PANet), conditioned regression weights another (OSLSM).

Shapes: ``B`` episodes, ``N`` ways, ``K`` shots, ``Q`` queries, ``P = 1 + N`` classes (background
first), ``C x h x w`` features, ``H x W`` images.
"""

from importlib import import_module

import torch
from torch import nn

from fss.constants import EDGES, PAPER_INPUT_SIZE, PROTOTYPE_REFINEMENTS, PROTOTYPE_SCALE, REFINEMENTS
from fss.errors import CheckpointError, FssError
from fss.models.encoders import get_encoder
from fss.models.presence import default_min_score, gate_logits, presence_scores

# The built-in methods' modules (imported on the first look-up) and the method of checkpoints written
# before the registry (and of official PANet snapshots).
METHOD_MODULES = ("fss.models.panet", "fss.models.prnet", "fss.models.sst", "fss.models.oslsm")
DEFAULT_METHOD = "panet"


class FewShotModel(nn.Module):
    """A few-shot segmentation method: its network, support state, head, losses, graphs and recipe.

    Subclasses set ``self.encoder`` (the query trunk), ``self.meta`` (the checkpoint's metadata,
    ``meta["method"]`` its registered name) and ``self.impl`` (the kernels of the head), and implement
    :meth:`episode_state`, :meth:`pool_shots`, :meth:`combine`, :meth:`logits`, :meth:`segment` and
    :meth:`losses`; the rest has defaults for an encoder-plus-head method.
    """

    name: str = ""  # the registry key, set by register_method
    default_refine: str = "none"  # the test-time refinement its checkpoints use unless told
    refinements: tuple = PROTOTYPE_REFINEMENTS  # the REFINEMENTS that apply to it
    train_defaults: dict = {}  # fss-train options its paper's recipe sets, e.g. {"lr": 7e-3}
    scale: float = PROTOTYPE_SCALE  # the cosine scale of its logits (1: none)
    encodes_supports: bool = True  # supports go through encode (False: the state reads the images)
    export_ops: frozenset = frozenset()  # ONNX ops its graphs add to the encoder's

    @classmethod
    def build(cls, encoder: str, width: float, meta: dict, impl: str) -> "FewShotModel":
        """A fresh network; ``ValueError`` / ``TypeError`` for parameters that do not fit."""
        return cls(encoder, width, meta, impl)

    @classmethod
    def from_graphs(cls, meta: dict, graphs: dict, impl: str = "auto") -> "FewShotModel":
        """An inference-only model whose graphs (the names of :meth:`export_graphs`, as callables that
        run elsewhere, e.g. ONNX Runtime) stand in for its networks: what a bundle's head runs on."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.meta, model.impl = dict(meta), impl
        model.encode = graphs["encoder"]
        return model

    # -- the network ---------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``M x 3 x H x W`` normalised images -> ``M x C x h x w`` query features."""
        return self.encoder(images)

    def trunks(self) -> list[nn.Module]:
        """The pretrained trunks: what initialisation loads, ``--freeze-stages`` freezes and test-time
        adaptation tunes (the first: the query encoder, whose features the encoder cache exports)."""
        return [self.encoder]

    def export_graphs(self) -> dict[str, nn.Module]:
        """The graphs a bundle holds by name: ``encoder`` (images -> the features ``segment`` takes),
        and a method's own (e.g. OSLSM's ``conditioning``)."""
        return {"encoder": self.encoder}

    def encoder_input_side(self, size: int) -> int:
        """Side of the encoder's first activations for inputs of side ``size`` (memory checks)."""
        return size

    # -- the support state ---------------------------------------------------------------------------
    def episode_inputs(self, encode, supp_imgs, qry_imgs):
        """One ``encode`` call over an episode batch: what :meth:`episode_state` takes for the supports
        (``B x N x K x C x h x w`` features, or the images where ``encodes_supports`` is False) and the
        ``B x Q x C x h x w`` query features."""
        if self.encodes_supports:
            return encode_episode(encode, supp_imgs, qry_imgs)
        B, Q = qry_imgs.shape[:2]
        return supp_imgs, encode(qry_imgs.flatten(0, 1)).unflatten(0, (B, Q))

    def episode_state(self, supp, supp_fg, supp_bg, shot_mask=None, refine="none", impl=None):
        """:meth:`episode_inputs`'s supports, ``B x N x K x H x W`` masks, optional ``B x N x K`` bool
        of present shots -> the batched episode state :meth:`segment` takes. ``impl``: the kernels
        (:mod:`fss.kernels`; None: ``self.impl``), here and in the head."""
        raise NotImplementedError

    def shot_states(
        self, imgs, fg, bg, encode, refine="none", impl=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K shots of one class (``K x 3 x S x S`` images, ``K x S x S`` masks) -> their per-shot state,
        a pair of ``K x ...`` tensors; ``encode`` computes features (the caller's encoder path)."""
        return self.pool_shots(encode(imgs) if self.encodes_supports else imgs, fg, bg, refine, impl)

    def pool_shots(self, supp, fg, bg, refine="none", impl=None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`shot_states` of ``K`` shots' features (or images) -> a pair of ``K x ...`` tensors."""
        raise NotImplementedError

    def combine(self, first: list[torch.Tensor], second: list[torch.Tensor]) -> torch.Tensor:
        """The per-shot state pairs of N classes (``first[n]``, ``second[n]``: ``K_n x ...``) -> the state
        of one episode (what :meth:`episode_state` gives per episode)."""
        raise NotImplementedError

    # -- the head ------------------------------------------------------------------------------------
    def logits(self, qry_feats, state, out_size, refine="none", impl=None, in_size=None) -> torch.Tensor:
        """``B x Q x C x h x w`` query features and ``B`` episode states -> ``B x Q x P x H x W`` logits at
        ``out_size``; ``in_size``: the side of the images the features come from (default ``out_size``)."""
        raise NotImplementedError

    def segment(self, qry_feats, state, out_size, refine="none", return_prob=False, impl=None, in_size=None):
        """The fused fast path of :meth:`logits` + argmax: ``B x Q x H x W`` uint8 labels (+ the winning
        class's probability where ``return_prob``)."""
        raise NotImplementedError

    def refine_state(self, qry_feats, state, refine="none"):
        """``(state, refine)`` with the test-time refinement applied once to the episodes' state where the
        method's refinement is a function of it (what is left to do is then ``"none"``), so that scores,
        labels and maps of the same queries share it."""
        return state, refine

    def presence(self, qry_feats, state, refine="none", impl=None, in_size=None) -> torch.Tensor:
        """``B x N`` episode states' classes on ``B x Q`` queries -> ``B x Q x N`` presence scores in
        ``[0, 1]``, from the logits at feature resolution (:mod:`fss.models.presence`)."""
        low = self.logits(qry_feats, state, qry_feats.shape[-2:], refine, impl, in_size)
        return presence_scores(low, self.meta.get("presence"))

    def segment_present(
        self, qry_feats, state, out_size, min_score, refine="none", return_prob=False, impl=None, in_size=None
    ):
        """:meth:`segment` with absent classes (presence below ``min_score``) left out of the argmax:
        ``(labels or (labels, prob), scores)``; the fused path where no class is absent."""
        state, refine = self.refine_state(qry_feats, state, refine)
        scores = self.presence(qry_feats, state, refine, impl, in_size)
        if not (scores < min_score).any():
            return self.segment(qry_feats, state, out_size, refine, return_prob, impl, in_size), scores
        logits = self.logits(qry_feats, state, out_size, refine, impl, in_size)
        prob, labels = gate_logits(logits, scores, min_score).softmax(dim=2).max(dim=2)
        labels = labels.to(torch.uint8)
        return ((labels, prob) if return_prob else labels), scores

    def forward(self, supp_imgs, supp_fg, supp_bg, qry_imgs, shot_mask=None, refine="none"):
        """Logits ``B x Q x (1+N) x H x W`` of a batch of episodes (the uncached reference path).

        ``supp_imgs``: ``B x N x K x 3 x H x W`` normalised; ``supp_fg``, ``supp_bg``: ``B x N x K x H x W``;
        ``qry_imgs``: ``B x Q x 3 x H x W``; ``shot_mask``: optional ``B x N x K`` bool for ragged ways.
        """
        check_episode(supp_imgs, supp_fg, supp_bg, qry_imgs)
        supp, qry_feats = self.episode_inputs(self.encode, supp_imgs, qry_imgs)
        state = self.episode_state(supp, supp_fg, supp_bg, shot_mask, refine)
        return self.logits(qry_feats, state, qry_imgs.shape[-2:], refine)

    # -- training ------------------------------------------------------------------------------------
    def losses(self, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, shot_mask=None, second=True):
        """``(query_loss, second_loss)``; the training loss is ``query_loss + weight * second_loss``."""
        raise NotImplementedError

    @classmethod
    def add_train_options(cls, parser, types) -> None:
        """Add the method's own ``fss-train`` options (``--NAME-*``, default None / False) to ``parser``;
        ``types`` holds fss-train's argument checks (``positive_int``, ``count``, ``non_negative_float``)."""

    @classmethod
    def train_options(cls, args) -> dict:
        """The method's own options given in the parsed ``fss-train`` arguments, as ``meta[NAME]``
        entries (empty: none given)."""
        return {}

    @classmethod
    def check_train_args(cls, args) -> None:
        """Raise ``FssError`` for ``fss-train`` arguments that do not apply to training this method."""


def default_meta(width: float, encoder: str, method: str) -> dict:
    """The metadata every model carries (a method adds its own entries, e.g. ``meta[method]``)."""
    return {
        "method": method,
        "encoder": encoder,
        "width": float(width),
        "input_size": PAPER_INPUT_SIZE,
        "normalisation": get_encoder(encoder).normalisation,
        "classes": [],
        "train_config": {},
    }


# -- the registry ---------------------------------------------------------------------------------------
_METHODS: dict[str, type[FewShotModel]] = {}


def register_method(name: str):
    """Class decorator: register a :class:`FewShotModel` subclass as method ``name``."""

    def register(cls: type[FewShotModel]) -> type[FewShotModel]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return register


def unregister_method(name: str) -> None:
    """Forget method ``name`` (one registered for a while: a test's, a notebook's)."""
    del _METHODS[name]


def load_builtin_methods() -> None:
    for module in METHOD_MODULES:  # cheap after the first call: modules are cached
        import_module(module)


def method_names() -> list[str]:
    load_builtin_methods()
    return sorted(_METHODS)


def get_method(name, path=None) -> type[FewShotModel]:
    """The class of method ``name``; an unknown name is a one-line error naming the known ones."""
    load_builtin_methods()
    cls = _METHODS.get(name) if isinstance(name, str) else None
    if cls is None:
        message = f"unknown method {name!r} (known: {', '.join(method_names())})"
        raise CheckpointError(message, path) if path is not None else FssError(message)
    return cls


def method_of(model) -> type[FewShotModel]:
    """The method class of a model, a bundle or a checkpoint's ``meta`` dict."""
    meta = model if isinstance(model, dict) else model.meta
    return get_method(meta.get("method", DEFAULT_METHOD))


def build_model(method: str, encoder: str, width: float, meta: dict | None = None, impl="auto", path=None):
    """A fresh network of ``method`` on ``encoder`` at ``width``; bad parameters are a one-line error."""
    cls = get_method(method, path)
    get_encoder(encoder, path)  # an unknown name is a one-line error naming the known ones
    try:
        return cls.build(encoder, float(width), {**(meta or {}), "method": cls.name}, impl)
    except (ValueError, TypeError) as exc:
        message = f"checkpoint does not fit {cls.name} on {encoder}: {exc}"
        raise CheckpointError(message, path) if path is not None else FssError(message) from None


# -- refinements ----------------------------------------------------------------------------------------
def resolve_refine(refine: str | None, model) -> str:
    """``refine`` (None or "auto": the checkpoint's ``meta["refine"]``, else its method's default) checked
    against :data:`REFINEMENTS`."""
    method = method_of(model)
    if refine in (None, "auto"):
        refine = getattr(model, "meta", {}).get("refine") or method.default_refine
    if refine not in REFINEMENTS:
        raise FssError(f"unknown refinement {refine!r} (choose one of {', '.join(REFINEMENTS)})")
    if refine not in method.refinements:
        raise FssError(
            f"{method.name} has no refinement {refine!r} (choose one of {', '.join(method.refinements)})"
        )
    if refine == "learned" and "decision_head" not in getattr(model, "meta", {}):
        raise FssError(
            "--refine learned needs a checkpoint with a decision head (python -m fss.train.decision)"
        )
    return refine


def resolve_edges(edges: str | None, model) -> str:
    """``edges`` (None: the checkpoint's ``meta["edges"]``, else ``none``) checked against :data:`EDGES`."""
    edges = edges or getattr(model, "meta", {}).get("edges") or "none"
    if edges not in EDGES:
        raise FssError(f"unknown edges {edges!r} (choose one of {', '.join(EDGES)})")
    return edges


def resolve_min_score(min_score: float | None, model) -> float:
    """``min_score`` (None: the checkpoint's calibrated cut-off, else 0: nothing is judged absent)."""
    return default_min_score(getattr(model, "meta", {})) if min_score is None else float(min_score)


def adapts(refine: str) -> bool:
    """Whether ``refine`` fine-tunes the encoder on each support set first (:mod:`fss.models.adaptation`)."""
    return refine.startswith("adapt+")


# -- episodes -------------------------------------------------------------------------------------------
def encode_episode(encode, supp_imgs, qry_imgs):
    """One ``encode`` call over supports and queries: ``B x N x K x C x h x w``, ``B x Q x C x h x w``."""
    B, N, K = supp_imgs.shape[:3]
    Q = qry_imgs.shape[1]
    feats = encode(torch.cat([supp_imgs.flatten(0, 2), qry_imgs.flatten(0, 1)]))
    supp_feats = feats[: B * N * K].unflatten(0, (B, N, K))
    qry_feats = feats[B * N * K :].unflatten(0, (B, Q))
    return supp_feats, qry_feats


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
