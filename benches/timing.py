"""Timing helpers shared by the benches."""

import torch


def synced(fn):
    """``fn`` that waits for the GPU, so the timer sees the kernels."""

    def run(*args):
        out = fn(*args)
        if args[0].is_cuda:
            torch.cuda.synchronize()
        return out

    return run
