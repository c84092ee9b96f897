"""Episodic training of any method on a folder, PASCAL-5i or COCO-20i dataset, held-out validation classes.

Defaults follow the paper (``--recipe paper``; fss-train's default fine-tunes the bundled model:
:mod:`fss.train.recipes`): 1-way 1-shot episodes, one episode per batch, SGD (momentum 0.9, lr 1e-3,
weight decay 5e-4), 30,000 iterations with the learning rate x0.1 at 1/3 and 2/3 of them (10k and
20k), random horizontal flip, query loss + 1.0 x prototype alignment (PAR). A method's recipe may
change the optimizer and learning rate (``FewShotModel.train_defaults``: OSLSM trains with AdamW).
``--fold i`` holds out the fold's test classes (:mod:`fss.train.benchmark`) and trains on the others.

``OUT/last.pt`` holds the weights, the metadata and the training state (step, optimizer, sampler
RNG): ``resume`` continues bit-for-bit on the same machine. ``OUT/final.pt`` (weights and metadata
only) is the model to ship; ``OUT/step-XXXXXX.pt`` are periodic snapshots of the same kind. A step
whose loss or weights are not finite stops the run before anything is saved from it.

Under ``torchrun`` every process draws the same global batch of episodes from the same seed and
builds and trains on its own share (episodes r, r + W, ...); DistributedDataParallel averages the
gradients, so W processes take the steps one process would take on the whole batch.
"""

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fss.checkpoint import atomic_save, checkpoint_dict, init_encoder, load_model
from fss.constants import IGNORE_INDEX, PAPER_INPUT_SIZE
from fss.errors import FssError, SettingError
from fss.models.base import DEFAULT_METHOD, FewShotModel, build_model, resolve_refine
from fss.train.data import EpisodeSampler
from fss.train.distributed import World, close_world, init_world, resolve_device
from fss.train.evaluate import EVAL_BATCH, EVAL_SEED, FeatureCache, evaluate, validation_line
from fss.train.recipes import initial_meta
from fss.train.run_state import (
    CsvLog,
    check_finite,
    load_training_state,
    run_summary,
    show_progress,
    training_state,
)
from fss.train.split import episode_data

TRAIN_IMPL = (
    "torch"  # the model's head in training: plain differentiable torch ops, as the methods' losses use
)


