"""What a training run keeps besides the weights: the state a resume needs, the CSV log, and the check
that stops a diverged run before anything is saved from it; and what it tells the user as it goes."""

import csv
import sys
from pathlib import Path

import numpy as np
import torch

from fss.checkpoint import load_state_strict, read_torch_file
from fss.errors import FssError, SettingError, summary
from fss.models.base import FewShotModel
from fss.validation import check_checkpoint

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
        message = "the run was trained with {optimizer} {saved}, not {name}"
        raise SettingError(message, path, saved=saved, name=optimizer_name)
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


def check_finite(model: FewShotModel, loss: float, step: int, out: Path, last_saved: int | None) -> None:
    """Stop at the first non-finite loss or weight, before anything is saved from it."""
    bad = None if np.isfinite(loss) else f"the loss is {loss}"
    if bad is None and not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
        bad = "a weight is not finite"
    if bad is not None:
        kept = f"{out / 'last.pt'} keeps step {last_saved}" if last_saved else "no checkpoint was written"
        message = "training diverged at step {step}: {bad} (lower {lr}?); {kept}"
        raise SettingError(message, out, step=step, bad=bad, kept=kept)


def show_progress(progress: bool | None) -> bool:
    """``progress``, or (None) whether stderr is a terminal: a bar in a log file is noise."""
    if progress is not None:
        return progress
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def run_summary(config, train_classes: list[str], val_classes: list[str], shown: int = 8) -> str:
    """The run's first lines: what the recipe and the flags made of it, its classes and held-out ones."""

    def names(classes):
        more = f", ... ({len(classes)} in all)" if len(classes) > shown else ""
        return ", ".join(classes[:shown]) + more

    start = {None: "from scratch", "auto": "from its pretrained weights"}.get(config.init)
    start = start or f"from {Path(config.init).name}"
    frozen = f", {config.freeze_stages} stages frozen" if config.freeze_stages else ""
    held = "none held out (no validation)"
    if val_classes:
        held = f"held out for validation: {names(val_classes)}"
    return (
        f"recipe {config.recipe}: {config.method} on {config.encoder} {start}"
        f"{frozen}, {config.size} px, {config.iters} steps of {config.batch_episodes} episode(s), lr "
        f"{config.lr:g}; run folder {config.out}\n"
        f"training on {len(train_classes)} classes ({names(train_classes)}); {held}"
    )
