"""fss: few-shot semantic segmentation (PANet and friends), official-exact and fast.

Public API (imported lazily so that ``import fss`` stays cheap and never needs CUDA, Triton or
TensorRT):

- ``fss.load_model(path=None, device=None)``: a checkpoint (official PANet snapshot or ours), a
  bundle directory, or ``None`` for the bundled demo model; returns the model in eval mode.
- ``fss.Segmenter``: register a support set once, segment many queries.
- ``fss.FewShotModel``, ``fss.register_method``: the interface a method implements, and its registry.
"""

import os

from fss.lazy import lazy_attributes, lazy_dir

__version__ = "0.1.0"

# Idle OpenMP threads (torch's, fss's C++ kernels') sleep instead of spinning, unless the user chose
# otherwise. Spinning threads fight every other busy thread for the cores: with one other job on this
# 2-core machine a torch encoder pass took 3.9 s instead of 83 ms (docs/performance.md). Read by the
# OpenMP runtime when it starts, so it applies when fss is imported before torch (all fss commands).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_LAZY = {
    "load_model": ("fss.checkpoint", "load_model"),
    "save_checkpoint": ("fss.checkpoint", "save_checkpoint"),
    "PANet": ("fss.models.panet", "PANet"),
    "FewShotModel": ("fss.models.base", "FewShotModel"),
    "register_method": ("fss.models.base", "register_method"),
    "Segmenter": ("fss.runtime.segmenter", "Segmenter"),
    "FssError": ("fss.errors", "FssError"),
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY)
__dir__ = lazy_dir(__name__, _LAZY)
