"""Few-shot segmentation scores, counted as the official PANet evaluation (``util/metric.py``) does.

Per query image, for the background and each way whose class its labels contain: true positives,
false positives and false negatives of the query pixels (pixels labelled 255 are not counted),
summed over the episodes of a run. Class IoU = TP / (TP + FP + FN); **mean-IoU** = the mean over the
test classes; **binary-IoU** (FB-IoU) = the mean of the background IoU and the foreground IoU, whose
counts are the sums over all classes. A run draws its episodes from a Generator seeded with its seed
alone (run r of ``evaluate_runs``: seed + r); reported numbers are the mean and std over runs.

This one implementation serves ``fss-train``'s validation and ``fss-eval``. Episodes go through the
model in batches: one encoder call for all their images, then the fused kernels of ``fss.kernels``
(prototypes, then matching with the argmax fused into the upsampling).
"""

import time
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from fss.constants import IGNORE_INDEX
from fss.errors import SettingError
from fss.kernels.guided import grey_of_normalised, guided_labels
from fss.models.adaptation import adapted
from fss.models.base import adapts
from fss.models.presence import gate_logits
from fss.train.data import EpisodeBatch, EpisodeDataset, EpisodeSampler

EVAL_SEED = 1234  # the official test seed
EVAL_BATCH = 8  # episodes per model call


