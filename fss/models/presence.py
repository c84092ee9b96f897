"""Presence: a score per (query, class) that the class is on the photo, and the gate it drives.

Every few-shot head labels *something* as each registered class, even on a photo without it (the
published protocols always show the class). A presence score is computed from the method's own logits
at feature resolution, so it works for every method: a few statistics of each class's probability map
(:data:`FEATURES`) go through a logistic model learned from negative episodes (training queries
without their class: ``python -m fss.train.presence``) and stored in the checkpoint's
``meta["presence"]``. A checkpoint without one scores a class by its highest pixel probability.

A class whose score is below ``min_score`` is *absent*: its logits are dropped before the argmax, so
its pixels go to the next best label (background or another class).

Shapes: ``B`` episodes, ``Q`` queries, ``P = 1 + N`` labels (background first), ``h x w`` the
feature grid.
"""

import torch

from fss.constants import PRESENCE_FEATURES as FEATURES


def presence_features(low_logits: torch.Tensor) -> torch.Tensor:
    """``B x Q x P x h x w`` logits -> ``B x Q x N x F`` statistics of each class's map (:data:`FEATURES`):
    the share of positions it wins, its highest and mean softmax probability, its mean probability where
    it wins (0 where it wins nowhere), and its largest logit lead over the best other label."""
    prob = low_logits.float().softmax(dim=2)
    wins = torch.nn.functional.one_hot(prob.argmax(dim=2), prob.shape[2]).movedim(-1, 2)[:, :, 1:].float()
    fg = prob[:, :, 1:].flatten(3)
    wins = wins.flatten(3)
    area = wins.mean(dim=3)
    confidence = (fg * wins).sum(dim=3) / wins.sum(dim=3).clamp_min(1)
    top2 = low_logits.float().topk(min(2, low_logits.shape[2]), dim=2).values
    logits = low_logits.float()[:, :, 1:]
    best_other = torch.where(logits >= top2[:, :, :1], top2[:, :, -1:], top2[:, :, :1])
    margin = (logits - best_other).flatten(3).amax(dim=3)
    return torch.stack([area, fg.amax(dim=3), fg.mean(dim=3), confidence, margin], dim=-1)


def presence_scores(low_logits: torch.Tensor, calibration: dict | None = None) -> torch.Tensor:
    """``B x Q x P x h x w`` logits -> ``B x Q x N`` scores in ``[0, 1]``: the calibrated logistic model
    (``meta["presence"]``, :func:`fss.validation.presence_calibration`) where given, else each class's
    highest pixel probability."""
    return statistics_scores(presence_features(low_logits), calibration)


def statistics_scores(stats: torch.Tensor, calibration: dict | None = None) -> torch.Tensor:
    """``... x F`` statistics (:func:`presence_features`) -> ``...`` scores (:func:`presence_scores`)."""
    if calibration is None:
        return stats[..., FEATURES.index("max_prob")]
    mean, std, weights = (stats.new_tensor(calibration[k]) for k in ("mean", "std", "weights"))
    return torch.sigmoid(((stats - mean) / std) @ weights + calibration["bias"])


def gate_logits(logits: torch.Tensor, scores: torch.Tensor, min_score: float) -> torch.Tensor:
    """``B x Q x P x H x W`` logits with absent classes (``B x Q x N`` scores below ``min_score``) at
    ``-inf``, so that the argmax and the softmax go to the other labels; the background is never dropped."""
    absent = scores < min_score
    if not absent.any():
        return logits
    drop = torch.cat([torch.zeros_like(absent[:, :, :1]), absent], dim=2)[..., None, None]
    return logits.masked_fill(drop, float("-inf"))


def default_min_score(meta: dict) -> float:
    """The cut-off a checkpoint ships (its calibration's), else 0: nothing is gated."""
    calibration = meta.get("presence")
    return float(calibration["min_score"]) if calibration else 0.0
