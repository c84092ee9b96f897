"""Running a model's encoder outside eager PyTorch, and reading the bundles ``fss-export`` writes.

- :mod:`~fss.backends.sessions`: encoders behind one contract (eager PyTorch, ONNX Runtime, TensorRT).
- :mod:`~fss.backends.bundle_format`: a bundle's layout, manifest and validation, as its readers see it.
- :mod:`~fss.backends.bundle_model`: :func:`~fss.backends.bundle_model.load_bundle`, a validated bundle as a
  :class:`~fss.backends.bundle_model.BundleModel` (encoder + its method's head; what ``fss.load_model(DIR)``
  returns).

Below the runtime, above models and io: nothing here writes a bundle (:mod:`fss.export` does), and
nothing imports onnxruntime or tensorrt, or queries a device, at import time.
"""
