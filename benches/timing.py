"""Helpers shared by the benches: timing, inputs, waiting for the background exporter."""

import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


def write_random_episode(root: Path, size: int, queries: int, box: tuple[slice, slice]) -> None:
    """A 1-way 1-shot episode of noise photos in fss-run's layout under ``root``: ``support/thing/s.jpg``
    with its mask (``box``: rows, columns of the foreground) and ``query/q<i>.jpg``, all ``size`` square."""
    rng = np.random.default_rng(0)
    (root / "support" / "thing").mkdir(parents=True)
    (root / "query").mkdir()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
        root / "support" / "thing" / "s.jpg"
    )
    mask = np.zeros((size, size), np.uint8)
    mask[box] = 255
    Image.fromarray(mask).save(root / "support" / "thing" / "s.png")
    for i in range(queries):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
            root / "query" / f"q{i}.jpg"
        )


def wait_for_background_export(cache: Path, timeout: float = 1800) -> None:
    """Until the exporter a cold run started has published (or refused) the graph and let go of its lock."""
    from fss.runtime.encoder_path import export_lock, exporter_slot

    deadline = time.monotonic() + timeout
    encoders = cache / "encoders"
    while time.monotonic() < deadline:
        if encoders.is_dir() and any(not p.name.startswith(".") for p in encoders.iterdir()):
            with export_lock(exporter_slot(encoders / "any"), wait=False) as free:
                if free:
                    return
        time.sleep(0.2)
    raise TimeoutError(f"no background export finished in {cache}")
