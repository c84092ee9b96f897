"""``fss.serve``: few-shot segmentation behind Triton Inference Server, and its client.

- ``fss-serve`` (:mod:`fss.serve.cli`): the models ``fss_support`` and ``fss_segment`` in the Triton
  server bundled with PyTriton (``pip install 'fss[serve]'``).
- :class:`fss.serve.Client` (on ``tritonclient``): register a support folder, segment encoded images.
- :mod:`fss.serve.protocol`: names and the content-hash support ids both sides compute.

Imported lazily: ``import fss.serve`` needs neither PyTriton nor tritonclient.
"""

from fss.lazy import lazy_attributes, lazy_dir

_LAZY = {
    "Client": ("fss.serve.client", "Client"),
    "ServeError": ("fss.serve.client", "ServeError"),
    "ServeConfig": ("fss.serve.server", "ServeConfig"),
}

__all__ = list(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
__dir__ = lazy_dir(__name__, _LAZY)
