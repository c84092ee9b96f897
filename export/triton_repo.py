"""A Triton Inference Server model repository for a bundle (``fss-export --triton-repo DIR``)::

    DIR/fss-repo.json                  what was written from which bundle
    DIR/fss_encoder/config.pbtxt       the encoder: ONNX Runtime backend, dynamic batching
    DIR/fss_encoder/1/                 the bundle itself (manifest.json, encoder.onnx[.data])
    DIR/fss_encoder_trt/...            with a TensorRT engine in the bundle: the same on TensorRT
    DIR/fss_support/config.pbtxt       Python backend: register / add_shot / remove_shot / info
    DIR/fss_support/1/model.py
    DIR/fss_segment/config.pbtxt       Python backend, dynamically batched: (support id, image) -> labels
    DIR/fss_segment/1/model.py

The two Python models are those of ``fss-serve`` (same protocol, same client; see
:mod:`fss.serve.repo_models`) and call the encoder model through BLS. ``encoder="local"`` writes no
encoder model and runs the bundle's ONNX graph in ONNX Runtime inside the Python backend, for servers
that lack the ONNX Runtime / TensorRT backends (the one bundled with PyTriton has only Python).
"""

import json
import shutil
from pathlib import Path

from fss.backends.bundle_format import ENGINE_FILE, MANIFEST_FILE, ONNX_FILE, sha256_file, validate_bundle
from fss.export.bundle import check_replaceable, staged_directory
from fss.serve import protocol
from fss.serve.handlers import Limits

REPO_FILE = "fss-repo.json"
REPO_FORMAT = "fss-triton-repo"
ENCODER_MODEL = "fss_encoder"
ENCODER_TRT_MODEL = "fss_encoder_trt"
TRITON_TYPES = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32"}
MODEL_PY = '''"""{name}: the fss model of this repository; needs `pip install fss` in the server's Python."""

from fss.serve.repo_models import {cls} as TritonPythonModel  # noqa: F401
'''