@dataclass
class TrainConfig:
    data: Path
    out: Path = Path("runs/panet")
    dataset: str = "folder"  # folder | voc | coco (fss.train.benchmark)
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
    negatives: float = 0.0  # share of queries (training and validation) replaced by photos without the class
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
    progress: bool | None = None  # a progress bar on stderr; None: when stderr is a terminal
    recipe: str = "paper"  # what the defaults came from (fss.train.recipes); these are the paper's

    def milestones(self) -> list[int]:
        if self.lr_milestones is not None:
            return sorted(self.lr_milestones)
        return [self.iters // 3, 2 * self.iters // 3]

    def lr_at(self, step: int) -> float:
        """Learning rate of the update that makes ``step`` (1-based)."""
        return self.lr * self.lr_gamma ** sum(step > m for m in self.milestones())

    def as_meta(self) -> dict:
        """Plain values for the checkpoint metadata; files and folders by their name only: where they lay on
        the training machine means nothing where the checkpoint goes, and is not the checkpoint's to tell."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        paths = {"data", "out", "init", "resume", "log"}
        return {k: Path(v).name if k in paths and v not in (None, "auto") else v for k, v in values.items()}


@dataclass
class TrainResult:
    model: FewShotModel
    step: int
    train_classes: list[str]
    val_classes: list[str]
    losses: list[tuple[float, float]] = field(default_factory=list)  # (query, align) of this run's steps
    val: dict | None = None
    rank: int = 0  # this process's rank under torchrun
    seconds: float = 0.0  # wall-clock time of this run's steps (and their validations)


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
        raise SettingError(f"{{freeze_stages}} {count}: {model.meta['encoder']} has {len(stages)} stages")
    for trunk in trunks:
        for stage in trunk.stages()[:count]:
            stage.requires_grad_(False)


def new_model(config: TrainConfig) -> FewShotModel:
    torch.manual_seed(config.seed)
    meta = initial_meta(config.init, config.method, config.method_options)
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
        result = train_in_world(config, world)
    except BaseException:
        close_world(world)  # no barrier: the other processes may never get to one
        raise
    close_world(world, finished=True)
    return result


def train_in_world(config: TrainConfig, world: World) -> TrainResult:
    run = TrainRun(config, world)
    bar = tqdm(
        total=config.iters,
        initial=run.result.step,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=not (show_progress(config.progress) and world.is_main),
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:
        while run.result.step < config.iters:
            step_loss, lr = run.iterate()
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.0e}", refresh=False)
    finally:
        bar.close()
        if run.log is not None:
            run.log.close()
    run.result.seconds = time.perf_counter() - started
    if run.data.val_classes and run.result.val is None:  # no iteration ran here (e.g. --iters 0)
        run.validate()
    if world.is_main:
        atomic_save(checkpoint_dict(run.model, **run.meta()), run.out / "final.pt")
    return run.result


class TrainRun:
    """One process's share of a training run: the model, its episodes, optimizer and log."""

    def __init__(self, config: TrainConfig, world: World):
        if config.batch_episodes % world.size:
            raise SettingError(
                f"{{batch_episodes}} {config.batch_episodes} is not a multiple of the {world.size} processes "
                f"(each process takes an equal share of every batch)"
            )
        self.config, self.world = config, world
        self.model = model = new_model(config).to(world.device)
        self.data = data = episode_data(config, model.meta["normalisation"])
        self.out = out = Path(config.out)
        if config.resume is None and (out / "last.pt").exists():
            raise SettingError(
                "output folder holds a run already: pass {resume} to continue it, or another {out}", out
            )
        if world.is_main:
            for cls, why in data.skipped.items():
                tqdm.write(f"note: class {cls!r} left out: {why}", file=sys.stderr)
        self.rng = np.random.default_rng(config.seed)
        self.sampler = EpisodeSampler(
            data.train_set,
            data.train_classes,
            config.ways,
            config.shots,
            config.queries,
            config.flip,
            self.rng,
            what="training classes",
            negatives=config.negatives,
        )
        model.train()
        self.optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
        step, seconds = 0, 0.0
        if config.resume is not None:
            step, seconds = load_training_state(
                Path(config.resume), model, self.optimizer, self.rng, config.optimizer
            )
        self.losses_of = wrap_for_world(EpisodeLosses(model, config.align), world)
        self.result = TrainResult(model, step, data.train_classes, data.val_classes, rank=world.rank)
        self.started = time.perf_counter() - seconds
        self.last_saved = step if config.resume is not None else None
        self.log = None
        if world.is_main:  # every setting is checked: the log, and what the run is
            log = Path(config.log) if config.log else out / "log.csv"
            self.log = CsvLog(log, append=config.resume is not None)
            tqdm.write(run_summary(config, data.train_classes, data.val_classes), file=sys.stderr)

    def meta(self) -> dict:
        return {
            "classes": self.data.train_classes,
            "input_size": self.config.size,
            "train_config": self.config.as_meta(),
            "iterations": self.result.step,
            "val": self.result.val,
        }

    def validate(self) -> dict:
        world, result = self.world, self.result
        shown = show_progress(self.config.progress) and world.is_main  # validating: a bar of its own
        parts = dict(part=(world.rank, world.size), reduce=world.sum)
        result.val = evaluate_held_out(self.model, self.data, self.config, progress=shown, **parts)
        result.val["step"] = result.step
        if world.is_main:
            tqdm.write(validation_line(result.step, result.val))
        return result.val

    def iterate(self) -> tuple[float, float]:
        """One training step, its validation, log row and checkpoints: ``(loss, lr)``."""
        config, world, result = self.config, self.world, self.result
        result.step += 1
        lr = config.lr_at(result.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_query, step_align = self.update()
        result.losses.append((step_query, step_align))
        step_loss = step_query + config.align_weight * step_align
        check_finite(self.model, step_loss, result.step, self.out, self.last_saved)
        at_end = result.step == config.iters
        evaluate_now = self.data.val_classes and (
            at_end or (config.eval_every and result.step % config.eval_every == 0)
        )
        val = self.validate() if evaluate_now else None
        seconds = time.perf_counter() - self.started
        if world.is_main:
            self.log.write(
                step=result.step,
                lr=lr,
                query_loss=f"{step_query:.6f}",
                align_loss=f"{step_align:.6f}",
                loss=f"{step_loss:.6f}",
                val_mean_iou="" if val is None else f"{val['mean_iou']:.6f}",
                val_binary_iou="" if val is None else f"{val['binary_iou']:.6f}",
                seconds=f"{seconds:.1f}",
            )
            self.save(at_end, seconds)
        return step_loss, lr

    def update(self) -> tuple[float, float]:
        """Losses and one optimizer step on this process's share of a batch: the whole batch's
        ``(query loss, second loss)``."""
        world = self.world
        batch = self.sampler.batch(self.config.batch_episodes, (world.rank, world.size)).to(world.device)
        # Cross-entropy is a mean over the batch's valid query pixels and DDP averages gradients over
        # processes: weighting each process's query loss by its share of those pixels makes the
        # average the whole batch's loss (with one process the weight is exactly 1).
        valid = (batch.qry_labels != IGNORE_INDEX).sum().to(torch.float64)
        all_valid = world.sum_tensor(valid)
        query_loss, align_loss = self.losses_of(
            batch.supp_imgs, batch.supp_fg, batch.supp_bg, batch.qry_imgs, batch.qry_labels
        )
        share = (valid * world.size / all_valid).to(query_loss.dtype)
        loss = share * query_loss + self.config.align_weight * align_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sums = world.sum_tensor(torch.stack([query_loss.double() * valid, align_loss.double()]))
        return (sums[0] / all_valid).item(), (sums[1] / world.size).item()

    def save(self, at_end: bool, seconds: float) -> None:
        config, step = self.config, self.result.step
        if at_end or step % config.save_every == 0:
            ckpt = checkpoint_dict(self.model, **self.meta())
            ckpt["train_state"] = training_state(step, self.optimizer, self.rng, seconds)
            atomic_save(ckpt, self.out / "last.pt")
            self.last_saved = step
        if config.snapshot_every and step % config.snapshot_every == 0:
            atomic_save(checkpoint_dict(self.model, **self.meta()), self.out / f"step-{step:06d}.pt")


def evaluate_only(config: TrainConfig, ckpt: Path | None = None) -> dict:
    """Held-out scores of a checkpoint, or (``ckpt`` None) of a fresh model as training starts."""
    model = new_model(config) if ckpt is None else load_model(ckpt, impl=TRAIN_IMPL)
    model.to(resolve_device(config.device))
    data = episode_data(config, model.meta["normalisation"])
    if not data.val_classes:
        raise SettingError("no validation classes to evaluate ({val_classes} none)", config.data)
    return evaluate_held_out(model, data, config, progress=show_progress(config.progress))


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
        negatives=config.negatives,
        **options,
    )
