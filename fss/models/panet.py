"""PANet: prototypes by masked average pooling, ``20 x cosine`` matching, batched over episodes.

The network is an encoder and the non-parametric prototype head (shared with PRNet); training adds the
query cross-entropy and the prototype alignment (PAR) losses, as the official training computes them.
"""

import torch
import torch.nn.functional as F

from fss import kernels
from fss.constants import IGNORE_INDEX, POOL_EPS
from fss.kernels.matching import cosine_logits, upsample
from fss.models.base import FewShotModel, check_episode, default_meta, encode_episode, register_method
from fss.models.decision_head import DecisionHead, decision_logits
from fss.models.encoders import DEFAULT_ENCODER, build_encoder
from fss.models.presence import presence_scores


def refine_prototypes(qry_feats, protos, refine: str, scale: float):
    """``B x P x C`` support prototypes refined on the ``B x Q x C x h x w`` queries of each episode:
    PRNet's fusion or self-support prototypes (adaptation happens before the features are computed)."""
    if refine.endswith("fusion"):
        from fss.models.fusion import fuse_prototypes

        return fuse_prototypes(qry_feats, protos)
    if refine == "ssp":
        from fss.models.self_support import self_support_prototypes

        return self_support_prototypes(qry_feats, protos, scale)
    return protos