def tensor_block(kind: str, spec) -> str:
    """``input [...]`` / ``output [...]`` of a config.pbtxt from ``(name, datatype, shape, optional)``."""
    entries = []
    for name, dtype, shape, optional in spec:
        extra = " optional: true" if optional else ""
        dims = ", ".join(str(d) for d in shape)
        entries.append(f'  {{ name: "{name}" data_type: {TRITON_TYPES[dtype]} dims: [ {dims} ]{extra} }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def parameters_block(params: dict) -> str:
    return "".join(
        f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in sorted(params.items())
    )


def batching_block(max_batch: int, max_queue_delay_us: int) -> str:
    delay = f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
    return f"max_batch_size: {max_batch}\n" + delay


def encoder_config(name: str, platform: str, filename: str, size: int, features, max_batch, delay) -> str:
    spec_in = [("images", "FP32", (3, size, size), False)]
    spec_out = [("features", "FP32", tuple(features), False)]
    return (
        f'name: "{name}"\nplatform: "{platform}"\ndefault_model_filename: "{filename}"\n'
        + batching_block(max_batch, delay)
        + tensor_block("input", spec_in)
        + tensor_block("output", spec_out)
    )


def python_config(name: str, batching: str, inputs, outputs, instances: int, params: dict) -> str:
    return (
        f'name: "{name}"\nbackend: "python"\n'
        + batching
        + tensor_block("input", inputs)
        + tensor_block("output", outputs)
        + f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
        + parameters_block(params)
    )


def feature_shape(onnx_path: Path) -> tuple[int, int, int]:
    """``C, h, w`` of the encoder graph's output (only the batch axis is dynamic)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    dims = graph.output[0].type.tensor_type.shape.dim[1:]
    return tuple(int(d.dim_value) for d in dims)


def check_repo_replaceable(out: Path) -> None:
    """``out`` may be written: absent, empty, or a repository written by fss (replaced as a whole)."""
    check_replaceable(out, REPO_FILE, "an fss model repository")


def write_triton_repo(
    bundle_dir,
    out,
    *,
    max_batch: int = 8,
    max_queue_delay_us: int = 2000,
    segment_instances: int = 1,
    max_supports: int = 64,
    limits: Limits | None = None,
    encoder: str = "triton",
) -> Path:
    """Write the repository for a validated bundle at ``out`` (atomically; a previous one is replaced).

    ``encoder``: ``"triton"`` (the encoder as its own model, called through BLS; TensorRT when the bundle
    has an engine) or ``"local"`` (ONNX Runtime inside the Python backend). ``segment_instances``: Python
    processes of ``fss_segment``, which share registered sets through the cache directory.
    """
    if encoder not in ("triton", "local"):
        raise ValueError(f"encoder must be 'triton' or 'local', got {encoder!r}")
    bundle_dir, out = Path(bundle_dir), Path(out)
    manifest = validate_bundle(bundle_dir)
    check_repo_replaceable(out)
    limits = limits or Limits()
    size = int(manifest["meta"]["input_size"])
    features = feature_shape(bundle_dir / ONNX_FILE)
    engine = manifest.get("tensorrt")
    encoder_model = "local" if encoder == "local" else (ENCODER_TRT_MODEL if engine else ENCODER_MODEL)
    params = {
        "ENCODER": encoder_model,
        "BUNDLE": f"{ENCODER_MODEL}/1" if encoder == "triton" else f"{protocol.SUPPORT_MODEL}/bundle",
        "FEATURE_CHANNELS": features[0],
        "MAX_BATCH": max_batch,
        "MAX_SUPPORTS": max_supports,
        "MAX_IMAGE_BYTES": limits.max_image_bytes,
        "MAX_PIXELS": limits.max_pixels,
        "MAX_SHOTS": limits.max_shots,
        # Poolings depend on the encoder's weights: repositories of one encoder share cached sets.
        "REPO_ID": manifest["files"][ONNX_FILE]["sha256"][:16],
    }
    with staged_directory(out, "model repository") as staging:
        shutil.copytree(bundle_dir, staging / params["BUNDLE"])
        if encoder == "triton":
            write_encoders(staging, bundle_dir, engine, size, features, max_batch, max_queue_delay_us)
        batched = batching_block(max_batch, max_queue_delay_us)
        models = [
            (
                protocol.SUPPORT_MODEL,
                "max_batch_size: 0\n",
                protocol.SUPPORT_INPUTS,
                protocol.SUPPORT_OUTPUTS,
                1,
            ),
            (
                protocol.SEGMENT_MODEL,
                batched,
                protocol.SEGMENT_INPUTS,
                protocol.SEGMENT_OUTPUTS,
                segment_instances,
            ),
        ]
        for (name, batching, inputs, outputs, instances), cls in zip(
            models, ("SupportModel", "SegmentModel"), strict=True
        ):
            directory = staging / name
            (directory / "1").mkdir(parents=True, exist_ok=True)
            (directory / "config.pbtxt").write_text(
                python_config(name, batching, inputs, outputs, instances, params)
            )
            (directory / "1" / "model.py").write_text(MODEL_PY.format(name=name, cls=cls))
        record = {
            "format": REPO_FORMAT,
            "bundle": str(bundle_dir.resolve()),
            "bundle_manifest_sha256": sha256_file(bundle_dir / MANIFEST_FILE),
            "encoder": encoder_model,
            "input_size": size,
            "features": list(features),
            "max_batch": max_batch,
        }
        (staging / REPO_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def write_encoders(staging: Path, bundle_dir: Path, engine, size, features, max_batch, delay) -> None:
    """``fss_encoder`` on ONNX Runtime (the bundle is its version 1); on TensorRT too with an engine."""
    (staging / ENCODER_MODEL / "config.pbtxt").write_text(
        encoder_config(ENCODER_MODEL, "onnxruntime_onnx", ONNX_FILE, size, features, max_batch, delay)
    )
    if engine:
        trt_dir = staging / ENCODER_TRT_MODEL
        (trt_dir / "1").mkdir(parents=True)
        shutil.copy2(bundle_dir / ENGINE_FILE, trt_dir / "1" / ENGINE_FILE)
        trt_batch = min(max_batch, engine["profile"]["max"][0])  # the engine's optimisation profile
        (trt_dir / "config.pbtxt").write_text(
            encoder_config(ENCODER_TRT_MODEL, "tensorrt_plan", ENGINE_FILE, size, features, trt_batch, delay)
        )
