"""Timing helpers shared by the benches."""

import os

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