@register_method("panet")
class PANet(FewShotModel):
    """A prototype network: an encoder plus the non-parametric prototype head (PANet's, PRNet's).

    ``meta`` describes the checkpoint (method, encoder, width, input size, normalisation, classes seen
    in training, training config); ``impl`` picks the kernels (``fss.kernels``) of the head. The encoder
    is ``encoder`` (a name of :mod:`fss.models.encoders`), else ``meta["encoder"]``, else the paper's.
    Support state per shot: the ``C`` foreground and background poolings; per episode: ``P x C``
    prototypes (foreground mean over shots, background mean over ways of the per-way means).
    """

    train_defaults = {"lr": 1e-3}

    def __init__(
        self, width: float = 1.0, meta: dict | None = None, impl: str = "auto", encoder: str | None = None
    ):
        super().__init__()
        meta = dict(meta or {})
        encoder = encoder or meta.get("encoder") or DEFAULT_ENCODER
        self.encoder = build_encoder(encoder, width)
        method = meta.get("method", self.name)
        self.meta = {
            **default_meta(width, encoder, method),
            **meta,
            "encoder": encoder,
            "width": float(width),
        }
        self.impl = impl
        if "decision_head" in self.meta:  # --refine learned (python -m fss.train.decision)
            self.decision_head = DecisionHead(int(self.meta["decision_head"]["width"]), self.scale)

    @classmethod
    def from_graphs(cls, meta: dict, graphs: dict, impl: str = "auto") -> "PANet":
        model = super().from_graphs(meta, graphs, impl)
        if "decision_head" in graphs:
            model.decision_head = graphs["decision_head"]
        return model

    def export_graphs(self) -> dict:
        """The encoder, and the learned decision head where the checkpoint has one (run in PyTorch)."""
        extra = {"decision_head": self.decision_head} if hasattr(self, "decision_head") else {}
        return {"encoder": self.encoder, **extra}

    @classmethod
    def build(cls, encoder: str, width: float, meta: dict, impl: str) -> "PANet":
        return cls(width=width, meta=meta, impl=impl, encoder=encoder)

    def episode_features(self, supp_imgs, qry_imgs):
        """One encoder pass over supports and queries: ``B x N x K x C x h x w``, ``B x Q x C x h x w``."""
        return encode_episode(self.encode, supp_imgs, qry_imgs)

    # -- the prototype head ----------------------------------------------------------------------------
    def episode_state(self, supp_feats, supp_fg, supp_bg, shot_mask=None, refine="none", impl=None):
        """``B x N x K x C x h x w`` features, ``B x N x K x H x W`` masks -> ``B x P x C`` prototypes."""
        return kernels.prototypes(supp_feats, supp_fg, supp_bg, shot_mask, impl=impl or self.impl)

    def pool_shots(self, feats, fg, bg, refine="none", impl=None):
        """``K x C x h x w`` features of K shots, ``K x S x S`` fg / bg masks -> ``K x C`` fg and bg."""
        pooled = kernels.prototypes(
            feats[:, None, None], fg[:, None, None], bg[:, None, None], impl=impl or self.impl
        )
        return pooled[:, 1], pooled[:, 0]  # each shot as its own 1-way 1-shot episode: [bg, fg]

    def combine(self, fg: list[torch.Tensor], bg: list[torch.Tensor]) -> torch.Tensor:
        """Per-shot poolings (``fg[n]``, ``bg[n]``: ``K_n x C``) -> ``(1+N) x C`` prototypes."""
        fg_protos = torch.stack([pools.mean(dim=0) for pools in fg])
        bg_proto = torch.stack([pools.mean(dim=0) for pools in bg]).mean(dim=0, keepdim=True)
        return torch.cat([bg_proto, fg_protos])

    def logits(self, qry_feats, protos, out_size, refine="none", impl=None, in_size=None):
        """``B x Q x C x h x w`` queries, ``B x P x C`` prototypes -> ``B x Q x P x H x W`` logits."""
        if refine == "learned":
            threshold = float(self.meta["decision_head"]["threshold"])
            low = decision_logits(self.decision_head, qry_feats, protos, self.scale, threshold)
            return low if tuple(out_size) == tuple(low.shape[-2:]) else upsample(low, out_size)
        protos = refine_prototypes(qry_feats, protos, refine, self.scale)
        return kernels.match(qry_feats, protos, tuple(out_size), self.scale, impl=impl or self.impl)

    def segment(self, qry_feats, protos, out_size, refine="none", return_prob=False, impl=None, in_size=None):
        """The fused fast path of :meth:`logits` + argmax: ``B x Q x H x W`` uint8 labels (+ max prob)."""
        if refine == "learned":
            prob, labels = self.logits(qry_feats, protos, out_size, refine).softmax(dim=2).max(dim=2)
            labels = labels.to(torch.uint8)
            return (labels, prob) if return_prob else labels
        protos = refine_prototypes(qry_feats, protos, refine, self.scale)
        return kernels.segment(
            qry_feats, protos, tuple(out_size), self.scale, return_prob=return_prob, impl=impl or self.impl
        )

    def presence(self, qry_feats, protos, refine="none", impl=None, in_size=None):
        """:meth:`FewShotModel.presence`; the decision head's scores are its highest probability: the
        checkpoint's calibration is fitted to matching logits, and the head judges absence itself."""
        if refine != "learned":
            return super().presence(qry_feats, protos, refine, impl, in_size)
        return presence_scores(self.logits(qry_feats, protos, qry_feats.shape[-2:], refine))

    def refine_state(self, qry_feats, protos, refine="none"):
        """The prototypes refined on the queries (:func:`refine_prototypes`), nothing left to refine; the
        learned head refines inside (it reads the support's prototypes too)."""
        if refine == "learned":
            return protos, refine
        return refine_prototypes(qry_feats, protos, refine, self.scale), "none"

    # -- training --------------------------------------------------------------------------------------
    def losses(self, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, shot_mask=None, second=True):
        """Query cross-entropy and PAR (:func:`panet_losses`)."""
        return panet_losses(self, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, shot_mask, align=second)


def support_labels(supp_fg, supp_bg):
    """``... x H x W`` masks -> int64 labels: 1 where fg == 1, 0 where bg == 1 (bg wins), 255 elsewhere."""
    labels = torch.full(supp_fg.shape, IGNORE_INDEX, dtype=torch.long, device=supp_fg.device)
    labels[supp_fg == 1] = 1
    labels[supp_bg == 1] = 0
    return labels


