"""Learn a checkpoint's decision head (``--refine learned``, :mod:`fss.models.decision_head`).

    python -m fss.train.decision fss/assets/demo-panet.pt runs/learned.pt --data runs/demo-data/all

Draws 1-way 1-shot episodes of the checkpoint's training classes (``meta["classes"]``, or
``--classes``) where a share of the queries (``--negatives``, default one half) are photos without the
class, computes each query's matching maps once (the encoder stays as it is), and trains the head on
them: cross-entropy of the class against the background at a quarter of the input size, AdamW with a
cosine schedule, random horizontal flips. Its operating point (``threshold``, the logit a class must
exceed) is the one with the best mean-IoU over a tenth of the episodes kept aside, photos without the
class included: painting them is counted against the class. Only training classes and their photos
are used: held-out photos stay held out. The checkpoint written refines with ``learned`` by default;
its presence calibration, made for other logits, is dropped (``python -m fss.train.presence``).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fss.checkpoint import atomic_save, checkpoint_dict
from fss.cli_args import positive_int
from fss.command import run_command
from fss.constants import IGNORE_INDEX
from fss.errors import FssError
from fss.models.base import method_of
from fss.models.decision_head import DecisionHead, matching_maps
from fss.train.presence import add_checkpoint_args, checkpoint_and_classes, encoded_episodes

PROG = "python -m fss.train.decision"
LABEL_STRIDE = 4  # the loss is taken at a quarter of the input size
THRESHOLDS = torch.arange(-4.0, 2.01, 0.25)  # operating points tried on the kept-aside episodes
BATCH = 32


@torch.no_grad()
def episode_maps(model, dataset, classes, episodes: int, negatives: float, seed: int, cache_mb: float):
    """``E x 7 x h x w`` matching maps (float16) of ``episodes`` 1-way 1-shot queries, their ``E x S' x
    S'`` labels (0 / 1 / 255, every :data:`LABEL_STRIDE`-th pixel) and ``E`` class names."""
    maps, labels, names = [], [], []
    for b, supp, qry in encoded_episodes(model, dataset, classes, episodes, negatives, seed, cache_mb):
        protos = model.episode_state(supp, b.supp_fg, b.supp_bg)
        maps.append(matching_maps(qry, protos, model.scale)[:, 0, 0].half())
        labels.append(b.qry_labels[:, 0, ::LABEL_STRIDE, ::LABEL_STRIDE].to(torch.uint8))
        names += [episode[0] for episode in b.classes]
    return torch.cat(maps), torch.cat(labels), names


def label_logits(head, maps, size) -> torch.Tensor:
    """``M x 7 x h x w`` maps -> the head's ``M x size`` logits (bilinear, as the runtime upsamples)."""
    logits = head(maps.float())[:, None]
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[:, 0]


def head_loss(head, maps, labels) -> torch.Tensor:
    logits = label_logits(head, maps, labels.shape[-2:])
    both = torch.stack([torch.zeros_like(logits), logits], dim=1)
    return F.cross_entropy(both, labels.long(), ignore_index=IGNORE_INDEX)


def fit_head(maps, labels, width: int, steps: int, scale: float, seed: int, log) -> DecisionHead:
    """A :class:`DecisionHead` trained on the maps: batches of :data:`BATCH`, every other one mirrored."""
    torch.manual_seed(seed)
    head = DecisionHead(width, scale)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        pick = torch.randint(len(maps), (BATCH,))
        batch_maps, batch_labels = maps[pick], labels[pick]
        if step % 2:
            batch_maps, batch_labels = batch_maps.flip(-1), batch_labels.flip(-1)
        loss = head_loss(head, batch_maps, batch_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1}/{steps}: loss {loss.item():.4f}")
    return head.eval()


@torch.no_grad()
def best_threshold(head, maps, labels, names) -> tuple[float, float]:
    """The threshold of :data:`THRESHOLDS` with the best mean over classes of TP / (TP + FP + FN) on
    these episodes, all of them (photos without the class add false positives); and that mean-IoU."""
    size = labels.shape[-2:]
    logits = torch.cat([label_logits(head, maps[i : i + 64], size) for i in range(0, len(maps), 64)])
    truth, wrong = labels == 1, labels == 0
    classes = sorted(set(names))
    index = torch.tensor([classes.index(n) for n in names])
    best = (float("-inf"), 0.0)
    for threshold in THRESHOLDS.tolist():
        pred = logits > threshold
        counts = torch.stack([(pred & truth), (pred & wrong), (~pred & truth)]).sum((2, 3)).double()
        per_class = torch.zeros(len(classes), 3, dtype=torch.float64).index_add_(0, index, counts.T)
        seen = per_class.sum(1) > 0
        iou = (per_class[seen, 0] / per_class[seen].sum(1).clamp_min(1)).mean().item()
        best = max(best, (iou, threshold))
    return best[1], best[0]


def learn_file(source: Path, target: Path, data: Path, classes, episodes, negatives, steps, width, seed, log):
    """Write ``target``: ``source`` with a decision head learned on ``data``; returns a summary line."""

    def check_model(model) -> None:
        if "learned" not in method_of(model).refinements:
            raise FssError(f"{model.meta['method']} has no prototype matching for a decision head", source)

    what = "the checkpoint with the decision head"
    model, dataset, classes = checkpoint_and_classes(source, target, data, classes, what, check_model)
    log(f"matching {episodes} episodes of {len(classes)} classes ({negatives:.0%} without the class)")
    maps, labels, names = episode_maps(model, dataset, classes, episodes, negatives, seed, 8192)
    aside = max(1, len(maps) // 10)
    head = fit_head(maps[aside:], labels[aside:], width, steps, model.scale, seed, log)
    threshold, iou = best_threshold(head, maps[:aside], labels[:aside], names[:aside])
    model.decision_head = head
    model.meta.pop("presence", None)
    model.meta.update(refine="learned", decision_head={"width": width, "threshold": threshold})
    atomic_save(checkpoint_dict(model), target)
    return (
        f"{target}: decision head from {len(maps) - aside} episodes; threshold {threshold:+.2f} "
        f"(mean-IoU {iou:.3f} on {aside} kept-aside episodes, photos without the class included)"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="fss checkpoint (PANet or PRNet)")
    add_checkpoint_args(p, "checkpoint to write: the source with a decision head")
    p.add_argument("--episodes", type=positive_int, default=8000, help="episodes (default 8000)")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps (default 2000)")
    p.add_argument("--width", type=positive_int, default=32, help="channels of the head (default 32)")
    args = p.parse_args(argv)
    options = {k: getattr(args, k) for k in ("episodes", "negatives", "steps", "width", "seed")}

    def work() -> None:
        print(learn_file(args.source, args.target, args.data, args.classes, **options, log=print))

    return run_command(PROG, work)


if __name__ == "__main__":
    sys.exit(main())
