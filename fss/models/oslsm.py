"""OSLSM (one-shot learning for semantic segmentation): a conditioning branch writes a logistic regression.

Two unshared networks of the same encoder family:
- conditioning branch: the support image (normalised, so a masked-out pixel is the mean colour) times
  its binary mask at ``support_size`` (224), the trunk, pooled to 7 x 7 (VGG16's pool5 at 224 already
  is), fc6 / fc7 (ReLU, dropout 0.5) and fc8 to 1000 values, then the fixed weight hashing
  (:class:`WeightHashing`) to the ``D`` weights and the bias of a logistic regression;
- query branch: the trunk, fc6 / fc7 as convolutions (ReLU, dropout 0.5): ``D x h x w`` features;
- head (:mod:`fss.kernels.logistic`): ``w . f + b`` per location, bilinear upsampling to the image,
  max over the K shots (logical OR), ``sigmoid > 0.5``; N ways: each way is binary, overlaps go to the
  highest logit (ties: the lowest way).

Geometry per encoder (:data:`GEOMETRIES`, a registry): ``vgg16-dilated`` weights run in the official
FCN-32s geometry (plain VGG16: 2 x 2 ceil-mode pools after every block, no dilation, ReLU after
conv5_3, conv1_1 padded by 121 on the query, fc6 a 7 x 7 convolution, fc widths 4096 x ``width``;
output stride 32, upsampled as the official fixed bilinear deconvolution and crop); any other encoder
runs as registered (stride 8) with 1 x 1 fc6 / fc7 of 512 channels and a 1024-wide conditioning branch,
upsampled as the prototype methods. Checkpoints store the choices in ``meta["oslsm"]`` and the hashing
map both as buffers (authoritative: a converted official model keeps its own map) and as the seed that
generated it (:meth:`WeightHashing.regenerated` compares the two).

Shapes: ``B`` episodes, ``N`` ways, ``K`` shots, ``Q`` queries, ``D`` query feature channels.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fss.kernels import logistic
from fss.models.base import FewShotModel, default_meta, register_method
from fss.models.encoders import build_encoder

HASH_INPUTS = 1000  # fc8's outputs: VGG16's ImageNet classes in the official model
HASH_SEED = 1385  # the official test seed, reused as the default hashing seed
SUPPORT_SIZE = 224
POOL_GRID = 7  # conditioning features pooled to 7 x 7 (VGG16's pool5 at 224)
DROPOUT = 0.5
FCN_STRIDE = 32
QUERY_PAD = 121  # conv1_1's padding on the query in the official net
# Beside the encoder's ops, in the exported branches: fc layers (Gemm; Conv + Relu on the query), the
# pool to 7 x 7, flattening, the hashing gather and its signs, the logit scale.
EXPORT_OPS = frozenset(
    {"Conv", "Relu", "MaxPool", "AveragePool", "Gemm", "GatherND", "Mul", "Reshape", "Transpose"}
)


# -- weight hashing ---------------------------------------------------------------------------------------
def hashing_map(seed: int, outputs: int, inputs: int = HASH_INPUTS) -> tuple[torch.Tensor, torch.Tensor]:
    """``kappa`` (``outputs`` indices into ``inputs``) and ``zeta`` (``outputs`` signs +-1) of seed
    ``seed``: numpy's PCG64 stream, the same on every platform and version."""
    rng = np.random.default_rng(seed)
    kappa = rng.integers(0, inputs, size=outputs)
    zeta = rng.integers(0, 2, size=outputs) * 2 - 1
    return torch.from_numpy(kappa).long(), torch.from_numpy(zeta).float()


class WeightHashing(nn.Module):
    """``... x inputs`` -> ``... x outputs``: ``y_i = zeta_i * x[kappa_i]`` (fixed, never trained).

    The official layer is a fully connected one with the fixed weights ``W[i, j] = zeta_i [j = kappa_i]``
    (:meth:`matrix`); a gather computes the same values.
    """

    def __init__(self, seed: int, outputs: int, inputs: int = HASH_INPUTS):
        super().__init__()
        self.seed, self.inputs = int(seed), int(inputs)
        kappa, zeta = hashing_map(self.seed, outputs, inputs)
        self.register_buffer("kappa", kappa)
        self.register_buffer("zeta", zeta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.kappa] * self.zeta

    def matrix(self) -> torch.Tensor:
        """The layer as its ``outputs x inputs`` weight matrix."""
        m = torch.zeros(len(self.kappa), self.inputs, device=self.zeta.device)
        m[torch.arange(len(self.kappa)), self.kappa] = self.zeta
        return m

    def regenerated(self) -> bool:
        """Whether the stored map is the one its seed generates."""
        kappa, zeta = hashing_map(self.seed, len(self.kappa), self.inputs)
        return torch.equal(kappa, self.kappa.cpu()) and torch.equal(zeta, self.zeta.cpu())


