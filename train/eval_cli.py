"""``fss-eval``: the PASCAL-5i / COCO-20i test protocol (or a folder's held-out classes) for a checkpoint.

Runs r = 0..R-1 of E episodes each, run r seeded with seed + r; per run and over runs (mean, std):
mean-IoU, binary-IoU (FB-IoU) and per-class IoU, counted as the official evaluation does
(:mod:`fss.train.evaluate`). Episodes go through the model in batches (``--batch-episodes``), the
encoder as the runtime runs it (channels-last, ``--precision``), the head through ``fss.kernels``.
"""

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fss.checkpoint import load_model
from fss.cli_args import (
    add_device_arg,
    add_edges_arg,
    add_memory_arg,
    add_min_score_arg,
    add_negatives_arg,
    add_refine_arg,
    add_size_arg,
    add_way_shot_args,
    check_input_size,
    positive_int,
)
from fss.command import run_command
from fss.constants import PAPER_INPUT_SIZE
from fss.errors import FssError
from fss.io.outputs import check_output_file, write_json
from fss.kernels.dispatch import resolve_impl
from fss.memory import check_encoder_memory
from fss.models.base import adapts, resolve_edges, resolve_min_score, resolve_refine
from fss.runtime.encoder_call import PRECISIONS, check_encoder_settings, make_encoder
from fss.runtime.encoder_path import CHOICES, choose_encoder_path
from fss.train.benchmark import DATASETS, add_split_args, fold_classes, open_dataset
from fss.train.cli import class_list, fold_index
from fss.train.data import ANNOTATIONS
from fss.train.distributed import resolve_device
from fss.train.evaluate import EVAL_BATCH, EVAL_SEED, evaluate_runs

PROG = "fss-eval"


@dataclass
class EvalConfig:
    ckpt: Path
    data: Path
    dataset: str = "folder"
    fold: int | None = None  # required for voc and coco
    classes: list[str] | None = None  # folders: the test classes (default: those the checkpoint never saw)
    split: str | None = None  # voc / coco split(s); None: the reference's
    fold_convention: str = "consecutive"
    ways: int = 1
    shots: int = 1
    runs: int = 5
    episodes: int = 1000
    seed: int = EVAL_SEED
    size: int | None = None  # None: the checkpoint's input size
    annotation: str = "dense"
    negatives: float = 0.0  # share of queries replaced by photos without their class
    min_score: float | None = None  # presence cut-off; None: the checkpoint's
    edges: str | None = None  # None: the checkpoint's
    batch_episodes: int = EVAL_BATCH
    impl: str = "auto"
    refine: str | None = None  # test-time refinement (fss.constants.REFINEMENTS); None: the method's
    precision: str = "fp32"
    backend: str = "auto"  # the encoder path (fss.runtime.encoder_path): auto, torch, onnxruntime
    int8: bool = False  # a bundle's int8 encoder (fss-export --int8)
    device: str = "auto"
    cache_mb: float = 2048  # decoded images
    feature_cache_mb: float = 2048  # encoder features: each photo is encoded once for all runs
    progress: bool = True


def choose_test_classes(config: EvalConfig, dataset, trained_on: list[str]) -> list[str]:
    if config.fold is not None:
        if config.classes is not None:
            raise FssError("--fold and --classes both choose the test classes: give one", config.data)
        return fold_classes(dataset, config.dataset, config.fold, config.fold_convention)
    if config.dataset != "folder":
        raise FssError(f"--dataset {config.dataset} needs --fold (0..3)", config.data)
    if config.classes is not None:
        unknown = [c for c in config.classes if c not in dataset.classes]
        if unknown:
            raise FssError(f"test class {unknown[0]!r} is not a class folder", config.data)
        return sorted(set(config.classes))
    unseen = [c for c in dataset.classes if c not in trained_on]
    if not unseen:
        raise FssError(
            "the checkpoint was trained on every class of this folder: choose test classes with --fold "
            "or --classes",
            config.data,
        )
    return unseen


