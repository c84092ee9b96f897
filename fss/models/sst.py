"""SST (self-supervised tuning): a learned relation head whose support features are tuned per support set.

The network is a shared encoder (any registered one) and :class:`SSTHead` (CANet's design, the closest
published one; see docs/methods.md "SST"): ``embed`` maps encoder features to the feature map ``R``,
``decode`` compares query features with a tiled support descriptor (late fusion) and decodes 2-class
logits. Per support shot (:func:`tune_shots`): segment the support with itself, one gradient step on its
feature map only (``R' = R - step * dL/dR``, weights unchanged), descriptor = masked average of ``R'``.
K shots are tuned separately; a query gets one prediction per shot, summed with weights from each
shot's self-segmentation IoU, normalised over the way's shots (the paper's Eq. 14). N ways run the
binary head per way, combined as :func:`combined_log_probs` says.

Support state (what ``Segmenter`` caches): per shot a ``C`` descriptor and its IoU; combined into a
``N x K x (C + 1)`` tensor (descriptors, normalised weight; ragged ways padded with weight 0).

Shapes: ``B`` episodes, ``N`` ways, ``K`` shots, ``Q`` queries, ``C`` the head's channels, ``E`` the
encoder's, ``h x w`` features, ``H x W`` images.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fss.constants import IGNORE_INDEX
from fss.models.base import FewShotModel, check_episode, default_meta, encode_episode, register_method
from fss.models.encoders import build_encoder

# CANet's choices where the SST paper is silent; every one is in meta["sst"] (fss-train --sst-*).
DEFAULT_OPTIONS = {
    "channels": 256,  # width of the embedding, comparator and decoder
    "blocks": 2,  # residual blocks of two 3x3 convolutions after the comparator
    "dropout": 0.5,
    "inner_lr": 1.0,  # the paper's step size of R' = R - dL/dR
    "second_order": True,  # training differentiates through the inner step
    "tune": True,  # training runs the inner loop (test time: --refine tune | none)
}
DESCRIPTOR_EPS = 5e-4  # CANet's masked average: sum(R m) / (sum(m) + 5e-4)
LOG_EPS = 1e-12  # floor of probabilities before their log


def options_of(meta: dict) -> dict:
    """The SST options of a checkpoint's metadata (defaults for the missing ones); unknown keys are errors."""
    given = dict(meta.get("sst") or {})
    unknown = sorted(set(given) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown SST option(s) {', '.join(unknown)}")
    options = {**DEFAULT_OPTIONS, **given}
    if int(options["channels"]) < 1 or int(options["blocks"]) < 0 or not 0 <= float(options["dropout"]) < 1:
        raise ValueError(f"bad SST options {options}")
    return options


def dilated_conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=2, dilation=2)


