"""``fss.serve``: few-shot segmentation behind Triton Inference Server, and its client.

- ``fss-serve`` (:mod:`fss.serve.cli`): the models ``fss_support`` and ``fss_segment`` in the Triton
  server bundled with PyTriton (``pip install 'fss[serve]'``).
- :class:`fss.serve.Client` (on ``tritonclient``): register a support folder, segment encoded images.
- :mod:`fss.serve.protocol`: names and the content-hash support ids both sides compute.

Imported lazily: ``import fss.serve`` needs neither PyTriton nor tritonclient.
"""

from importlib import import_module

_LAZY = {
    "Client": ("fss.serve.client", "Client"),
    "ServeError": ("fss.serve.client", "ServeError"),
    "ServeConfig": ("fss.serve.server", "ServeConfig"),
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fss.serve' has no attribute {name!r}")