def run_eval(config: EvalConfig, note=print) -> dict:
    """Evaluate ``config.ckpt``; ``note`` receives one-line remarks (classes left out, ...)."""
    if config.annotation not in ANNOTATIONS:
        raise FssError(f"--annotation must be one of {', '.join(ANNOTATIONS)}, got {config.annotation!r}")
    device = resolve_device(config.device)
    if config.int8:
        from fss.backends.bundle_model import load_bundle

        model = load_bundle(config.ckpt, config.backend, config.device, config.size, config.impl, int8=True)
    else:
        model = load_model(config.ckpt, device=device, impl=config.impl)
    refine = resolve_refine(config.refine, model)
    min_score, edges = resolve_min_score(config.min_score, model), resolve_edges(config.edges, model)
    size = config.size or int(model.meta.get("input_size", PAPER_INPUT_SIZE))
    images_per_call = config.batch_episodes * config.ways * (config.shots + 1)
    check_encoder_memory(model, size, images_per_call, device, hint="--batch-episodes", size_name="--size")
    if config.precision != "fp32" and config.backend == "onnxruntime":
        raise FssError(f"--backend onnxruntime is float32: drop --precision {config.precision}")
    try:
        resolve_impl(config.impl, torch.empty(0, device=device), "--impl")
        check_encoder_settings(model, device, config.precision, cuda_graph=False)
    except (ValueError, RuntimeError) as exc:
        raise FssError(str(exc)) from None
    dataset = open_dataset(
        config.dataset,
        config.data,
        size,
        config.split,
        config.cache_mb,
        normalisation=model.meta["normalisation"],
    )
    trained_on = list(model.meta.get("classes") or [])
    classes = choose_test_classes(config, dataset, trained_on)
    skipped = {}
    if config.dataset != "folder":
        classes, skipped = dataset.usable_classes(classes, config.shots + 1)
        for cls, why in skipped.items():
            note(f"note: test class {cls!r} left out: {why}")
    dataset.check_episodes(classes, config.ways, config.shots + 1, "test classes")
    # Folder datasets converted from COCO name classes with underscores for spaces.
    trained_names = {c.replace(" ", "_") for c in trained_on}
    seen = [c for c in classes if c.replace(" ", "_") in trained_names]
    if seen:
        note(f"note: the checkpoint was trained on test class(es) {', '.join(seen)}")
    if config.precision == "fp32":  # the data is checked: now the encoder path (may export, once)
        path = choose_encoder_path(model, device, size, config.backend, adapts(refine))
        model = path.model
        note(f"encoder: {path.reason}")
    encode = make_encoder(model, device, images_per_call, size, config.precision, True, False)
    result = evaluate_runs(
        model,
        dataset,
        classes,
        runs=config.runs,
        seed=config.seed,
        ways=config.ways,
        shots=config.shots,
        episodes=config.episodes,
        batch_episodes=config.batch_episodes,
        annotation=config.annotation,
        negatives=config.negatives,
        min_score=min_score,
        edges=edges,
        impl=config.impl,
        refine=refine,
        encode=encode,
        feature_cache_mb=config.feature_cache_mb,
        progress=config.progress,
    )
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    return {
        **result,
        "settings": {**settings, "size": size, "device": str(device)},
        "skipped_classes": skipped,
        "episodes_per_second": config.runs * config.episodes / result["seconds"],
    }


def summary_lines(result: dict) -> list[str]:
    s = result["settings"]
    where = f"fold {s['fold']}" if s["fold"] is not None else "held-out classes"
    lines = [
        f"{s['dataset']} {where}: {result['ways']}-way {result['shots']}-shot, {result['annotation']} "
        f"supports, {result['runs']} run(s) x {result['episodes']} episodes, seed {result['seed']}, "
        f"size {s['size']}",
    ]
    for run in result["per_run"]:
        lines.append(
            f"run {run['run'] + 1} (seed {run['seed']}): mean-IoU {run['mean_iou']:.4f}, "
            f"binary-IoU {run['binary_iou']:.4f}"
        )
    for cls, iou in result["class_iou"].items():
        lines.append(f"  {cls}: {iou:.4f} ± {result['class_iou_std'][cls]:.4f}")
    lines.append(
        f"mean-IoU {result['mean_iou']:.4f} ± {result['mean_iou_std']:.4f}, "
        f"binary-IoU {result['binary_iou']:.4f} ± {result['binary_iou_std']:.4f} "
        f"({result['episodes_per_second']:.1f} episodes/s)"
    )
    absent = result["absent"]
    if absent["queries"]:
        lines.append(
            f"photos without the class ({absent['queries']}): {absent['mean_share']:.2%} of pixels painted "
            f"on average, {absent['over_1pct']:.0%} over 1 %, {absent['over_5pct']:.0%} over 5 %"
        )
    return lines