class Residual(nn.Module):
    """``x + conv(relu(conv(relu(x))))`` with 3x3 convolutions (CANet's iterative module block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.body(x)


class ASPP(nn.Module):
    """Global pooling, 1x1 and 3x3 convolutions at dilations 6 / 12 / 18, concatenated, then 1x1."""

    def __init__(self, channels: int):
        super().__init__()
        self.pooled = nn.Conv2d(channels, channels, 1)
        self.branches = nn.ModuleList(
            [nn.Conv2d(channels, channels, 1)]
            + [nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in (6, 12, 18)]
        )
        self.project = nn.Conv2d(5 * channels, channels, 1)

    def forward(self, x):
        pooled = F.relu(self.pooled(x.mean(dim=(2, 3), keepdim=True))).expand_as(x)
        outs = [pooled] + [F.relu(branch(x)) for branch in self.branches]
        return F.relu(self.project(torch.cat(outs, dim=1)))


class SSTHead(nn.Module):
    """``embed``: ``M x E x h x w`` encoder features -> ``M x C x h x w``; ``decode``: query features and
    tiled descriptors, ``M x C x h x w`` each -> ``M x 2 x h x w`` logits (background, foreground)."""

    def __init__(self, in_channels: int, channels: int = 256, blocks: int = 2, dropout: float = 0.5):
        super().__init__()
        self.embed = nn.Sequential(dilated_conv(in_channels, channels), nn.ReLU(), nn.Dropout2d(dropout))
        self.compare = nn.Sequential(dilated_conv(2 * channels, channels), nn.ReLU(), nn.Dropout2d(dropout))
        self.blocks = nn.Sequential(*[Residual(channels) for _ in range(blocks)])
        self.aspp = ASPP(channels)
        self.classifier = nn.Conv2d(channels, 2, 1)

    def decode(self, qry: torch.Tensor, tiled: torch.Tensor) -> torch.Tensor:
        x = self.compare(torch.cat([qry, tiled], dim=1))
        return self.classifier(self.aspp(self.blocks(x)))

    def relate(self, qry: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        """``M x C x h x w`` query features, ``M x C`` descriptors -> ``M x 2 x h x w`` logits."""
        return self.decode(qry, descriptors[:, :, None, None].expand_as(qry))


# -- the support side: self-segmentation, the inner step, descriptors ---------------------------------
def feature_masks(fg: torch.Tensor, size) -> torch.Tensor:
    """``K x H x W`` foreground masks -> ``K x h x w`` (bilinear, as CANet resizes masks to features)."""
    fg = fg if fg.is_floating_point() else fg.float()
    return F.interpolate(fg[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def descriptors(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked average pooling: ``K x C x h x w`` features, ``K x h x w`` masks -> ``K x C``."""
    return (feats * masks[:, None]).sum(dim=(2, 3)) / (masks.sum(dim=(1, 2))[:, None] + DESCRIPTOR_EPS)


