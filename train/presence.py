"""Learn a checkpoint's presence calibration from negative episodes (:mod:`fss.models.presence`).

    python -m fss.train.presence runs/demo/final.pt runs/demo/calibrated.pt --data runs/demo-data/all

Draws 1-way 1-shot episodes of the checkpoint's training classes (``meta["classes"]``, or
``--classes``) where a share of the queries (``--negatives``, default one half) are photos without the
class, computes each query's presence statistics from the method's own logits (with the checkpoint's
refinement), and fits a logistic model of "the class is on the photo" to them (L2-regularised,
standardised inputs). The cut-off stored as the default ``min_score`` keeps ``--keep`` of the positive
queries of those episodes. Only training classes and their photos are used: held-out photos stay
held out.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fss.checkpoint import atomic_save, checkpoint_dict, load_model
from fss.cli_args import positive_int, share
from fss.command import run_command
from fss.constants import PRESENCE_FEATURES
from fss.errors import FssError
from fss.io.outputs import check_output_file
from fss.models.base import resolve_refine
from fss.models.presence import presence_features, statistics_scores
from fss.train.cli import class_list
from fss.train.data import EpisodeSampler, FolderDataset
from fss.train.evaluate import FeatureCache

PROG = "python -m fss.train.presence"
L2 = 1e-2  # on the standardised weights: a handful of inputs, hundreds of episodes


def encoded_episodes(model, dataset, classes, episodes: int, negatives: float, seed: int, cache_mb=2048):
    """Batches of 8 of ``episodes`` 1-way 1-shot episodes of ``classes`` (a share ``negatives`` of the
    queries without the class), each photo encoded once: ``(batch, supports' inputs, query features)``."""
    sampler = EpisodeSampler(
        dataset, classes, 1, 1, rng=np.random.default_rng(seed), what="classes", negatives=negatives
    )
    features = FeatureCache(model.encode, cache_mb)
    for start in range(0, episodes, 8):
        b = sampler.batch(min(8, episodes - start))
        keys = [key for names in b.image_keys for key in names[:1] if model.encodes_supports]
        keys += [key for names in b.image_keys for key in names[1:]]
        supp, qry = model.episode_inputs(lambda x, k=keys: features(k, x), b.supp_imgs, b.qry_imgs)
        yield b, supp, qry


@torch.no_grad()
def episode_statistics(model, dataset, classes, episodes: int, negatives: float, seed: int):
    """``E x F`` presence statistics of ``episodes`` 1-way 1-shot queries and ``E`` bools: class present;
    the logits are those of the checkpoint's own refinement (what its scores will be computed from)."""
    refine = resolve_refine(None, model)
    stats, present = [], []
    for b, supp, qry in encoded_episodes(model, dataset, classes, episodes, negatives, seed):
        state = model.episode_state(supp, b.supp_fg, b.supp_bg, refine=refine)
        low = model.logits(qry, state, qry.shape[-2:], refine, in_size=tuple(b.qry_imgs.shape[-2:]))
        stats.append(presence_features(low)[:, 0, 0])
        present.append((b.qry_labels[:, 0] == 1).flatten(1).any(dim=1))
    return torch.cat(stats).double(), torch.cat(present)


def fit_logistic(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Standardised L2-regularised logistic regression: ``{"mean", "std", "weights", "bias"}``."""
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")
    target = y.double()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w[:-1] + w[-1], target)
        loss = loss + L2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w = w.detach()
    return {"mean": mean.tolist(), "std": std.tolist(), "weights": w[:-1].tolist(), "bias": float(w[-1])}


def calibrate(model, dataset, classes, episodes=800, negatives=0.5, keep=0.95, seed=0) -> dict:
    """The calibration of ``model`` (``meta["presence"]``) and how it separates its episodes."""
    x, present = episode_statistics(model, dataset, classes, episodes, negatives, seed)
    if present.all() or not present.any():
        raise FssError("presence needs episodes with and without the class: raise --episodes or --negatives")
    calibration = fit_logistic(x, present)
    scores = statistics_scores(x.float(), calibration)
    calibration["min_score"] = float(torch.quantile(scores[present].double(), 1 - keep))
    kept = scores >= calibration["min_score"]
    return {
        **calibration,
        "episodes": int(len(x)),
        "positives_kept": float(kept[present].double().mean()),
        "negatives_kept": float(kept[~present].double().mean()),
    }


def checkpoint_and_classes(source: Path, target: Path, data: Path, classes, what: str, check_model=None):
    """What a tool that writes ``target`` (``what``: how its messages name it) beside the checkpoint
    ``source`` learns from: the model (eval mode), its training classes (or ``classes``) and their folder
    dataset at its input size; the target is checked first and never replaces the source, and
    ``check_model`` (raising ``FssError``) judges the model as soon as it is loaded."""
    check_output_file(target, what)
    if target.resolve() == source.resolve():
        raise FssError(f"{what} must not replace its source", target)
    model = load_model(source).eval()
    if check_model is not None:
        check_model(model)
    classes = classes or model.meta.get("classes")
    if not classes:
        raise FssError("the checkpoint names no training classes: pass --classes", source)
    meta = model.meta
    dataset = FolderDataset(data, int(meta["input_size"]), normalisation=meta["normalisation"])
    missing = sorted(set(classes) - set(dataset.classes))
    if missing:
        raise FssError(f"classes not in the folder: {', '.join(missing)}", data)
    return model, dataset, classes


def add_checkpoint_args(p: argparse.ArgumentParser, target_help: str) -> None:
    """The arguments of :func:`checkpoint_and_classes`, and the share of negative episodes and the seed."""
    p.add_argument("target", type=Path, help=target_help)
    p.add_argument("--data", type=Path, required=True, help="class folders (fss-train --data)")
    p.add_argument("--classes", type=class_list, metavar="A,B,...", help="default: the checkpoint's")
    p.add_argument("--negatives", type=share, default=0.5, help="share of queries without the class")
    p.add_argument("--seed", type=int, default=0)


def calibrate_file(source: Path, target: Path, data: Path, classes, **options) -> str:
    """Write ``target``: ``source`` with ``meta["presence"]`` learned on ``data``; returns a summary."""
    what = "the calibrated checkpoint"
    model, dataset, classes = checkpoint_and_classes(source, target, data, classes, what)
    result = calibrate(model, dataset, classes, **options)
    model.meta["presence"] = {k: result[k] for k in ("mean", "std", "weights", "bias", "min_score")}
    atomic_save(checkpoint_dict(model), target)
    weights = ", ".join(f"{f} {w:+.2f}" for f, w in zip(PRESENCE_FEATURES, result["weights"], strict=True))
    return (
        f"{target}: presence from {result['episodes']} episodes ({weights}); min_score "
        f"{result['min_score']:.3f} keeps {result['positives_kept']:.0%} of the positives, "
        f"{result['negatives_kept']:.0%} of the negatives"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="fss checkpoint")
    add_checkpoint_args(p, "checkpoint to write: the source with meta['presence']")
    p.add_argument("--episodes", type=positive_int, default=800, help="episodes (default 800)")
    p.add_argument("--keep", type=share, default=0.95, help="share of positives the cut-off keeps")
    args = p.parse_args(argv)
    options = {k: getattr(args, k) for k in ("episodes", "negatives", "keep", "seed")}

    def work() -> None:
        print(calibrate_file(args.source, args.target, args.data, args.classes, **options))

    return run_command(PROG, work)


if __name__ == "__main__":
    sys.exit(main())
