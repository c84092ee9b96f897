"""Timing helpers shared by the benches."""

import fcntl
import os
import time
from pathlib import Path

import torch

# FSS_BENCH_QUICK=1: every bench on small inputs (sizes, widths, counts), for CI's one pass with
# --benchmark-disable that catches a bench broken by a change. Figures come from full runs only.
QUICK = os.environ.get("FSS_BENCH_QUICK") == "1"


def synced(fn):
    """``fn`` that waits for the GPU, so the timer sees the kernels."""

    def run(*args):
        out = fn(*args)
        if args[0].is_cuda:
            torch.cuda.synchronize()
        return out

    return run


def wait_for_background_export(cache: Path, timeout: float = 1800) -> None:
    """Until the exporter a cold run started has published (or refused) the graph and let go of its lock."""
    deadline = time.monotonic() + timeout
    encoders, slot = cache / "encoders", cache / "locks" / "background-exporter.lock"
    while time.monotonic() < deadline:
        if encoders.is_dir() and any(not p.name.startswith(".") for p in encoders.iterdir()):
            fd = os.open(slot, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.2)
    raise TimeoutError(f"no background export finished in {cache}")