def support_labels(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """``... x H x W`` masks -> int64 labels: 1 foreground, 0 background (wins), 255 neither."""
    labels = torch.full(fg.shape, IGNORE_INDEX, dtype=torch.long, device=fg.device)
    labels[fg == 1] = 1
    labels[bg == 1] = 0
    return labels


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def self_segmentation(head: SSTHead, feats: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Each support segmented by its own descriptor: ``K x C x h x w``, ``K x H x W`` -> ``K x 2 x H x W``."""
    low = head.relate(feats, descriptors(feats, feature_masks(fg, feats.shape[-2:])))
    return upsample(low, fg.shape[-2:])


def shot_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``K x 2 x H x W`` logits, ``K x H x W`` labels -> ``K`` cross-entropies (mean over valid pixels)."""
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return ce.sum(dim=(1, 2)) / (labels != IGNORE_INDEX).sum(dim=(1, 2)).clamp_min(1)


def foreground_iou(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``K x 2 x H x W`` logits, ``K x H x W`` labels -> ``K`` IoUs of the predicted foreground (255 not
    counted; 0 where prediction and label have no foreground)."""
    pred, true, valid = logits.argmax(dim=1) == 1, labels == 1, labels != IGNORE_INDEX
    tp = (pred & true).sum(dim=(1, 2))
    union = ((pred & valid) | true).sum(dim=(1, 2))
    return tp / union.clamp_min(1)


def inner_step(head, feats, fg, labels, step: float, create_graph: bool = False):
    """The self-supervised inner loop on ``K`` shots, each on its own.

    Args:
        head: an :class:`SSTHead`; feats: ``K x C x h x w`` support feature maps ``R``;
        fg: ``K x H x W`` foreground masks; labels: ``K x H x W`` (1 fg, 0 bg, 255 ignored).
        step: the step size (0: no tuning); create_graph: keep the step differentiable (second order).

    Returns:
        ``R' = R - step * dL/dR`` (``K x C x h x w``), the ``K`` self-segmentation losses ``L`` (before the
        step; differentiable where ``feats`` is) and their ``K`` foreground IoUs.
    """
    with torch.enable_grad():
        leaf = not feats.requires_grad
        if leaf:  # inference: the features are constants; only dL/dR is wanted
            feats = feats.detach().requires_grad_(True)
        logits = self_segmentation(head, feats, fg)
        losses = shot_losses(logits, labels)
        tuned = feats
        if step:
            # Shots are independent, so the gradient of the sum is each shot's own dL_k/dR_k.
            (grad,) = torch.autograd.grad(losses.sum(), feats, create_graph=create_graph, retain_graph=True)
            tuned = feats - step * grad
        if leaf:
            tuned, losses = tuned.detach(), losses.detach()
    return tuned, losses, foreground_iou(logits.detach(), labels)


def tune_shots(head, enc_feats, fg, bg, step: float, create_graph: bool = False):
    """``K x E x h x w`` encoder features of K shots, ``K x H x W`` masks -> ``K x C`` descriptors of the
    tuned feature maps, ``K`` self-segmentation losses, ``K`` IoUs (:func:`inner_step`)."""
    with torch.inference_mode(False):
        feats = head.embed(enc_feats.clone() if enc_feats.is_inference() else enc_feats)
        fg, labels = fg.clone(), support_labels(fg.clone(), bg.clone())
        tuned, losses, iou = inner_step(head, feats, fg, labels, step, create_graph)
        return descriptors(tuned, feature_masks(fg, tuned.shape[-2:])), losses, iou


def shot_weights(iou: torch.Tensor, shot_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``... x K`` self-segmentation IoUs -> weights normalised over the K shots (Eq. 14); padded shots
    (``shot_mask`` False) weigh 0; a way whose shots all score 0 weighs them equally."""
    present = torch.ones_like(iou, dtype=torch.bool) if shot_mask is None else shot_mask.bool()
    iou = torch.where(present, iou, torch.zeros_like(iou))
    total = iou.sum(dim=-1, keepdim=True)
    uniform = present.float() / present.float().sum(dim=-1, keepdim=True).clamp_min(1)
    return torch.where(total > 0, iou / total.clamp_min(1e-12), uniform)


def support_state(desc: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``... x K x C`` descriptors, ``... x K`` weights -> ``... x K x (C + 1)``."""
    return torch.cat([desc, weights[..., None].to(desc.dtype)], dim=-1)


# -- the query side ------------------------------------------------------------------------------------
def way_probabilities(head, qry_feats, state, out_size) -> torch.Tensor:
    """``B x Q x C x h x w`` query feature maps, ``B x N x K x (C + 1)`` states -> ``B x Q x N x 2 x H x W``:
    per way, the IoU-weighted sum over its shots of the binary softmax at ``out_size``."""
    B, Q = qry_feats.shape[:2]
    N, K = state.shape[1:3]
    desc, weights = state[..., :-1], state[..., -1]
    present = weights > 0  # padded shots and zero weights cost nothing
    b, n, k = present.nonzero(as_tuple=True)
    pairs_q = qry_feats[b].flatten(0, 1)  # (S Q) x C x h x w, S present shots
    pairs_d = desc[b, n, k][:, None].expand(-1, Q, -1).flatten(0, 1)
    prob = upsample(head.relate(pairs_q, pairs_d), out_size).softmax(dim=1).unflatten(0, (len(b), Q))
    out = prob.new_zeros(B, N, Q, 2, *prob.shape[-2:])
    out.index_put_((b, n), prob * weights[b, n, k][:, None, None, None, None], accumulate=True)
    return out.transpose(1, 2)


def combined_log_probs(way_prob: torch.Tensor) -> torch.Tensor:
    """``B x Q x N x 2 x H x W`` per-way probabilities -> ``B x Q x (1 + N) x H x W`` log-probabilities:
    background = the geometric mean over ways of their background, way n = its foreground. One way: the
    binary head's own log-softmax; a pixel goes to the likeliest way unless every way's background is
    likelier (on the geometric mean)."""
    logp = way_prob.clamp_min(LOG_EPS).log()
    return torch.cat([logp[:, :, :, 0].mean(dim=2, keepdim=True), logp[:, :, :, 1]], dim=2)


def embed_queries(head, qry_feats):
    """``B x Q x E x h x w`` encoder features -> ``B x Q x C x h x w``."""
    return head.embed(qry_feats.flatten(0, 1)).unflatten(0, qry_feats.shape[:2])


# -- the network --------------------------------------------------------------------------------------
@register_method("sst")
class SST(FewShotModel):
    """An encoder and an :class:`SSTHead`; ``meta["sst"]`` holds the head's and the inner loop's options.

    The support side runs on ``head`` (PyTorch: the inner step needs gradients), the query side on
    ``query_head`` where set (a bundle's ONNX graph), else on ``head``.
    """

    default_refine = "tune"
    refinements = ("none", "tune")
    train_defaults = {"lr": 5e-4}
    scale = 1.0  # unused: the head is learned
    query_head = None

    def __init__(self, encoder: str, width: float = 1.0, meta: dict | None = None, impl: str = "auto"):
        super().__init__()
        meta = dict(meta or {})
        self.options = options_of(meta)
        self.encoder = build_encoder(encoder, width)
        self.head = SSTHead(
            self.encoder.out_channels,
            int(self.options["channels"]),
            int(self.options["blocks"]),
            float(self.options["dropout"]),
        )
        self.meta = {
            **default_meta(width, encoder, "sst"),
            **meta,
            "method": "sst",
            "encoder": encoder,
            "width": float(width),
            "sst": self.options,
        }
        self.impl = impl

    @classmethod
    def from_graphs(cls, meta: dict, graphs: dict, impl: str = "auto") -> "SST":
        model = super().from_graphs(meta, graphs, impl)
        model.options, model.head, model.query_head = options_of(meta), graphs["head"], graphs["query_head"]
        return model

    def export_graphs(self) -> dict:
        """The encoder, and the head (its query path as ONNX, its weights for the support side)."""
        return {"encoder": self.encoder, "head": self.head}

    def step(self, refine: str) -> float:
        """The inner step size of ``refine`` ("tune": the checkpoint's; else no tuning)."""
        return float(self.options["inner_lr"]) if refine == "tune" else 0.0

    def pool_shots(self, feats, fg, bg, refine="none", impl=None):
        """``K x E x h x w`` features, ``K x S x S`` masks -> ``K x C`` descriptors, ``K x 1`` IoUs."""
        desc, _, iou = tune_shots(self.head, feats, fg, bg, self.step(refine))
        return desc, iou[:, None].to(desc.dtype)

    def combine(self, desc: list[torch.Tensor], iou: list[torch.Tensor]) -> torch.Tensor:
        """Per-way ``K_n x C`` descriptors and ``K_n x 1`` IoUs -> ``N x K x (C + 1)`` state, K = max K_n."""
        N, K, C = len(desc), max(len(d) for d in desc), desc[0].shape[1]
        padded = desc[0].new_zeros(N, K, C)
        ious = desc[0].new_zeros(N, K)
        shot_mask = torch.zeros(N, K, dtype=torch.bool, device=desc[0].device)
        for n, (d, i) in enumerate(zip(desc, iou, strict=True)):
            padded[n, : len(d)], ious[n, : len(d)], shot_mask[n, : len(d)] = d, i[:, 0], True
        return support_state(padded, shot_weights(ious, shot_mask))

    def episode_state(self, supp_feats, supp_fg, supp_bg, shot_mask=None, refine="none", impl=None):
        """``B x N x K x E x h x w`` features, ``B x N x K x H x W`` masks -> ``B x N x K x (C + 1)``."""
        B, N, K = supp_feats.shape[:3]
        desc, _, iou = tune_shots(
            self.head,
            supp_feats.flatten(0, 2),
            supp_fg.flatten(0, 2),
            supp_bg.flatten(0, 2),
            self.step(refine),
        )
        return support_state(desc.unflatten(0, (B, N, K)), shot_weights(iou.view(B, N, K), shot_mask))

    def logits(self, qry_feats, state, out_size, refine="none", impl=None, in_size=None):
        """``B x Q x E x h x w`` encoder features, ``B x N x K x (C + 1)`` states -> ``B x Q x (1 + N) x H x
        W`` log-probabilities (:func:`combined_log_probs`)."""
        head = self.query_head or self.head
        with torch.inference_mode(False):
            feats = qry_feats.clone() if qry_feats.is_inference() else qry_feats
            state = state.clone() if state.is_inference() else state
            return combined_log_probs(way_probabilities(head, embed_queries(head, feats), state, out_size))

    def segment(self, qry_feats, state, out_size, refine="none", return_prob=False, impl=None, in_size=None):
        """:meth:`logits` + argmax: ``B x Q x H x W`` uint8 labels (+ the winning class's probability)."""
        logp = self.logits(qry_feats, state, out_size)
        labels = logp.argmax(dim=2).to(torch.uint8)
        if not return_prob:
            return labels
        return labels, logp.softmax(dim=2).amax(dim=2)

    def forward(self, supp_imgs, supp_fg, supp_bg, qry_imgs, shot_mask=None, refine="tune"):
        """``B x Q x (1 + N) x H x W`` log-probabilities of the queries (the uncached reference path)."""
        return super().forward(supp_imgs, supp_fg, supp_bg, qry_imgs, shot_mask, refine)

    def losses(self, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, shot_mask=None, second=True):
        """``(query_loss, aux_loss)``: the query's negative log-likelihood under the combined prediction, and
        the mean self-segmentation cross-entropy of the shots (the auxiliary loss; zero unless ``second``).

        The inner step runs when ``meta["sst"]["tune"]``; ``second_order`` keeps it differentiable.
        """
        check_episode(supp_imgs, supp_fg, supp_bg, qry_imgs)
        B, N, K = supp_imgs.shape[:3]
        options = self.options
        step = float(options["inner_lr"]) if options["tune"] else 0.0
        supp_feats, qry_feats = encode_episode(self.encode, supp_imgs, qry_imgs)
        head = self.head
        desc, shot_loss, iou = tune_shots(
            head,
            supp_feats.flatten(0, 2),
            supp_fg.flatten(0, 2),
            supp_bg.flatten(0, 2),
            step,
            create_graph=bool(options["second_order"]),
        )
        state = support_state(desc.unflatten(0, (B, N, K)), shot_weights(iou.view(B, N, K), shot_mask))
        logp = combined_log_probs(
            way_probabilities(head, embed_queries(head, qry_feats), state, qry_imgs.shape[-2:])
        )
        query_loss = F.nll_loss(logp.flatten(0, 1), qry_labels.flatten(0, 1), ignore_index=IGNORE_INDEX)
        if not second:
            return query_loss, query_loss.new_zeros(())
        present = shot_loss.new_ones(B * N * K) if shot_mask is None else shot_mask.flatten().float()
        return query_loss, (shot_loss * present).sum() / present.sum()

    @classmethod
    def add_train_options(cls, parser, types) -> None:
        group = parser.add_argument_group("SST (--method sst; see docs/methods.md)")
        for flag, kind, text in (
            ("channels", types.positive_int, "head width (default 256, CANet's)"),
            ("blocks", types.count, "residual blocks after the comparator (default 2)"),
            ("inner-lr", types.non_negative_float, "inner step size: R' = R - lr dL/dR (default 1)"),
        ):
            group.add_argument(f"--sst-{flag}", type=kind, default=None, help=text)
        group.add_argument(
            "--sst-first-order", action="store_true", help="no gradient through the inner step"
        )
        group.add_argument(
            "--sst-no-tune", action="store_true", help="no inner loop (evaluate: --refine none)"
        )

    @classmethod
    def train_options(cls, args) -> dict:
        """The ``--sst-*`` options given, as ``meta["sst"]`` entries."""
        options = {"channels": args.sst_channels, "blocks": args.sst_blocks, "inner_lr": args.sst_inner_lr}
        options = {name: value for name, value in options.items() if value is not None}
        if args.sst_first_order:
            options["second_order"] = False
        if args.sst_no_tune:
            options["tune"] = False
        return options