# -- trunks: how an encoder family runs in OSLSM ----------------------------------------------------------
def vgg_fcn(vgg, x: torch.Tensor, first_pad: int) -> torch.Tensor:
    """VGG16 as the official OSLSM / FCN nets run it: every conv 3 x 3 (conv1_1 padded by ``first_pad``),
    ReLU after each, 2 x 2 max-pools (ceil mode) after each block: ``M x C x h x w`` at stride 32."""
    from fss.models.vgg import VGG16_BLOCKS

    convs = iter(vgg.convs())
    for block, (n_convs, _) in enumerate(VGG16_BLOCKS):
        for layer in range(n_convs):
            conv = next(convs)
            pad = first_pad if block == layer == 0 else 1
            x = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=pad))
        x = F.max_pool2d(x, 2, 2, ceil_mode=True)
    return x


def as_registered(encoder, x: torch.Tensor) -> torch.Tensor:
    return encoder(x)


@dataclass(frozen=True)
class Geometry:
    """How one encoder family carries OSLSM.

    Attributes:
        query, support: ``(encoder module, M x 3 x S x S) -> M x C x h x w`` of each branch.
        fc6_kernel: the query fc6's kernel (7: VGG16's fc6 as a convolution).
        channels, cond_channels: ``width -> D`` (query fc6 / fc7) and the conditioning fc6 / fc7 width.
        logit_scale: ``D -> s``: the logit is ``s * (w . f) + b``. 1 in the official net; the variants
            average over channels (``1 / D``): with the sum, the product of two unnormalised branches
            makes one SGD step at lr 1e-5 move the logits by hundreds (measured), which is why the paper
            trains at lr 1e-10 on a summed loss.
        fcn: ``(stride, offset)`` of the official upsampling (feature coordinate of input pixel ``x`` is
            ``(x + offset) / stride``), or None for torch's ``align_corners=False`` from the grid.
    """

    name: str
    query: Callable
    support: Callable
    fc6_kernel: int
    channels: Callable[[float], int]
    cond_channels: Callable[[float], int]
    fcn: tuple[float, float] | None
    logit_scale: Callable[[int], float]


def vgg_width(width: float) -> int:
    return max(1, round(4096 * width))


# conv1_1 padded by 121 maps fc7 location f to input pixel 32 f - 8.5 (five ceil pools, 7 x 7 fc6).
FCN32 = Geometry(
    "fcn32s", partial(vgg_fcn, first_pad=QUERY_PAD), partial(vgg_fcn, first_pad=1), 7, vgg_width, vgg_width,
    (float(FCN_STRIDE), QUERY_PAD - 112.5), lambda d: 1.0,
)  # fmt: skip
STRIDE8 = Geometry(
    "stride8", as_registered, as_registered, 1, lambda w: 512, lambda w: 1024, None, lambda d: 1.0 / d
)
GEOMETRIES = {"vgg16-dilated": FCN32}  # other encoders: STRIDE8
GEOMETRY_NAMES = {g.name: g for g in (FCN32, STRIDE8)}


def geometry_of(encoder: str) -> Geometry:
    return GEOMETRIES.get(encoder, STRIDE8)


def oslsm_meta(encoder: str, width: float, given: dict | None) -> dict:
    """``meta["oslsm"]``: the defaults of the encoder's geometry, overridden by ``given``; checked."""
    geometry = geometry_of(encoder)
    meta = {
        "geometry": geometry.name,
        "channels": geometry.channels(width),
        "cond_channels": geometry.cond_channels(width),
        "hash_inputs": HASH_INPUTS,
        "hash_seed": HASH_SEED,
        **(given or {}),
    }
    if meta["geometry"] != geometry.name:
        raise ValueError(f"meta oslsm.geometry {meta['geometry']!r} is not {encoder}'s ({geometry.name})")
    for key, least in (("channels", 1), ("cond_channels", 1), ("hash_inputs", 1), ("hash_seed", 0)):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"meta oslsm.{key} must be an integer >= {least}, got {value!r}")
    meta.setdefault("logit_scale", geometry.logit_scale(meta["channels"]))
    if not isinstance(meta["logit_scale"], float) or not 0 < meta["logit_scale"] < float("inf"):
        raise ValueError(f"meta oslsm.logit_scale must be a positive float, got {meta['logit_scale']!r}")
    return meta


