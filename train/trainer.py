"""Episodic training of any method on a folder, PASCAL-5i or COCO-20i dataset, held-out validation classes.

Defaults follow the paper: 1-way 1-shot episodes, one episode per batch, SGD (momentum 0.9, lr 1e-3,
weight decay 5e-4), 30,000 iterations with the learning rate x0.1 at 1/3 and 2/3 of them (10k and
20k), random horizontal flip, query loss + 1.0 x prototype alignment (PAR). A method's recipe may
change the optimizer and learning rate (``FewShotModel.train_defaults``: OSLSM trains with AdamW).
``--fold i`` holds out the fold's test classes (:mod:`fss.train.protocol`) and trains on the others.

``OUT/last.pt`` holds the weights, the metadata and the training state (step, optimizer, sampler
RNG): ``resume`` continues bit-for-bit on the same machine. ``OUT/final.pt`` (weights and metadata
only) is the model to ship; ``OUT/step-XXXXXX.pt`` are periodic snapshots of the same kind. A step
whose loss or weights are not finite stops the run before anything is saved from it.

Under ``torchrun`` every process draws the same global batch of episodes from the same seed and
builds and trains on its own share (episodes r, r + W, ...); DistributedDataParallel averages the
gradients, so W processes take the steps one process would take on the whole batch.
"""

import csv
import dataclasses
import sys
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
from fss.constants import IGNORE_INDEX, PAPER_INPUT_SIZE
from fss.errors import FssError, summary
from fss.models.base import DEFAULT_METHOD, FewShotModel, build_model, resolve_refine
from fss.train.data import EpisodeDataset, EpisodeSampler
from fss.train.distributed import World, close_world, init_world, resolve_device
from fss.train.evaluate import EVAL_BATCH, EVAL_SEED, FeatureCache, evaluate
from fss.train.protocol import fold_classes, open_dataset
from fss.validation import check_checkpoint

TRAIN_IMPL = (
    "torch"  # the model's head in training: plain differentiable torch ops, as the methods' losses use
)
LOG_FIELDS = (
    "step",
    "lr",
    "query_loss",
    "align_loss",
    "loss",
    "val_mean_iou",
    "val_binary_iou",
    "seconds",
)


@dataclass
class TrainConfig:
    data: Path
    out: Path = Path("runs/panet")
    dataset: str = "folder"  # folder | voc | coco (fss.train.protocol)
    fold: int | None = None  # hold out the fold's test classes (required for voc and coco)
    split: str | None = None  # voc / coco split(s) of the training episodes; None: the reference's
    val_split: str | None = None  # split(s) of the validation episodes; None: the training split
    fold_convention: str = "consecutive"  # COCO-20i folds: consecutive | interleaved
    val_classes: list[str] | None = None  # folders without a fold: None every 4th class, [] none held out
    ways: int = 1
    shots: int = 1
    queries: int = 1  # per way
    iters: int = 30000
    size: int = PAPER_INPUT_SIZE
    method: str = DEFAULT_METHOD  # a registered method (fss.models.base)
    method_options: dict = field(default_factory=dict)  # the method's own (meta[method], e.g. SST's)
    encoder: str = "vgg16-dilated"  # a name of fss.models.encoders
    width: float = 1.0
    init: Path | str | None = None  # "auto": the encoder's pretrained weights; a file; None: from scratch
    freeze_stages: int = 0  # the encoder's first stages (stem, blocks) keep their initial weights
    optimizer: str = "sgd"  # a name of OPTIMIZERS
    lr: float = 1e-3
    momentum: float = 0.9  # SGD's
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
    eval_batch: int = EVAL_BATCH  # validation episodes per model call
    log: Path | None = None  # None: OUT/log.csv
    cache_mb: float = 2048  # decoded images; and encoder features while validating
    device: str = "auto"  # auto: this process's CUDA device if there is one, else the CPU
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
    model: FewShotModel
    step: int
    train_classes: list[str]
    val_classes: list[str]
    losses: list[tuple[float, float]] = field(default_factory=list)  # (query, align) of this run's steps
    val: dict | None = None
    rank: int = 0  # this process's rank under torchrun


@dataclass
class EpisodeData:
    """The datasets of training and validation episodes and their classes."""

    train_set: EpisodeDataset
    val_set: EpisodeDataset
    train_classes: list[str]
    val_classes: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # class -> why no episode can use it


