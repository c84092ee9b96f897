"""TensorRT engines built from the bundle's ONNX graph by TensorRT's ONNX parser.

Why the ONNX parser rather than Torch-TensorRT: the engine is built from the graph that was just
checked and verified, and running it needs only the ``tensorrt`` package, not torch-tensorrt.

The network is *strongly typed*: its precision is the graph's (``--fp16`` builds from a float16 copy of
the encoder graph, float32 in and out), the only mode TensorRT 11 keeps. One optimisation profile
covers batches 1..max_batch at the bundle's input size; the runtime splits larger batches.

UNVERIFIED HERE: TensorRT cannot be installed on the development machines (no GPU). This code
follows the TensorRT 10 / 11 Python API; the calls are checked against a stand-in for that API
(``tests/test_export.py::test_engine_building_with_a_fake_tensorrt``), and
``test_tensorrt_engine_matches_eager`` builds and runs a real engine where tensorrt and CUDA exist.
"""

from pathlib import Path

import torch

from fss.backends.sessions import require_tensorrt
from fss.errors import FssError
from fss.export.onnx import INPUT_NAME
from fss.export.verify import VerificationError


def build_engine(onnx_path: Path, engine_path: Path, size: int, max_batch: int, precision: str) -> dict:
    """Parse ``onnx_path``, build and serialise an engine to ``engine_path``; return its manifest entry."""
    trt = require_tensorrt("building a TensorRT engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VerificationError(f"TensorRT's ONNX parser rejects the graph: {errors}", onnx_path)
    config = builder.create_builder_config()
    if precision == "float32":
        config.clear_flag(trt.BuilderFlag.TF32)  # float32 means float32: TF32 convs add ~1e-3 error
    batches = {"min": 1, "opt": max_batch, "max": max_batch}
    shapes = {name: (batch, 3, size, size) for name, batch in batches.items()}
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FssError("TensorRT could not build an engine (its log above says why)", onnx_path)
    engine_path.write_bytes(bytes(serialized))
    capability = torch.cuda.get_device_capability()
    return {
        "engine": engine_path.name,
        "precision": precision,
        "profile": {name: list(shape) for name, shape in shapes.items()},
        "tensorrt_version": trt.__version__,
        "device": torch.cuda.get_device_name(),
        "compute_capability": f"{capability[0]}.{capability[1]}",
    }