@register_method("oslsm")
class OSLSM(FewShotModel):
    """Conditioning branch + weight hashing + query FCN + logistic head (see the module docstring).

    ``encoder`` (the query trunk) and ``support_encoder`` (the conditioning trunk) are unshared modules
    of the same registered encoder; ``meta`` as PANet's plus ``oslsm`` and ``support_size``. Support
    state per shot: its ``D+1`` regression weights (and ``0`` columns for the pair's second part).
    """

    refinements = ("none",)
    train_defaults = {"optimizer": "adamw", "lr": 5e-5}
    scale = 1.0  # no cosine: the logits are the regression's own
    encodes_supports = False  # the conditioning branch reads the support images
    export_ops = EXPORT_OPS

    def __init__(self, encoder: str, width: float = 1.0, meta: dict | None = None, impl: str = "auto"):
        super().__init__()
        meta = dict(meta or {})
        self.geometry_entry = geometry_of(encoder)
        config = oslsm_meta(encoder, width, meta.get("oslsm"))
        self.encoder = build_encoder(encoder, width)
        self.support_encoder = build_encoder(encoder, width)
        c, d, e = self.encoder.out_channels, config["channels"], config["cond_channels"]
        self.fc6 = nn.Conv2d(c, d, self.geometry_entry.fc6_kernel)
        self.fc7 = nn.Conv2d(d, d, 1)
        self.cond_fc6 = nn.Linear(c * POOL_GRID * POOL_GRID, e)
        self.cond_fc7 = nn.Linear(e, e)
        self.cond_fc8 = nn.Linear(e, config["hash_inputs"])
        self.hashing = WeightHashing(config["hash_seed"], d + 1, config["hash_inputs"])
        # w scaled, the bias not: [s, ..., s, 1]
        self.register_buffer("weight_scale", torch.ones(d + 1), persistent=False)
        self.weight_scale[:-1] = config["logit_scale"]
        self.dropout = nn.Dropout(DROPOUT)
        self.init_head()
        self.meta = {
            **default_meta(width, encoder, "oslsm"),
            "support_size": SUPPORT_SIZE,
            **meta,
            "method": "oslsm",
            "encoder": encoder,
            "width": float(width),
            "oslsm": config,
        }
        self.impl = impl

    @classmethod
    def from_graphs(cls, meta: dict, graphs: dict, impl: str = "auto") -> "OSLSM":
        model = super().from_graphs(meta, graphs, impl)
        model.condition_masked = graphs["conditioning"]
        model.geometry_entry = geometry_of(meta["encoder"])  # the exported query branch pads as the model
        return model

    def init_head(self) -> None:
        """He initialisation of the fc layers; fc8 zero, so training starts from logits 0 (a random fc8
        gives logits in the tens over the non-negative features) and the branches learn from there."""
        for layer in (self.fc6, self.fc7, self.cond_fc6, self.cond_fc7):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.cond_fc8.weight)
        nn.init.zeros_(self.cond_fc8.bias)

    def trunks(self) -> list[nn.Module]:
        """The query trunk and the conditioning trunk (initialised and frozen alike)."""
        return [self.encoder, self.support_encoder]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Query branch: ``M x 3 x S x S`` normalised images -> ``M x D x h x w`` fc7 features."""
        x = self.geometry_entry.query(self.encoder, images)
        x = self.dropout(F.relu(self.fc6(x)))
        return self.dropout(F.relu(self.fc7(x)))

    def condition(self, images: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
        """Conditioning branch: ``M x 3 x S x S`` normalised supports, ``M x S x S`` foreground masks ->
        ``M x (D+1)`` regression weights (bias last). Inputs of another size are resized to
        ``support_size`` first (bilinear image, nearest mask)."""
        return self.condition_masked(masked_supports(images, fg, int(self.meta["support_size"])))

    def condition_masked(self, masked: torch.Tensor) -> torch.Tensor:
        """``M x 3 x s x s`` masked supports at the support size -> ``M x (D+1)`` (the exported graph)."""
        x = self.geometry_entry.support(self.support_encoder, masked)
        x = F.adaptive_avg_pool2d(x, POOL_GRID).flatten(1)
        x = self.dropout(F.relu(self.cond_fc6(x)))
        x = self.dropout(F.relu(self.cond_fc7(x)))
        return self.hashing(self.cond_fc8(x)) * self.weight_scale

    def encoder_input_side(self, size: int) -> int:
        """Side of the query trunk's first activations for queries of side ``size`` (the official
        geometry pads conv1_1 by 121): what the memory check scales with."""
        return size + 2 * QUERY_PAD if self.geometry_entry is FCN32 else size

    def geometry(self, in_size) -> tuple | None:
        """The head's upsampling geometry for queries of side ``in_size`` (int or ``(H, W)``)."""
        return head_geometry(self.meta, in_size)

    def export_graphs(self) -> dict[str, nn.Module]:
        """The graphs a bundle holds: the query branch (``images`` -> fc7 ``features``) and the
        conditioning branch (masked supports at the support size -> regression weights)."""
        return {"encoder": Branch(self.encode).eval(), "conditioning": Branch(self.condition_masked).eval()}

    # -- the support state and the head -----------------------------------------------------------------
    def episode_state(self, supp_imgs, supp_fg, supp_bg=None, shot_mask=None, refine="none", impl=None):
        """``B x N x K x 3 x S x S`` supports, ``B x N x K x S x S`` foreground -> ``B x N x K x (D+1)``
        weights. Shots ``shot_mask`` marks absent repeat the way's first shot (the max ignores repeats)."""
        B, N, K = supp_imgs.shape[:3]
        size = int(self.meta["support_size"])
        weights = self.condition_masked(masked_supports(supp_imgs.flatten(0, 2), supp_fg.flatten(0, 2), size))
        weights = weights.unflatten(0, (B, N, K))
        if shot_mask is not None:
            weights = torch.where(shot_mask[..., None].to(weights.device), weights, weights[:, :, :1])
        return weights

    def pool_shots(self, imgs, fg, bg, refine="none", impl=None):
        """``K x 3 x S x S`` shots, ``K x S x S`` masks -> ``K x (D+1)`` weights, ``K x 0``."""
        weights = self.episode_state(imgs[None, None], fg[None, None], bg[None, None])[0, 0]
        return weights, weights[:, :0]

    def combine(self, fg: list[torch.Tensor], bg: list[torch.Tensor]) -> torch.Tensor:
        """Per-way shot weights (``fg[n]``: ``K_n x (D+1)``) -> ``N x K x (D+1)``, a way with fewer shots
        padded with repeats of its first (``bg`` is unused: OSLSM's state is the weights alone)."""
        k = max(len(w) for w in fg)
        return torch.stack([torch.cat([w, w[:1].expand(k - len(w), -1)]) for w in fg])

    def logits(self, qry_feats, weights, out_size, refine="none", impl=None, in_size=None):
        """``B x Q x D x h x w`` queries, ``B x N x K x (D+1)`` weights -> ``B x Q x (1+N) x H x W`` (zero
        background channel first, then each way's max over its shots: the argmax is the head's rule)."""
        ways = logistic.logits(qry_feats, weights, out_size, self.geometry(tuple(in_size or out_size)))
        return torch.cat([torch.zeros_like(ways[:, :, :1]), ways], dim=2)

    def segment(
        self, qry_feats, weights, out_size, refine="none", return_prob=False, impl=None, in_size=None
    ):
        """The fused head: ``B x Q x H x W`` uint8 labels (+ the label's probability)."""
        geometry = self.geometry(tuple(in_size or out_size))
        return logistic.segment(qry_feats, weights, out_size, geometry, return_prob, impl or self.impl)

    def losses(self, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, shot_mask=None, second=True):
        """Sigmoid cross-entropy of every way's logits against its binary mask, void (255) as background
        (the paper's loss), averaged over pixels and ways; OSLSM has no second term (zero)."""
        ways = self(supp_imgs, supp_fg, supp_bg, qry_imgs, shot_mask)[:, :, 1:]
        classes = torch.arange(1, ways.shape[2] + 1, device=qry_labels.device)
        target = (qry_labels[:, :, None] == classes[None, None, :, None, None]).to(ways.dtype)
        loss = F.binary_cross_entropy_with_logits(ways, target)
        return loss, loss.new_zeros(())