def query_counts(pred: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """``B x Q x H x W`` predicted and true labels -> ``B x (1+N) x 3`` int64 (TP, FP, FN), background
    first, summed over each episode's queries; a class counts in a query only where its labels hold it."""
    valid = labels != IGNORE_INDEX
    per_class = []
    for j in range(ways + 1):
        predicted, true = (pred == j) & valid, labels == j
        tp_fp_fn = (predicted & true, predicted & ~true, true & ~predicted)
        counts = torch.stack([m.flatten(2).sum(-1) for m in tp_fp_fn], dim=-1)  # B x Q x 3
        present = true.flatten(2).any(-1, keepdim=True)
        per_class.append((counts * present).sum(dim=1))
    return torch.stack(per_class, dim=1)


def absent_shares(pred: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """The share of a query's counted pixels labelled as way n, for each (query, way) whose class the
    query's labels do not hold (1-D: a class painted on a photo without it; 0 is right)."""
    valid = (labels != IGNORE_INDEX).flatten(2)
    shares = []
    for j in range(1, ways + 1):
        absent = ~(labels == j).flatten(2).any(-1)  # B x Q
        painted = ((pred == j).flatten(2) & valid).sum(-1) / valid.sum(-1).clamp(min=1)
        shares.append(painted[absent])
    return torch.cat(shares).double()


PER_RUN_KEYS = ("run", "seed", "mean_iou", "binary_iou", "class_iou")
ABSENT_OVER = (0.01, 0.05)  # shares of painted pixels reported for photos without the class


class AbsentCounts:
    """Photos without a way's class: how many, the sum of the shares painted, how many over each of
    :data:`ABSENT_OVER` (sums, so that processes' parts add up)."""

    def __init__(self):
        self.counts = np.zeros(2 + len(ABSENT_OVER))

    def add(self, shares: torch.Tensor) -> None:
        shares = shares.cpu().numpy()
        self.counts += [len(shares), shares.sum(), *((shares > t).sum() for t in ABSENT_OVER)]

    def summary(self) -> dict:
        n = max(self.counts[0], 1)
        over = zip(ABSENT_OVER, self.counts[2:], strict=True)
        over = {f"over_{round(t * 100)}pct": float(c / n) for t, c in over}
        return {"queries": int(self.counts[0]), "mean_share": float(self.counts[1] / n), **over}


class IouCounts:
    """TP / FP / FN of one run: row 0 the background, then one row per test class."""

    def __init__(self, classes: list[str]):
        self.classes = list(classes)
        self.counts = np.zeros((1 + len(self.classes), 3), dtype=np.int64)

    def add(self, episode_classes: list[list[str]], counts: torch.Tensor) -> None:
        """``counts``: ``B x (1+N) x 3`` of :func:`query_counts`, ways in ``episode_classes`` order."""
        counts = counts.cpu().numpy()
        self.counts[0] += counts[:, 0].sum(axis=0)
        for episode, names in enumerate(episode_classes):
            for way, name in enumerate(names, start=1):
                self.counts[1 + self.classes.index(name)] += counts[episode, way]

    def summary(self) -> dict:
        """mean-IoU, binary-IoU and per-class IoU (a class never counted scores 0)."""

        def iou(tp_fp_fn) -> float:
            return float(tp_fp_fn[0] / max(tp_fp_fn.sum(), 1))

        class_iou = {cls: iou(self.counts[1 + i]) for i, cls in enumerate(self.classes)}
        background, foreground = iou(self.counts[0]), iou(self.counts[1:].sum(axis=0))
        return {
            "mean_iou": float(np.mean(list(class_iou.values()))),
            "binary_iou": (background + foreground) / 2,
            "class_iou": class_iou,
            "background_iou": background,
            "foreground_iou": foreground,
        }


def model_device(model) -> torch.device:
    """Where the model wants its inputs: an exported bundle says so, a torch module has parameters."""
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


class FeatureCache:
    """Encoder features per image name, so that a photo drawn again is not encoded again.

    Valid while the model does not change (one evaluation, or the runs of ``evaluate_runs``). Features
    are kept until ``budget_mb`` is used up; later ones are computed on every use.
    """

    def __init__(self, encode, budget_mb: float):
        self.encode = encode
        self.features: dict[str, torch.Tensor] = {}
        self.bytes_left = int(budget_mb * 2**20)

    def __call__(self, keys: list[str], images: torch.Tensor) -> torch.Tensor:
        missing = [i for i, key in enumerate(keys) if key not in self.features]
        computed = dict(zip(missing, self.encode(images[missing]), strict=True)) if missing else {}
        for i, feats in computed.items():
            nbytes = feats.numel() * feats.element_size()
            if keys[i] not in self.features and nbytes <= self.bytes_left:
                self.features[keys[i]] = feats.clone()  # a row of a view would keep the whole batch
                self.bytes_left -= nbytes
        return torch.stack(
            [computed[i] if i in computed else self.features[key] for i, key in enumerate(keys)]
        )


def predict(
    model,
    batch: EpisodeBatch,
    impl: str = "auto",
    encode=None,
    features=None,
    refine: str = "none",
    min_score: float = 0.0,
    edges: str = "none",
) -> torch.Tensor:
    """``B x Q x S x S`` uint8 labels of a batch of episodes: one encoder call (``encode``, default
    ``model.encode``; through ``features``, a :class:`FeatureCache`, where given), then the method's
    fused head with the test-time refinement ``refine``. Adaptation (``adapt+...``) fine-tunes the encoder
    on each episode's supports in turn (restored after each), so its features are never cached.
    ``min_score`` leaves out classes judged absent (:mod:`fss.models.presence`); ``edges="guided"``
    filters the probabilities with each query as the guide (:mod:`fss.kernels.guided`)."""
    if adapts(refine):
        return predict_adapted(model, batch, impl, encode, refine)
    if features is not None:
        N, K = batch.supp_imgs.shape[1:3]
        # episode_inputs encodes all supports (episode, way, shot order; where the model encodes them),
        # then all queries.
        keys = [key for names in batch.image_keys for key in names[: N * K] if model.encodes_supports]
        keys += [key for names in batch.image_keys for key in names[N * K :]]
        encode = partial(features, keys)
    supp, qry_feats = model.episode_inputs(encode or model.encode, batch.supp_imgs, batch.qry_imgs)
    state = model.episode_state(supp, batch.supp_fg, batch.supp_bg, refine=refine, impl=impl)
    size = batch.qry_imgs.shape[-2:]
    if min_score <= 0 and edges == "none":
        return model.segment(qry_feats, state, size, refine, impl=impl)
    state, refine = model.refine_state(qry_feats, state, refine)  # once for the scores and the labels
    logits = model.logits(qry_feats, state, size, refine, impl=impl)
    if min_score > 0:
        logits = gate_logits(logits, model.presence(qry_feats, state, refine, impl), min_score)
    if edges == "none":
        return logits.argmax(dim=2).to(torch.uint8)
    grey = grey_of_normalised(batch.qry_imgs, model.meta["normalisation"])
    return torch.stack(
        [guided_labels(g, lg)[0] for g, lg in zip(grey.flatten(0, 1), logits.flatten(0, 1), strict=True)]
    ).view(grey.shape)


def predict_adapted(model, batch: EpisodeBatch, impl: str, encode, refine: str) -> torch.Tensor:
    """:func:`predict` with the encoder adapted to each episode's support set (one episode at a time)."""
    if getattr(model, "backend", "torch") != "torch":
        raise SettingError("adaptation fine-tunes a checkpoint's encoder: {ckpt} must name a checkpoint")
    labels = []
    for b in range(len(batch.supp_imgs)):
        with adapted(model, batch.supp_imgs[b], batch.supp_fg[b], batch.supp_bg[b]):
            supp, qry_feats = model.episode_inputs(
                encode or model.encode, batch.supp_imgs[b : b + 1], batch.qry_imgs[b : b + 1]
            )
            fg, bg = batch.supp_fg[b : b + 1], batch.supp_bg[b : b + 1]
            state = model.episode_state(supp, fg, bg, refine=refine, impl=impl)
            labels.append(model.segment(qry_feats, state, batch.qry_imgs.shape[-2:], refine, impl=impl))
    return torch.cat(labels)


@contextmanager
def eval_mode(model):
    """``model`` in eval mode (dropout off, e.g. SST's head, when validating during training), then back."""
    training = getattr(model, "training", False)
    if training:
        model.eval()
    try:
        yield
    finally:
        if training:
            model.train()


@torch.no_grad()
def evaluate(
    model,
    dataset: EpisodeDataset,
    classes: list[str],
    ways: int = 1,
    shots: int = 1,
    episodes: int = 1000,
    seed: int = EVAL_SEED,
    batch_episodes: int = EVAL_BATCH,
    annotation: str = "dense",
    impl: str = "auto",
    refine: str = "none",
    negatives: float = 0.0,
    min_score: float = 0.0,
    edges: str = "none",
    encode=None,
    features: FeatureCache | None = None,
    part: tuple[int, int] = (0, 1),
    reduce=None,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Scores of ``model`` on ``episodes`` seeded episodes of ``classes`` (one query per way).

    ``encode`` replaces ``model.encode`` (e.g. the runtime's channels-last encoder); ``features``
    (a :class:`FeatureCache` of the same model) encodes each photo once. ``part=(r, W)``
    computes episodes r, r + W, ... of every batch only, and ``reduce`` (an all-reduce sum of the count
    array) joins the W parts: W processes share one run. ``negatives``: the share of queries replaced by
    photos without their class; mean-IoU counts a class only on queries that hold it (the official
    metric), ``absent`` reports what was painted on the others.
    """
    sampler = EpisodeSampler(
        dataset,
        classes,
        ways,
        shots,
        queries=1,
        rng=np.random.default_rng(seed),
        what="test classes",
        annotation=annotation,
        negatives=negatives,
    )
    device = model_device(model)
    counts, absent = IouCounts(classes), AbsentCounts()
    with (
        eval_mode(model),
        tqdm(total=episodes, desc=desc, leave=False, disable=not progress, dynamic_ncols=True) as bar,
    ):
        for start in range(0, episodes, batch_episodes):
            size = min(batch_episodes, episodes - start)
            batch = sampler.batch(size, part)
            if batch is not None:
                batch = batch.to(device)
                pred = predict(model, batch, impl, encode, features, refine, min_score, edges)
                counts.add(batch.classes, query_counts(pred, batch.qry_labels, ways))
                absent.add(absent_shares(pred, batch.qry_labels, ways))
            bar.update(size)
    if reduce is not None:
        counts.counts, absent.counts = reduce(counts.counts), reduce(absent.counts)
    return {
        **counts.summary(),
        "absent": absent.summary(),
        "negatives": negatives,
        "classes": list(classes),
        "ways": ways,
        "shots": shots,
        "episodes": episodes,
        "seed": seed,
        "annotation": annotation,
        "refine": refine,
        "min_score": min_score,
        "edges": edges,
    }


def evaluate_runs(
    model,
    dataset,
    classes,
    runs: int = 5,
    seed: int = EVAL_SEED,
    encode=None,
    feature_cache_mb: float = 0,
    **options,
) -> dict:
    """``runs`` evaluations (run r seeded with seed + r): per-run scores, their mean and std.

    With ``feature_cache_mb`` > 0 a photo's features are computed once for all runs (up to that budget).
    """
    features = FeatureCache(encode or model.encode, feature_cache_mb) if feature_cache_mb > 0 else None
    per_run = []
    for run in range(runs):
        started = time.perf_counter()
        result = evaluate(
            model,
            dataset,
            classes,
            seed=seed + run,
            encode=encode,
            features=features,
            desc=f"run {run + 1}/{runs}",
            **options,
        )
        per_run.append({"run": run, **result, "seconds": time.perf_counter() - started})
    class_iou = np.array([[r["class_iou"][c] for c in classes] for r in per_run])
    mean_iou = np.array([r["mean_iou"] for r in per_run])
    binary_iou = np.array([r["binary_iou"] for r in per_run])
    keep = ("classes", "ways", "shots", "episodes", "annotation", "refine", "negatives", "min_score", "edges")
    absent = {key: float(np.mean([r["absent"][key] for r in per_run])) for key in per_run[0]["absent"]}
    return {
        **{key: per_run[0][key] for key in keep},
        "runs": runs,
        "seed": seed,
        "mean_iou": float(mean_iou.mean()),
        "mean_iou_std": float(mean_iou.std()),
        "binary_iou": float(binary_iou.mean()),
        "binary_iou_std": float(binary_iou.std()),
        "class_iou": dict(zip(classes, class_iou.mean(axis=0).tolist(), strict=True)),
        "class_iou_std": dict(zip(classes, class_iou.std(axis=0).tolist(), strict=True)),
        "absent": {**absent, "queries": int(sum(r["absent"]["queries"] for r in per_run))},
        "per_run": [{key: r[key] for key in (*PER_RUN_KEYS, "absent", "seconds")} for r in per_run],
        "seconds": sum(r["seconds"] for r in per_run),
    }


def validation_line(step: int, val: dict) -> str:
    """One log line of a validation during training (:func:`evaluate`'s result)."""
    summary = ", ".join(f"{c} {iou:.3f}" for c, iou in val["class_iou"].items())
    absent = val["absent"]  # photos without the class: with --negatives
    painted = f"; {absent['mean_share']:.2%} painted without the class" if absent["queries"] else ""
    scores = f"held-out mean-IoU {val['mean_iou']:.4f}, binary-IoU {val['binary_iou']:.4f}{painted}"
    return f"step {step}: {scores} ({summary})"
