"""Episodic PANet training on a folder dataset, with held-out validation classes.

Defaults follow the paper: 1-way 1-shot episodes, one episode per batch, SGD (momentum 0.9, lr 1e-3,
weight decay 5e-4), 30,000 iterations with the learning rate x0.1 at 1/3 and 2/3 of them (10k and
20k), random horizontal flip, query loss + 1.0 x prototype alignment (PAR).

``OUT/last.pt`` holds the weights, the metadata and the training state (step, optimizer, sampler
RNG): ``resume`` continues bit-for-bit on the same machine. ``OUT/final.pt`` (weights and metadata
only) is the model to ship; ``OUT/step-XXXXXX.pt`` are periodic snapshots of the same kind.
"""

import csv
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fss.checkpoint import (
    atomic_save,
    checkpoint_dict,
    init_encoder,
    load_model,
    load_state_strict,
    read_torch_file,
)
from fss.constants import PAPER_INPUT_SIZE
from fss.errors import FssError
from fss.models.panet import PANet
from fss.train.data import EpisodeSampler, FolderDataset
from fss.train.evaluate import EVAL_SEED, evaluate
from fss.train.losses import panet_losses

TRAIN_IMPL = "torch"  # plain differentiable torch ops, as panet_losses uses: the same logits in validation
LOG_FIELDS = ("step", "lr", "query_loss", "align_loss", "loss", "val_mean_iou", "seconds")


