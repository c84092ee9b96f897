"""What a segmentation gives: labels with their class list, presence scores, optional maps and objects.

Label order, everywhere (``Segmenter``, ``fss-run``, ``fss-serve``, the page): the classes of a
support set are kept sorted by name, and label ``n`` is the ``n``-th of them (``classes[n - 1]``),
0 the background; a class added to a set takes its place in that order.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fss.io.instances import Instance, find_instances, instance_record
from fss.kernels.guided import GUIDED_SUBSAMPLE, guided_filter
from fss.models.presence import gate_logits


@dataclass
class Segmentation:
    """One query's result.

    ``labels``: ``H x W`` uint8, 0 background, ``n`` the class ``classes[n - 1]``; ``scores``: the
    presence score of each class (``N`` float32 in ``[0, 1]``, :mod:`fss.models.presence`); classes
    scoring below ``min_score`` were judged absent and got no pixels. ``prob``: the winning label's
    probability (``H x W``, on request); ``probs``: every label's (``(1 + N) x H x W``, background
    first, on request); ``instances``: the objects (:mod:`fss.io.instances`, on request).
    """

    labels: np.ndarray
    classes: list[str]
    scores: np.ndarray | None  # None only where a caller asked for labels alone (Segmenter.segment)
    min_score: float = 0.0
    prob: np.ndarray | None = None
    probs: np.ndarray | None = None
    instances: list[Instance] | None = None

    @classmethod
    def of_tensors(cls, labels, prob, scores, probs, classes, min_score) -> "Segmentation":
        """The result of the first query of :func:`head`'s tensors."""
        numpy = lambda t: None if t is None else t[0].float().cpu().numpy()  # noqa: E731
        return cls(
            labels[0].cpu().numpy(), list(classes), numpy(scores), min_score, numpy(prob), numpy(probs)
        )

    def add_instances(self, min_area: int | None, keep_prob: bool) -> None:
        """Find the objects of ``min_area`` pixels or more (None: none asked) from the winner's
        probability, then drop that probability unless it was asked for too."""
        if min_area is not None:
            self.instances = find_instances(self.labels, self.prob, min_area)
        if not keep_prob:
            self.prob = None

    @property
    def absent(self) -> list[str]:
        """The classes judged absent (presence below ``min_score``): they got no pixels."""
        if self.scores is None:
            return []
        return [name for name, score in zip(self.classes, self.scores, strict=True) if score < self.min_score]

    def summary(self) -> dict:
        """Everything but the pixel maps, JSON-ready: classes, scores, absent classes, cut-off, objects
        (COCO records, without image ids)."""
        summary = {
            "classes": list(self.classes),
            "score": self.class_scores(),
            "absent": self.absent,
            "min_score": self.min_score,
        }
        if self.instances is not None:
            summary["instances"] = [instance_record(i, self.classes) for i in self.instances]
        return summary

    def class_scores(self) -> dict[str, float]:
        """Class name -> presence score (rounded to 6 digits, JSON-ready)."""
        if self.scores is None:
            return {}
        return {name: round(float(s), 6) for name, s in zip(self.classes, self.scores, strict=True)}


def sorted_classes(images, masks, classes) -> tuple[list, list, list[str]]:
    """Per-class lists reordered so that the classes are in name order (the label order rule)."""
    order = sorted(range(len(classes)), key=lambda n: classes[n])
    return [images[n] for n in order], [masks[n] for n in order], [classes[n] for n in order]


def head(
    network, feats, protos, out_size, min_score, options, return_prob, scores, return_probs, guides=None
):
    """A method's fused head, each query its own episode where it refines per query: ``M x C x h x w``
    features and ``(1+N) x ...`` state -> ``M x H x W`` uint8 labels, the winner's probability
    (``return_prob``), ``M x N`` presence scores (where asked, or needed to gate: they cost the logits at
    feature resolution once more) and ``M x (1+N) x H x W`` probabilities (``return_probs``); classes
    scoring below ``min_score`` get no pixels. ``options``: the head's refine, impl and in_size.
    ``guides``: ``M x S x S`` grey queries at the encoder's input size for guided edges (:func:`guided`)."""
    refined = options["refine"] != "none"
    qry = feats[:, None] if refined else feats[None]  # M episodes of 1 query, or 1 episode of M
    protos = protos[None].expand(len(qry), *protos.shape)
    flat = (lambda t: t[:, 0]) if refined else (lambda t: t[0])
    protos, refine = network.refine_state(qry, protos, options["refine"])  # once for scores, labels, maps
    options = {**options, "refine": refine}
    if guides is not None:
        presence = network.presence(qry, protos, **options) if scores or min_score > 0 else None
        logits = network.logits(qry, protos, guides.shape[-2:], **options)
        if presence is not None:
            logits = gate_logits(logits, presence, min_score)
        labels, prob, probs = guided(guides, flat(logits), out_size, return_prob, return_probs)
        return labels, prob, presence if presence is None else flat(presence), probs
    presence = None
    if scores or min_score > 0:
        out, presence = network.segment_present(
            qry, protos, out_size, min_score, return_prob=return_prob, **options
        )
    else:
        out = network.segment(qry, protos, out_size, return_prob=return_prob, **options)
    labels, prob = out if return_prob else (out, None)
    probs = None
    if return_probs:
        logits = network.logits(qry, protos, out_size, **options)
        if presence is not None:
            logits = gate_logits(logits, presence, min_score)
        probs = flat(logits.softmax(dim=2))
    return (
        flat(labels),
        prob if prob is None else flat(prob),
        presence if presence is None else flat(presence),
        probs,
    )


def guided(guides, logits, out_size, return_prob: bool, return_probs: bool):
    """``M x S x S`` grey guides and ``M x P x S x S`` logits at the encoder's input size -> labels (and
    the winner's / every label's probability) at ``out_size``: the softmax guided-filtered with each
    query as its guide (:mod:`fss.kernels.guided`), then bilinearly resized."""
    labels, prob, probs = [], [], []
    for guide, query_logits in zip(guides, logits, strict=True):
        filtered = guided_filter(guide, query_logits.float().softmax(dim=0), subsample=GUIDED_SUBSAMPLE)
        resized = F.interpolate(filtered[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
        best, label = resized.max(dim=0)
        labels.append(label.to(torch.uint8))
        prob.append(best.clamp(0, 1))
        if return_probs:
            probs.append(resized.clamp(0, 1))
    return (
        torch.stack(labels),
        torch.stack(prob) if return_prob else None,
        torch.stack(probs) if return_probs else None,
    )
