"""``fss-export``: a checkpoint's encoder as a verified, self-describing bundle the runtime loads.

- ``build``: :func:`~fss.export.build.export_bundle`, the whole export (what ``fss-export`` runs).
- ``onnx``: the ONNX export and the graph checks; ``tensorrt``: engines built from that graph.
- ``verify``: verification inputs, the error measure and its tolerances.
- ``bundle``: layout, manifest, hashes, validation, atomic publication.
- ``backends``: encoders that run a bundle (ONNX Runtime, TensorRT) or a torch model behind one contract,
  and :func:`~fss.export.backends.load_bundle` (what ``fss.load_model(DIR)`` returns).

Nothing here imports onnx, onnxruntime or tensorrt, or queries a device, at import time.
"""
