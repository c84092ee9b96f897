"""``export_bundle``: checkpoint -> ONNX (+ TensorRT) encoder -> verified against eager -> bundle."""

import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

import fss
from fss.backends.bundle_format import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CONDITIONING_FILE,
    DECISION_HEAD_FILE,
    ENGINE_FILE,
    ONNX_FILE,
    sha256_file,
)
from fss.backends.sessions import tensorrt_missing
from fss.checkpoint import load_model
from fss.errors import SettingError
from fss.export import verify
from fss.export.bundle import file_entries, staged_bundle, write_manifest
from fss.export.onnx import DEFAULT_OPSET, export_onnx, require_onnx_tools
from fss.export.quantize import INT8_FILE
from fss.models.encoders import get_encoder

DEFAULT_MAX_BATCH = 8


def default_out(ckpt: Path) -> Path:
    return ckpt.with_name(f"{ckpt.stem}-bundle")


def tool_versions(with_tensorrt: bool) -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    versions = {
        "fss": fss.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if with_tensorrt:
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    return versions


def export_bundle(
    ckpt, out=None, *, log: Callable[[str], None] = lambda line: None, **settings
) -> tuple[Path, dict]:
    """Export the encoder of ``ckpt`` as a verified bundle at ``out``; return its path and manifest.

    Always writes ``encoder.onnx`` (float32, dynamic batch), verified with ONNX Runtime (CPU) against
    eager PyTorch; with ``trt`` also ``encoder.engine`` (float16 with ``fp16``), verified on the GPU.
    ``size`` defaults to the checkpoint's input size; ``max_batch`` bounds the TensorRT profile.
    ``int8_photos`` (opt-in) adds ``encoder-int8.onnx``, statically quantised and calibrated on them
    (:mod:`fss.export.quantize`). ``settings``: the keyword arguments of :func:`export_model_bundle`
    (``trt``, ``fp16``, ``size``, ``max_batch``, ``opset``, ``verify_images``, ``int8_photos``).

    Raises ``FssError`` for what the user can fix (checkpoint, output path, missing TensorRT / CUDA,
    opset), before anything is written, and ``VerificationError`` when the exported encoder is
    beyond tolerance. Either way nothing is left at ``out``: the bundle is built beside it and renamed
    into place only when complete.
    """
    ckpt = Path(ckpt)
    out = Path(out) if out is not None else default_out(ckpt)
    require_onnx_tools()
    trt = settings.get("trt", False)
    if trt and (missing := tensorrt_missing("{trt}")):
        raise SettingError(missing)
    if settings.get("fp16") and not trt:
        log("note: --fp16 applies to TensorRT engines (--trt); the ONNX encoder stays float32")
    model = load_model(ckpt)
    source = {"file": ckpt.name, "sha256": sha256_file(ckpt)}
    return export_model_bundle(model, out, source, log=log, **settings)


def export_model_bundle(
    model,
    out: Path,
    source: dict,
    *,
    trt: bool = False,
    fp16: bool = False,
    size: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    opset: int = DEFAULT_OPSET,
    verify_images=(),
    int8_photos=(),
    log: Callable[[str], None] = lambda line: None,
) -> tuple[Path, dict]:
    """:func:`export_bundle` of a loaded torch model (CPU, eval mode); ``source`` describes where it came
    from (``manifest["source_checkpoint"]``)."""
    size = int(size or model.meta["input_size"])
    meta = {**model.meta, "input_size": size}
    inputs = verify.verification_inputs(size, model.meta["normalisation"], verify_images)
    ops = get_encoder(model.meta["encoder"]).onnx_ops | model.export_ops
    modules = model.export_graphs()

    with staged_bundle(out) as staging:
        log(
            f"exporting the encoder of {source['file']} ({model.meta['encoder']}, "
            f"width {model.encoder.width:g}, {size}x{size})"
        )
        graph = export_onnx(modules["encoder"], staging / ONNX_FILE, size, ops, opset)
        with torch.inference_mode():
            references = {name: verify.encode_in_batches(model.encode, x) for name, x in inputs.items()}
        log(f"verifying {ONNX_FILE} with ONNX Runtime (CPU) on {', '.join(inputs)} inputs")
        verification = {"reference": verify.REFERENCE}
        verification["onnxruntime"] = verify_onnxruntime(staging / ONNX_FILE, inputs, references)
        int8 = None
        if int8_photos:
            log(f"quantising the encoder to int8 ({INT8_FILE}), calibrated on {len(int8_photos)} photos")
            int8 = build_verified_int8(
                staging, int8_photos, size, model.meta["normalisation"], inputs, references
            )
            verification["onnxruntime_int8"] = int8.pop("verification")
        head = None
        if "head" in modules:  # a learned head (SST's): its query path as ONNX, its weights
            from fss.export.head import export_head

            head = export_head(model, staging, references, opset, log)
            verification["head"] = head.pop("verification")
        engine = None
        if trt:
            precision = "float16" if fp16 else "float32"
            log(f"building and verifying {ENGINE_FILE} with TensorRT ({precision})")
            engine = build_verified_engine(
                model, staging, size, max_batch, opset, precision, inputs, references
            )
            verification["tensorrt"] = engine.pop("verification")
        extra = {}
        if "conditioning" in modules:
            extra["conditioning"] = export_conditioning(
                model, modules["conditioning"], staging, ops, opset, log
            )
        if "decision_head" in modules:  # small: its weights, run in PyTorch beside the encoder
            torch.save(modules["decision_head"].state_dict(), staging / DECISION_HEAD_FILE)
            extra["decision_head"] = {"weights": DECISION_HEAD_FILE}
        manifest = {
            **extra,
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "meta": meta,
            "onnx": {"file": ONNX_FILE, "dtype": "float32", **graph},
            "int8": int8,
            "tensorrt": engine,
            **({"head": head} if head is not None else {}),
            "files": file_entries(staging),
            "verification": verification,
            "tools": tool_versions(with_tensorrt=trt),
            "source_checkpoint": source,
        }
        write_manifest(staging, manifest)
    return out, manifest


def query_module(model):
    return model.export_graphs()["encoder"]


def export_conditioning(model, module, staging: Path, ops, opset: int, log) -> dict:
    """OSLSM's conditioning branch as ``conditioning.onnx`` (masked supports at the support size ->
    regression weights), verified with ONNX Runtime against eager PyTorch; always run by ONNX Runtime."""
    size = int(model.meta["support_size"])
    graph = export_onnx(module, staging / CONDITIONING_FILE, size, ops, opset)
    inputs = verify.verification_inputs(size, model.meta["normalisation"])
    box = torch.zeros(size, size)
    box[size // 4 : 3 * size // 4, size // 5 : 4 * size // 5] = 1  # masked, as supports reach the graph
    inputs = {name: images * box for name, images in inputs.items()}
    with torch.inference_mode():
        references = {name: verify.encode_in_batches(module, x) for name, x in inputs.items()}
    log(f"verifying {CONDITIONING_FILE} with ONNX Runtime (CPU)")
    report = verify_onnxruntime(staging / CONDITIONING_FILE, inputs, references)
    return {"file": CONDITIONING_FILE, "input_size": size, **graph, "verification": report}


def verify_onnxruntime(onnx_path: Path, inputs: dict, references: dict) -> dict:
    from fss.backends.sessions import OnnxRuntimeEncoder

    encoder = OnnxRuntimeEncoder(onnx_path, "cpu")
    report = verify.verify_encoder("ONNX Runtime", encoder.encode, inputs, references)
    return {"provider": "CPUExecutionProvider", **report}


def build_verified_int8(staging: Path, photos, size: int, normalisation: dict, inputs, references) -> dict:
    """``encoder-int8.onnx`` beside the float32 graph, run in ONNX Runtime and compared with eager; the
    entry carries its ``verification``."""
    from fss.backends.sessions import OnnxRuntimeEncoder
    from fss.export.quantize import QUANTISATION, calibration_batches, quantize_encoder

    quantize_encoder(
        staging / ONNX_FILE, staging / INT8_FILE, calibration_batches(photos, size, normalisation)
    )
    encoder = OnnxRuntimeEncoder(staging / INT8_FILE, "cpu")
    # Noise lies outside any photo's activation ranges: int8 is judged on image-like inputs only.
    image_like = {name: x for name, x in inputs.items() if name != "random"}
    report = verify.verify_encoder("ONNX Runtime int8", encoder.encode, image_like, references, "int8")
    return {"file": INT8_FILE, "calibration_photos": len(photos), **QUANTISATION, "verification": report}


def build_verified_engine(
    model, staging: Path, size, max_batch, opset, precision, inputs, references
) -> dict:
    """Build ``encoder.engine`` from the float32 graph, or from a float16 copy of it (kept out of the
    bundle), run it on the GPU and compare with eager; the entry carries its ``verification``."""
    from fss.backends.sessions import TensorRTEncoder
    from fss.export.tensorrt import build_engine

    with tempfile.TemporaryDirectory() as scratch:
        source = staging / ONNX_FILE
        if precision == "float16":
            source = Path(scratch) / "encoder-fp16.onnx"
            ops = get_encoder(model.meta["encoder"]).onnx_ops | model.export_ops
            export_onnx(query_module(model), source, size, ops, opset, float16=True)
        engine = build_engine(source, staging / ENGINE_FILE, size, max_batch, precision)
    encoder = TensorRTEncoder(staging / ENGINE_FILE, "cuda")
    engine["verification"] = verify.verify_encoder("TensorRT", encoder.encode, inputs, references, precision)
    return engine