@dataclass
class TrainConfig:
    data: Path
    out: Path = Path("runs/panet")
    val_classes: list[str] | None = None  # None: every 4th class (at least `ways`); []: none held out
    ways: int = 1
    shots: int = 1
    queries: int = 1  # per way
    iters: int = 30000
    size: int = PAPER_INPUT_SIZE
    width: float = 1.0
    init: Path | None = None  # fss checkpoint / official snapshot / torchvision VGG16; None: from scratch
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: list[int] | None = None  # None: 1/3 and 2/3 of iters
    lr_gamma: float = 0.1
    batch_episodes: int = 1
    align: bool = True
    align_weight: float = 1.0
    flip: bool = True
    seed: int = 0
    resume: Path | None = None
    save_every: int = 1000
    snapshot_every: int = 10000
    eval_every: int = 5000
    eval_episodes: int = 1000
    eval_seed: int = EVAL_SEED
    log: Path | None = None  # None: OUT/log.csv
    cache_mb: float = 2048
    progress: bool = True

    def milestones(self) -> list[int]:
        if self.lr_milestones is not None:
            return sorted(self.lr_milestones)
        return [self.iters // 3, 2 * self.iters // 3]

    def lr_at(self, step: int) -> float:
        """Learning rate of the update that makes ``step`` (1-based)."""
        return self.lr * self.lr_gamma ** sum(step > m for m in self.milestones())

    def as_meta(self) -> dict:
        """Plain values for the checkpoint metadata (paths as strings)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: str(v) if isinstance(v, Path) else v for name, v in values.items()}


@dataclass
class TrainResult:
    model: PANet
    step: int
    train_classes: list[str]
    val_classes: list[str]
    losses: list[tuple[float, float]] = field(default_factory=list)  # (query, align) of this process's steps
    val: dict | None = None


def default_val_classes(classes: list[str], ways: int) -> list[str]:
    """A deterministic quarter of the classes (evenly spaced in name order), at least ``ways``."""
    count = max(ways, len(classes) // 4)
    return [classes[i * len(classes) // count] for i in range(count)]


def split_classes(dataset: FolderDataset, config: TrainConfig) -> tuple[list[str], list[str]]:
    classes = dataset.classes
    if config.val_classes is None:
        val = default_val_classes(classes, config.ways)
    else:
        unknown = [c for c in config.val_classes if c not in classes]
        if unknown:
            raise FssError(
                f"validation class {unknown[0]!r} is not a class folder (classes: {', '.join(classes)})",
                dataset.root,
            )
        val = sorted(set(config.val_classes))
    return [c for c in classes if c not in val], val


def init_from_scratch(model: PANet) -> None:
    """torchvision's VGG initialisation (He normal, fan-out; zero bias): trainable without BatchNorm.

    PyTorch's default conv initialisation shrinks the signal through 13 layers, and SGD barely moves.
    """
    for conv in model.encoder.convs():
        torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)


def build_model(config: TrainConfig) -> PANet:
    torch.manual_seed(config.seed)
    model = PANet(width=config.width, impl=TRAIN_IMPL)
    if config.init is None:
        init_from_scratch(model)
    else:
        init_encoder(model, config.init)
    return model


def training_state(step: int, optimizer, rng: np.random.Generator, seconds: float) -> dict:
    """Everything besides the weights that a bit-for-bit resume needs, as plain picklable values."""
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "rng": rng.bit_generator.state,
        "seconds": seconds,
    }


def load_training_state(path: Path, model: PANet, optimizer, rng: np.random.Generator) -> tuple[int, float]:
    ckpt = read_torch_file(path)
    state = ckpt.get("train_state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise FssError("not a resumable fss-train checkpoint (no training state); use last.pt", path)
    load_state_strict(model, ckpt["state_dict"], path)
    optimizer.load_state_dict(state["optimizer"])
    rng.bit_generator.state = state["rng"]
    return int(state["step"]), float(state["seconds"])


class CsvLog:
    """One row per iteration, appended (a resumed run continues the same file)."""

    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (append and path.exists())
        self.file = open(path, "w" if fresh else "a", newline="")  # noqa: SIM115 (closed by close())
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        if fresh:
            self.writer.writeheader()

    def write(self, **row) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(config: TrainConfig) -> TrainResult:
    """Train PANet as ``config`` says; checkpoints and the log go to ``config.out``."""
    dataset = FolderDataset(config.data, config.size, config.cache_mb)
    train_classes, val_classes = split_classes(dataset, config)
    out = Path(config.out)
    if config.resume is None and (out / "last.pt").exists():
        raise FssError(
            "output folder holds a run already: pass --resume to continue it, or another --out", out
        )
    rng = np.random.default_rng(config.seed)
    sampler = EpisodeSampler(
        dataset,
        train_classes,
        config.ways,
        config.shots,
        config.queries,
        config.flip,
        rng,
        what="training classes",
    )
    if val_classes:
        dataset.check_episodes(val_classes, config.ways, config.shots + 1, "validation classes")

    model = build_model(config)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    step, seconds = 0, 0.0
    if config.resume is not None:
        step, seconds = load_training_state(Path(config.resume), model, optimizer, rng)
    result = TrainResult(model, step, train_classes, val_classes)

    def meta() -> dict:
        return {
            "classes": train_classes,
            "input_size": config.size,
            "width": float(config.width),
            "train_config": config.as_meta(),
            "iterations": result.step,
            "val": result.val,
        }

    def validate() -> float:
        result.val = evaluate(
            model, dataset, val_classes, config.ways, config.shots, config.eval_episodes, config.eval_seed
        )
        result.val["step"] = result.step
        summary = ", ".join(f"{c} {iou:.3f}" for c, iou in result.val["class_iou"].items())
        tqdm.write(f"step {result.step}: held-out mean-IoU {result.val['mean_iou']:.4f} ({summary})")
        return result.val["mean_iou"]

    log = CsvLog(Path(config.log) if config.log else out / "log.csv", append=config.resume is not None)
    started = time.perf_counter() - seconds
    bar = tqdm(
        total=config.iters, initial=step, desc="train", disable=not config.progress, dynamic_ncols=True
    )
    try:
        while result.step < config.iters:
            result.step += 1
            lr = config.lr_at(result.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = sampler.batch(config.batch_episodes)
            query_loss, align_loss = panet_losses(
                model,
                batch.supp_imgs,
                batch.supp_fg,
                batch.supp_bg,
                batch.qry_imgs,
                batch.qry_labels,
                align=config.align,
            )
            loss = query_loss + config.align_weight * align_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.losses.append((query_loss.item(), align_loss.item()))

            at_end = result.step == config.iters
            evaluate_now = val_classes and (
                at_end or (config.eval_every and result.step % config.eval_every == 0)
            )
            val_iou = validate() if evaluate_now else None
            seconds = time.perf_counter() - started
            log.write(
                step=result.step,
                lr=lr,
                query_loss=f"{query_loss.item():.6f}",
                align_loss=f"{align_loss.item():.6f}",
                loss=f"{loss.item():.6f}",
                val_mean_iou="" if val_iou is None else f"{val_iou:.6f}",
                seconds=f"{seconds:.1f}",
            )
            if at_end or result.step % config.save_every == 0:
                ckpt = checkpoint_dict(model, **meta())
                ckpt["train_state"] = training_state(result.step, optimizer, rng, seconds)
                atomic_save(ckpt, out / "last.pt")
            if config.snapshot_every and result.step % config.snapshot_every == 0:
                atomic_save(checkpoint_dict(model, **meta()), out / f"step-{result.step:06d}.pt")
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.0e}", refresh=False)
    finally:
        bar.close()
        log.close()
    if (
        val_classes and result.val is None
    ):  # no iteration ran here (e.g. --iters 0): evaluate the model as it is
        validate()
    atomic_save(checkpoint_dict(model, **meta()), out / "final.pt")
    return result


def evaluate_only(config: TrainConfig, ckpt: Path | None = None) -> dict:
    """Held-out mean-IoU of a checkpoint, or (``ckpt`` None) of a fresh model as training starts."""
    model = build_model(config) if ckpt is None else load_model(ckpt, impl=TRAIN_IMPL)
    dataset = FolderDataset(config.data, config.size, config.cache_mb)
    _, val_classes = split_classes(dataset, config)
    if not val_classes:
        raise FssError("no validation classes to evaluate (--val-classes none)", config.data)
    return evaluate(
        model,
        dataset,
        val_classes,
        config.ways,
        config.shots,
        config.eval_episodes,
        config.eval_seed,
        progress=config.progress,
    )
