"""What the commands share: argparse validators, the model-source flags and loading the model they name.

A command module, above the runtime (it loads models through :mod:`fss.checkpoint`,
:mod:`fss.backends` and the runtime's device choice). The library below raises typed errors
that name no flag; these helpers word them with the flags the user gave.
"""

import argparse
import math
import sys
from pathlib import Path

from fss.constants import EDGES, MAX_INPUT_SIZE, MIN_INPUT_SIZE, REFINEMENTS
from fss.errors import SettingError

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")


# -- validators (argparse ``type=``): a refused value is ``<prog>: error: argument --x: <why>``, exit 2 --
def validator(name: str, convert, accept, why: str):
    """An argparse type named ``name``: ``convert(text)`` where ``accept(value)``, else refused with
    ``why`` (``{value}`` and ``{text}`` filled in)."""

    def parse(text: str):
        value = convert(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(why.format(value=value, text=text))
        return value

    parse.__name__ = name  # argparse names the type in "invalid <name> value"
    return parse


positive_int = validator("positive_int", int, lambda v: v >= 1, "must be at least 1, got {value}")
count = validator("count", int, lambda v: v >= 0, "must be 0 or more, got {value}")
port = validator("port", int, lambda v: 1 <= v <= 65535, "not a TCP port: {value}")
input_size = validator(
    "input_size",
    int,
    lambda v: MIN_INPUT_SIZE <= v <= MAX_INPUT_SIZE,
    f"must be from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}, got {{value}}",
)
finite_float = validator("finite_float", float, math.isfinite, "must be a finite number, got {text}")
non_negative_float = validator(
    "non_negative_float", finite_float, lambda v: v >= 0, "must be 0 or more, got {text}"
)
positive_float = validator("positive_float", finite_float, lambda v: v > 0, "must be more than 0, got {text}")
share = validator("share", finite_float, lambda v: 0 <= v <= 1, "must be from 0 to 1, got {text}")


def check_input_size(parser: argparse.ArgumentParser, size: int | None) -> None:
    """``--size`` (None: the model's) within the sizes an encoder takes, else exit 2 with one line."""
    if size is not None and not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
        parser.error(f"--size must be from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}")


# -- options several commands share, worded once -------------------------------------------------------
def add_negatives_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--negatives P``: the share of queries replaced by photos without their class."""
    parser.add_argument(
        "--negatives",
        type=share,
        default=0.0,
        metavar="P",
        help=f"share of {what} queries replaced by photos without the class (labels all background; "
        "default 0)",
    )


def add_size_arg(parser: argparse.ArgumentParser, default: str = "the checkpoint's, 417 for PANet") -> None:
    """``--size``: the encoder's input size, else ``default`` (checked by :func:`check_input_size`)."""
    parser.add_argument("--size", type=int, metavar="S", help=f"encoder input size (default: {default})")


def add_batch_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=positive_int, default=4, help="queries encoded together")


def add_refine_arg(parser: argparse.ArgumentParser) -> None:
    from fss.models.base import get_method, method_names

    defaults = ", ".join(f"{get_method(name).default_refine} for {name}" for name in method_names())
    parser.add_argument(
        "--refine",
        choices=REFINEMENTS,
        default=None,
        help=f"test-time refinement of the prototypes on the queries (default: the checkpoint's method's: "
        f"{defaults})",
    )


def add_min_score_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--min-score",
        type=share,
        default=None,
        metavar="S",
        help="presence cut-off from 0 to 1: a class scoring below it on a query gets no pixels there "
        "(default: the checkpoint's calibrated cut-off, 0 without one: nothing is gated)",
    )


def add_edges_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--edges",
        choices=EDGES,
        default=None,
        help="none: bilinear logits; guided: probabilities guided-filtered with the photo, so that "
        "boundaries follow its edges (default: the checkpoint's, else none)",
    )


def add_way_shot_args(parser: argparse.ArgumentParser) -> None:
    """``--ways`` and ``--shots`` of the episodes a command draws."""
    parser.add_argument("--ways", type=positive_int, default=1, help="classes per episode (default 1)")
    parser.add_argument("--shots", type=positive_int, default=1, help="support images per class (default 1)")


def add_memory_arg(parser: argparse.ArgumentParser, flag: str, default: float, what: str) -> None:
    """``flag``: a memory budget in MB (0 or more) for ``what``."""
    parser.add_argument(flag, type=non_negative_float, default=default, metavar="MB", help=what)


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when available")


# -- the model a command runs -----------------------------------------------------------------------------
def add_model_args(parser: argparse.ArgumentParser, backends=BACKENDS, backend_help: str | None = None):
    """``--ckpt`` or ``--bundle`` (neither: the bundled demo model), ``--backend`` and ``--device``.

    Returns the mutually exclusive group of the two sources, for a command with a third source.
    """
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--ckpt", type=Path, metavar="CKPT", help="official PANet snapshot or fss checkpoint (default: demo)"
    )
    source.add_argument(
        "--bundle", type=Path, metavar="BUNDLE", help="bundle directory written by fss-export"
    )
    backend_help = backend_help or "what runs the encoder (default auto)"
    parser.add_argument("--backend", default="auto", choices=backends, help=backend_help)
    add_device_arg(parser)
    return source


def load_from_args(args, demo_note: str | None = None):
    """(model, device) of the model flags: ``--bundle`` on ``--backend`` (input size ``size``, its int8
    encoder with ``int8``), else ``--ckpt`` or the bundled demo model (``demo_note`` is printed then).

    ``args`` is any object with ``ckpt``, ``bundle``, ``backend`` and ``device`` (and optionally
    ``size`` and ``int8``): parsed arguments, or a server's configuration made from them.
    """
    from fss.checkpoint import load_model
    from fss.runtime.encoder_backend import resolve_device

    try:
        device = resolve_device(args.device)
    except SettingError as err:  # fss-serve starts its model outside fss.command's runner
        raise err.flagged() from None
    if args.bundle is not None:
        from fss.backends.bundle_model import load_bundle

        wanted = None if args.device == "auto" else device
        size, int8 = getattr(args, "size", None), getattr(args, "int8", False)
        model = load_bundle(args.bundle, args.backend, wanted, size, int8=int8)
        return model, model.device  # the head runs where the bundle's encoder delivers its features
    if args.ckpt is None and demo_note:
        print(demo_note, file=sys.stderr)
    return load_model(args.ckpt, device=device), device


def demo_model_note(prog: str) -> str:
    return f"{prog}: no --ckpt given: using the bundled demo model (see README, 'Demo model')"