def query_prototypes(qry_feats, low_logits):
    """Hard-masked average of the query features by the argmax at feature resolution.

    ``B x Q x C x h x w``, ``B x Q x P x h x w`` -> prototypes ``B x P x C`` pooled over all queries of
    an episode, and ``B x P`` pixel counts.
    """
    P = low_logits.shape[2]
    onehot = F.one_hot(low_logits.argmax(dim=2), P).movedim(-1, 2).to(qry_feats.dtype)  # B x Q x P x h x w
    counts = onehot.sum(dim=(1, 3, 4))
    sums = torch.einsum("bqchw,bqphw->bpc", qry_feats, onehot)
    return sums / (counts + POOL_EPS)[..., None], counts


def alignment_loss(supp_feats, supp_fg, supp_bg, qry_feats, low_logits, scale, shot_mask=None):
    """PAR: segment each support image with the query's [background, way n] prototypes.

    Cross-entropy against the support labels, averaged over each way's shots and over ways; ways
    that no query pixel was assigned to are skipped; the result is the mean over the B episodes.
    """
    B, N, K = supp_feats.shape[:3]
    qry_protos, counts = query_prototypes(qry_feats, low_logits)
    pairs = torch.stack([qry_protos[:, :1].expand(B, N, -1), qry_protos[:, 1:]], dim=2)  # B x N x 2 x C
    # Each (episode, way) is a mini-episode: its K support images against its 2 query prototypes.
    low = cosine_logits(supp_feats.flatten(0, 1), pairs.flatten(0, 1), scale)  # (B N) x K x 2 x h x w
    up = F.interpolate(low.flatten(0, 1), size=supp_fg.shape[-2:], mode="bilinear", align_corners=False)
    labels = support_labels(supp_fg, supp_bg).flatten(0, 2)  # (B N K) x H x W
    ce = F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX, reduction="none")
    per_shot = (ce.sum(dim=(1, 2)) / (labels != IGNORE_INDEX).sum(dim=(1, 2))).view(B, N, K)
    shots = torch.ones(B, N, K, device=supp_feats.device) if shot_mask is None else shot_mask.float()
    weight = shots / shots.sum(dim=2, keepdim=True) / N * (counts[:, 1:] > 0)[..., None]
    per_episode = torch.where(weight > 0, per_shot * weight, torch.zeros_like(per_shot)).sum(dim=(1, 2))
    return per_episode.mean()


def panet_losses(model, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, shot_mask=None, align=True):
    """``(query_loss, align_loss)`` as the official training computes them.

    Args:
        model: a :class:`fss.PANet`.
        supp_imgs: ``B x N x K x 3 x H x W``; supp_fg, supp_bg: ``B x N x K x H x W``;
        qry_imgs: ``B x Q x 3 x H x W``; qry_labels: ``B x Q x H x W`` int64 (0 background, n way n,
        255 ignored); shot_mask: optional ``B x N x K`` bool for ragged ways.
        align: compute PAR (else ``align_loss`` is a zero tensor).

    The query loss is the cross-entropy (ignore 255) over all queries of all episodes; the total
    training loss is ``query_loss + align_weight * align_loss`` (paper: weight 1).
    """
    check_episode(supp_imgs, supp_fg, supp_bg, qry_imgs)
    B, Q = qry_imgs.shape[:2]
    if tuple(qry_labels.shape) != (B, Q, *qry_imgs.shape[-2:]):
        raise ValueError(f"qry_labels must be B x Q x H x W, got {tuple(qry_labels.shape)}")
    supp_feats, qry_feats = model.episode_features(supp_imgs, qry_imgs)
    protos = kernels.prototypes(supp_feats, supp_fg, supp_bg, shot_mask, impl="torch")
    low = cosine_logits(qry_feats, protos, model.scale)  # B x Q x (1+N) x h x w
    logits = upsample(low, qry_imgs.shape[-2:])
    query_loss = F.cross_entropy(logits.flatten(0, 1), qry_labels.flatten(0, 1), ignore_index=IGNORE_INDEX)
    if not align:
        return query_loss, query_loss.new_zeros(())
    return query_loss, alignment_loss(
        supp_feats, supp_fg, supp_bg, qry_feats, low.detach(), model.scale, shot_mask
    )
