"""Few-shot mean-IoU on held-out classes, counted as the official PANet evaluation does.

Per episode and per class of the episode: true positives, false positives and false negatives of
the query pixels (pixels labelled 255 are not counted), summed over all episodes; class IoU =
TP / (TP + FP + FN); mean-IoU = the mean over classes. Episodes come from a Generator seeded with
``seed`` alone, so the same classes, images and seed give the same episodes in every run.
"""

from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from fss.constants import IGNORE_INDEX
from fss.train.data import EpisodeSampler, FolderDataset

EVAL_SEED = 1234  # the official test seed


def episode_counts(pred: torch.Tensor, labels: torch.Tensor, ways: int) -> list[tuple[int, int, int]]:
    """``Q x H x W`` predicted and true labels -> (TP, FP, FN) of ways 1..N."""
    valid = labels != IGNORE_INDEX
    counts = []
    for way in range(1, ways + 1):
        predicted, true = (pred == way) & valid, labels == way
        counts.append(
            (
                int((predicted & true).sum()),
                int((predicted & ~true).sum()),
                int((~predicted & true).sum()),
            )
        )
    return counts


@torch.no_grad()
def evaluate(
    model,
    dataset: FolderDataset,
    classes: list[str],
    ways: int = 1,
    shots: int = 1,
    episodes: int = 1000,
    seed: int = EVAL_SEED,
    progress: bool = False,
) -> dict:
    """Mean-IoU of ``model`` over ``episodes`` seeded episodes of ``classes`` (one query per way)."""
    sampler = EpisodeSampler(
        dataset, classes, ways, shots, queries=1, rng=np.random.default_rng(seed), what="validation classes"
    )
    was_training = model.training
    model.eval()
    totals = defaultdict(lambda: np.zeros(3, dtype=np.int64))
    for _ in tqdm(range(episodes), desc="eval", leave=False, disable=not progress):
        batch = sampler.batch(1)
        logits = model(batch.supp_imgs, batch.supp_fg, batch.supp_bg, batch.qry_imgs)
        counts = episode_counts(logits.argmax(dim=2)[0], batch.qry_labels[0], ways)
        for cls, tp_fp_fn in zip(batch.classes[0], counts, strict=True):
            totals[cls] += tp_fp_fn
    model.train(was_training)
    class_iou = {cls: float(t[0] / max(t.sum(), 1)) for cls, t in sorted(totals.items())}
    return {
        "mean_iou": float(np.mean(list(class_iou.values()))),
        "class_iou": class_iou,
        "classes": sorted(classes),
        "ways": ways,
        "shots": shots,
        "episodes": episodes,
        "seed": seed,
    }
