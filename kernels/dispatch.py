"""Choosing an implementation: ``impl="auto" | "torch" | "triton" | "native"``.

``auto``: ``native`` (C++/OpenMP) for CPU tensors when the extension is built, ``triton`` for CUDA
tensors when triton is importable, ``torch`` otherwise. Nothing here imports triton or queries a
device at import time.
"""

import importlib.util
import os
from functools import cache

import torch

IMPLS = ("auto", "torch", "triton", "native")


@cache
def native_available() -> bool:
    try:
        from fss.kernels import _native  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, tensor, op: str) -> str:
    """The concrete implementation for ``op`` on ``tensor``'s device."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if tensor.device.type == "cuda":
            return "triton" if triton_available() else "torch"
        if tensor.device.type == "cpu" and native_available():
            return "native"
        return "torch"
    if impl == "native":
        if tensor.device.type != "cpu":
            raise ValueError(f"{op}: impl='native' runs on CPU tensors, got {tensor.device}")
        if not native_available():
            raise RuntimeError(f"{op}: the C++ extension fss.kernels._native is not built (pip install -e .)")
    if impl == "triton" and tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return impl


def native_threads() -> int:
    """Threads for the C++ kernels: torch's intra-op setting, so one knob governs both."""
    return torch.get_num_threads()
