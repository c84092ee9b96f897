"""``fss-export``: a checkpoint's encoder as a verified, self-describing bundle the runtime loads.

- ``build``: :func:`~fss.export.build.export_bundle`, the whole export (what ``fss-export`` runs).
- ``onnx``: the ONNX export and the graph checks; ``tensorrt``: engines built from that graph.
- ``verify``: verification inputs, the error measure and its tolerances.
- ``bundle``: file entries, the manifest, atomic publication (the format: :mod:`fss.backends.bundle_format`).
- ``head``: a learned head (SST's) as a verified ONNX graph; ``quantize``: the opt-in int8 encoder.
- ``triton_repo``: a Triton model repository around a bundle (``fss-export --triton-repo``).

Bundles are read and run by :mod:`fss.backends`, which sits below this package: the runtime's encoder
cache (:mod:`fss.runtime.encoder_path`) exports with it, and every command loads bundles without it.

Nothing here imports onnx, onnxruntime or tensorrt, or queries a device, at import time.
"""