def add_episode_args(p: argparse.ArgumentParser) -> None:
    """What is tested: the dataset, its test classes, and the episodes drawn from them."""
    p.add_argument("--dataset", choices=DATASETS, default="folder", help="folder (default), voc or coco")
    p.add_argument("--data", type=Path, required=True, help="dataset folder (layouts: see fss-train --help)")
    p.add_argument(
        "--fold", type=fold_index, default=None, help="test the fold's classes (0..3; required for voc, coco)"
    )
    p.add_argument(
        "--classes",
        type=class_list,
        default=None,
        metavar="A,B,...",
        help="folders: test classes (default: the classes the checkpoint was not trained on)",
    )
    add_split_args(p)
    add_way_shot_args(p)
    p.add_argument("--runs", type=positive_int, default=5, help="runs; run r has seed + r (default 5)")
    p.add_argument("--episodes", type=positive_int, default=1000, help="episodes per run (default 1000)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help=f"seed of run 1 (default {EVAL_SEED})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Few-shot segmentation test protocol (PASCAL-5i, COCO-20i, or a folder's held-out "
        "classes): per-run and mean ± std mean-IoU, binary-IoU and per-class IoU, as the official PANet "
        "evaluation counts them.",
    )
    p.add_argument("--ckpt", type=Path, required=True, help="official snapshot, fss checkpoint or bundle")
    add_episode_args(p)
    add_size_arg(p, "the checkpoint's")
    p.add_argument(
        "--annotation",
        choices=ANNOTATIONS,
        default="dense",
        help="support masks: dense, box, grabcut (the box refined by GrabCut) or scribble",
    )
    add_negatives_arg(p, "test")
    p.add_argument(
        "--batch-episodes",
        type=positive_int,
        default=EVAL_BATCH,
        help=f"episodes per model call (default {EVAL_BATCH})",
    )
    p.add_argument(
        "--impl",
        choices=("auto", "torch", "native", "triton"),
        default="auto",
        help="head kernels (fss.kernels; default auto)",
    )
    add_refine_arg(p)
    add_min_score_arg(p)
    add_edges_arg(p)
    p.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="encoder precision (default fp32; fp16 needs CUDA)",
    )
    p.add_argument(
        "--backend",
        choices=CHOICES,
        default="auto",
        help="what runs the encoder (default auto: on the CPU, ONNX Runtime with a graph exported, verified "
        "and cached once per checkpoint; torch otherwise)",
    )
    p.add_argument(
        "--int8", action="store_true", help="the bundle's int8 encoder (--ckpt BUNDLE, fss-export --int8)"
    )
    add_device_arg(p)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    add_memory_arg(p, "--cache-mb", 2048, "memory for decoded images (default 2048)")
    add_memory_arg(
        p,
        "--feature-cache-mb",
        2048,
        "memory (on the device) for encoder features, each photo encoded once (default 2048; 0: off)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the full results (per run, per class) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_input_size(parser, args.size)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EvalConfig(
        ckpt=args.ckpt,
        data=args.data,
        dataset=args.dataset,
        fold=args.fold,
        classes=args.classes,
        split=args.split,
        fold_convention=args.fold_convention,
        ways=args.ways,
        shots=args.shots,
        runs=args.runs,
        episodes=args.episodes,
        seed=args.seed,
        size=args.size,
        annotation=args.annotation,
        negatives=args.negatives,
        min_score=args.min_score,
        edges=args.edges,
        batch_episodes=args.batch_episodes,
        impl=args.impl,
        refine=args.refine,
        precision=args.precision,
        backend=args.backend,
        int8=args.int8,
        device=args.device,
        cache_mb=args.cache_mb,
        feature_cache_mb=args.feature_cache_mb,
        progress=not args.no_progress,
    )
    return run_command(PROG, lambda: eval_main(config, args.json))


def eval_main(config: EvalConfig, json_path: Path | None) -> int:
    if json_path is not None:
        check_output_file(json_path, "--json")  # before the work, not after it
    result = run_eval(config, note=lambda line: print(line, file=sys.stderr))
    if json_path is not None:
        write_json(json_path, result)
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