class Branch(nn.Module):
    """One branch of an OSLSM as a module of its own (for the ONNX exporter)."""

    def __init__(self, forward: Callable):
        super().__init__()
        self.model = forward.__self__
        self.branch = forward.__name__

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.branch)(images)


def masked_supports(images: torch.Tensor, fg: torch.Tensor, size: int) -> torch.Tensor:
    """``M x 3 x S x S`` normalised supports times their ``M x S x S`` binary masks, at ``size``
    (bilinear image, nearest mask, when ``S != size``): masked-out pixels become the mean colour (0)."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        fg = F.interpolate(fg[:, None].float(), size=(size, size), mode="nearest")[:, 0]
    return images * (fg[:, None] > 0.5).to(images.dtype)


def head_geometry(meta: dict, in_size) -> tuple | None:
    """The upsampling geometry (:mod:`fss.kernels.logistic`) of a checkpoint's or bundle's ``meta`` for
    queries of side ``in_size`` (int or ``(H, W)``)."""
    fcn = GEOMETRY_NAMES[meta["oslsm"]["geometry"]].fcn
    if fcn is None:
        return None
    in_h, in_w = (in_size, in_size) if isinstance(in_size, int) else tuple(in_size)
    return fcn[0], fcn[1], int(in_h), int(in_w)
