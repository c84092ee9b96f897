"""fss: few-shot semantic segmentation (PANet and friends), official-exact and fast.

Public API (imported lazily so that ``import fss`` stays cheap and never needs CUDA, Triton or
TensorRT):

- ``fss.load_model(path=None, device=None)``: a checkpoint (official PANet snapshot or ours), a
  bundle directory, or ``None`` for the bundled demo model; returns the model in eval mode.
- ``fss.Segmenter``: register a support set once, segment many queries.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("fss.checkpoint", "load_model"),
    "save_checkpoint": ("fss.checkpoint", "save_checkpoint"),
    "PANet": ("fss.models.panet", "PANet"),
    "Segmenter": ("fss.runtime.segmenter", "Segmenter"),
    "FssError": ("fss.errors", "FssError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fss' has no attribute {name!r}")