def default_val_classes(classes: list[str], ways: int) -> list[str]:
    """A deterministic quarter of the classes (evenly spaced in name order), at least ``ways``."""
    count = max(ways, len(classes) // 4)
    return [classes[i * len(classes) // count] for i in range(count)]


def split_classes(dataset: EpisodeDataset, config: TrainConfig) -> tuple[list[str], list[str]]:
    """(training classes, held-out classes) of the dataset's classes."""
    classes = dataset.classes
    if config.fold is not None:
        if config.val_classes is not None:
            raise FssError("--fold and --val-classes both choose the held-out classes: give one", config.data)
        val = fold_classes(dataset, config.dataset, config.fold, config.fold_convention)
    elif config.dataset != "folder":
        raise FssError(f"--dataset {config.dataset} needs --fold (0..3)", config.data)
    elif config.val_classes is None:
        val = default_val_classes(sorted(classes), config.ways)
    else:
        unknown = [c for c in config.val_classes if c not in classes]
        if unknown:
            raise FssError(
                f"validation class {unknown[0]!r} is not a class folder (classes: {', '.join(classes)})",
                dataset.root,
            )
        val = sorted(set(config.val_classes))
    return [c for c in classes if c not in val], val


def episode_data(config: TrainConfig, normalisation: dict) -> EpisodeData:
    """Open the dataset(s) and choose the classes; on voc / coco, classes with too few photos for an
    episode are left out (``skipped``), where a class folder with too few is a user error. Images are
    normalised as the model's ``meta["normalisation"]`` says."""

    def open_split(split):
        return open_dataset(
            config.dataset, config.data, config.size, split, config.cache_mb, normalisation=normalisation
        )

    train_set = open_split(config.split)
    val_set = train_set
    if config.val_split is not None and config.val_split != config.split:
        val_set = open_split(config.val_split)
    train_classes, val_classes = split_classes(train_set, config)
    skipped = {}
    if config.dataset != "folder":
        train_classes, skipped_train = train_set.usable_classes(train_classes, config.shots + config.queries)
        val_classes, skipped_val = val_set.usable_classes(val_classes, config.shots + 1)
        skipped = {**skipped_train, **{c: f"{why} (held out)" for c, why in skipped_val.items()}}
    if val_classes:
        val_set.check_episodes(val_classes, config.ways, config.shots + 1, "validation classes")
    return EpisodeData(train_set, val_set, train_classes, val_classes, skipped)


def init_from_scratch(model: FewShotModel) -> None:
    """torchvision's initialisation of its conv nets (He normal, fan-out; zero bias): a plain VGG
    trains without BatchNorm from it. PyTorch's default conv initialisation shrinks the signal through
    13 layers, and SGD barely moves."""
    for conv in (m for trunk in model.trunks() for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)):
        torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            torch.nn.init.zeros_(conv.bias)


def freeze_stages(model: FewShotModel, count: int) -> None:
    """The encoder's first ``count`` stages keep their weights (no gradient, no weight decay)."""
    trunks = model.trunks()  # e.g. OSLSM's conditioning trunk beside the query trunk
    stages = trunks[0].stages()
    if not 0 <= count <= len(stages):
        raise FssError(f"--freeze-stages {count}: {model.meta['encoder']} has {len(stages)} stages")
    for trunk in trunks:
        for stage in trunk.stages()[:count]:
            stage.requires_grad_(False)


def new_model(config: TrainConfig) -> FewShotModel:
    torch.manual_seed(config.seed)
    meta = {config.method: dict(config.method_options)} if config.method_options else None
    model = build_model(config.method, config.encoder, config.width, meta, impl=TRAIN_IMPL)
    if config.init is None:
        init_from_scratch(model)
    else:
        init_encoder(model, config.init)
    freeze_stages(model, config.freeze_stages)
    return model


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``sgd``: the papers' (momentum, L2 weight decay); ``adamw``: Adam with decoupled weight decay,
    for heads whose parameters see gradients of very different scales (OSLSM's hashed regression)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise FssError(f"unknown optimizer {config.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")


def training_state(step: int, optimizer, rng: np.random.Generator, seconds: float) -> dict:
    """Everything besides the weights that a bit-for-bit resume needs, as plain picklable values."""
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "rng": rng.bit_generator.state,
        "seconds": seconds,
    }


def load_training_state(
    path: Path, model: FewShotModel, optimizer, rng: np.random.Generator, optimizer_name: str = "sgd"
) -> tuple[int, float]:
    ckpt = read_torch_file(path)
    state = ckpt.get("train_state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise FssError("not a resumable fss-train checkpoint (no training state); use last.pt", path)
    check_checkpoint(ckpt, path)
    saved = ckpt["meta"].get("train_config", {}).get("optimizer", "sgd")  # runs before the option: SGD
    if saved != optimizer_name:
        raise FssError(f"the run was trained with --optimizer {saved}, not {optimizer_name}", path)
    load_state_strict(model, ckpt["state_dict"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        return int(state["step"]), float(state["seconds"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FssError(f"damaged training state in the checkpoint: {summary(exc)}", path) from None


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


def episode_losses(model, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, second: bool):
    """``(query_loss, second_loss)`` of the model's method (:meth:`FewShotModel.losses`)."""
    return model.losses(supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, None, second)


class EpisodeLosses(torch.nn.Module):
    """The method's losses as a module's forward, so that DistributedDataParallel can wrap it."""

    def __init__(self, model: FewShotModel, align: bool):
        super().__init__()
        self.model, self.align = model, align

    def forward(self, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels):
        return episode_losses(self.model, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, self.align)


def wrap_for_world(losses: EpisodeLosses, world: World) -> torch.nn.Module:
    if world.size == 1:
        return losses
    device_ids = [world.device] if world.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(losses, device_ids=device_ids)


def train(config: TrainConfig) -> TrainResult:
    """Train the model ``config`` says; checkpoints and the log go to ``config.out``.

    Under ``torchrun`` this is one process of the world; the first writes the files.
    """
    world = init_world(config.device)
    try:
        return train_in_world(config, world)
    finally:
        close_world(world)


def train_in_world(config: TrainConfig, world: World) -> TrainResult:
    if config.batch_episodes % world.size:
        raise FssError(
            f"--batch-episodes {config.batch_episodes} is not a multiple of the {world.size} processes "
            f"(each process takes an equal share of every batch)"
        )
    model = new_model(config).to(world.device)
    data = episode_data(config, model.meta["normalisation"])
    out = Path(config.out)
    if config.resume is None and (out / "last.pt").exists():
        raise FssError(
            "output folder holds a run already: pass --resume to continue it, or another --out", out
        )
    if world.is_main:
        for cls, why in data.skipped.items():
            tqdm.write(f"note: class {cls!r} left out: {why}", file=sys.stderr)
    rng = np.random.default_rng(config.seed)
    sampler = EpisodeSampler(
        data.train_set,
        data.train_classes,
        config.ways,
        config.shots,
        config.queries,
        config.flip,
        rng,
        what="training classes",
    )
    model.train()
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    step, seconds = 0, 0.0
    if config.resume is not None:
        step, seconds = load_training_state(Path(config.resume), model, optimizer, rng, config.optimizer)
    losses_of = wrap_for_world(EpisodeLosses(model, config.align), world)
    result = TrainResult(model, step, data.train_classes, data.val_classes, rank=world.rank)

    def meta() -> dict:
        return {
            "classes": data.train_classes,
            "input_size": config.size,
            "train_config": config.as_meta(),
            "iterations": result.step,
            "val": result.val,
        }

    def validate() -> dict:
        result.val = evaluate_held_out(model, data, config, part=(world.rank, world.size), reduce=world.sum)
        result.val["step"] = result.step
        if world.is_main:
            summary = ", ".join(f"{c} {iou:.3f}" for c, iou in result.val["class_iou"].items())
            tqdm.write(
                f"step {result.step}: held-out mean-IoU {result.val['mean_iou']:.4f}, "
                f"binary-IoU {result.val['binary_iou']:.4f} ({summary})"
            )
        return result.val

    log = None
    if world.is_main:
        log = CsvLog(Path(config.log) if config.log else out / "log.csv", append=config.resume is not None)
    started = time.perf_counter() - seconds
    last_saved = step if config.resume is not None else None
    bar = tqdm(
        total=config.iters,
        initial=step,
        desc="train",
        disable=not (config.progress and world.is_main),
        dynamic_ncols=True,
    )
    try:
        while result.step < config.iters:
            result.step += 1
            lr = config.lr_at(result.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = sampler.batch(config.batch_episodes, (world.rank, world.size)).to(world.device)
            # Cross-entropy is a mean over the batch's valid query pixels and DDP averages gradients over
            # processes: weighting each process's query loss by its share of those pixels makes the
            # average the whole batch's loss (with one process the weight is exactly 1).
            valid = (batch.qry_labels != IGNORE_INDEX).sum().to(torch.float64)
            all_valid = world.sum_tensor(valid)
            query_loss, align_loss = losses_of(
                batch.supp_imgs, batch.supp_fg, batch.supp_bg, batch.qry_imgs, batch.qry_labels
            )
            share = (valid * world.size / all_valid).to(query_loss.dtype)
            loss = share * query_loss + config.align_weight * align_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums = world.sum_tensor(torch.stack([query_loss.double() * valid, align_loss.double()]))
            step_query, step_align = (sums[0] / all_valid).item(), (sums[1] / world.size).item()
            result.losses.append((step_query, step_align))
            step_loss = step_query + config.align_weight * step_align
            check_finite(model, step_loss, result.step, out, last_saved)

            at_end = result.step == config.iters
            evaluate_now = data.val_classes and (
                at_end or (config.eval_every and result.step % config.eval_every == 0)
            )
            val = validate() if evaluate_now else None
            seconds = time.perf_counter() - started
            if world.is_main:
                log.write(
                    step=result.step,
                    lr=lr,
                    query_loss=f"{step_query:.6f}",
                    align_loss=f"{step_align:.6f}",
                    loss=f"{step_loss:.6f}",
                    val_mean_iou="" if val is None else f"{val['mean_iou']:.6f}",
                    val_binary_iou="" if val is None else f"{val['binary_iou']:.6f}",
                    seconds=f"{seconds:.1f}",
                )
                if at_end or result.step % config.save_every == 0:
                    ckpt = checkpoint_dict(model, **meta())
                    ckpt["train_state"] = training_state(result.step, optimizer, rng, seconds)
                    atomic_save(ckpt, out / "last.pt")
                    last_saved = result.step
                if config.snapshot_every and result.step % config.snapshot_every == 0:
                    atomic_save(checkpoint_dict(model, **meta()), out / f"step-{result.step:06d}.pt")
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.0e}", refresh=False)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if data.val_classes and result.val is None:  # no iteration ran here (e.g. --iters 0): evaluate as is
        validate()
    if world.is_main:
        atomic_save(checkpoint_dict(model, **meta()), out / "final.pt")
    return result


def check_finite(model: FewShotModel, loss: float, step: int, out: Path, last_saved: int | None) -> None:
    """Stop at the first non-finite loss or weight, before anything is saved from it."""
    bad = None if np.isfinite(loss) else f"the loss is {loss}"
    if bad is None and not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
        bad = "a weight is not finite"
    if bad is not None:
        kept = f"{out / 'last.pt'} keeps step {last_saved}" if last_saved else "no checkpoint was written"
        raise FssError(f"training diverged at step {step}: {bad} (lower --lr?); {kept}", out)


def evaluate_only(config: TrainConfig, ckpt: Path | None = None) -> dict:
    """Held-out scores of a checkpoint, or (``ckpt`` None) of a fresh model as training starts."""
    model = new_model(config) if ckpt is None else load_model(ckpt, impl=TRAIN_IMPL)
    model.to(resolve_device(config.device))
    data = episode_data(config, model.meta["normalisation"])
    if not data.val_classes:
        raise FssError("no validation classes to evaluate (--val-classes none)", config.data)
    return evaluate_held_out(model, data, config, progress=config.progress)


def evaluate_held_out(model, data, config: TrainConfig, **options) -> dict:
    """Few-shot scores on the held-out classes with the run's evaluation settings and its method's
    test-time refinement."""
    return evaluate(
        model,
        data.val_set,
        data.val_classes,
        config.ways,
        config.shots,
        config.eval_episodes,
        config.eval_seed,
        config.eval_batch,
        features=FeatureCache(model.encode, config.cache_mb),  # weights are fixed while evaluating
        refine=resolve_refine(None, model),
        **options,
    )
