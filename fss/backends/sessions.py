"""Encoders behind one contract: eager PyTorch, ONNX Runtime, TensorRT.

Contract of every encoder: ``encode(images)`` takes a normalised ``M x 3 x S x S`` float tensor (any
device) and returns ``M x C x h x w`` float32 features as a torch tensor on the encoder's ``device``;
``feature_channels`` is ``C``. The runtime never cares which backend computed them.

- :class:`TorchEncoder`: a model (checkpoint) in eager PyTorch.
- :class:`OnnxRuntimeEncoder`: an ONNX graph; CPU, or CUDA with IO binding (onnxruntime-gpu).
- :class:`TensorRTEncoder`: a TensorRT engine (unverified here: no TensorRT, no GPU).
"""

import functools
from pathlib import Path

import numpy as np
import torch

from fss.errors import FssError

# ONNX Runtime's u8s8 kernels on x86-64 CPUs without VNNI (AVX2, AVX-512 before VNNI) add pairs of
# products in saturating 16 bits (255 x 127 x 2 > 32767): masks drifted far from float32 there. Under
# this session entry ONNX Runtime runs the same graph with exact u8u8 kernels instead, so full 8-bit
# weights give the same products on every CPU (more accurate than 7-bit ``reduce_range`` weights:
# docs/performance.md). VNNI adds the products in 32 bits, exactly, and faster than u8u8: the entry is
# left out only where the CPU's flags show VNNI.
EXACT_INT8_SESSION_ENTRY = ("session.x64quantprecision", "1")
VNNI_FLAGS = {"avx512_vnni", "avx_vnni"}


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (Linux's /proc/cpuinfo); None where they cannot be read."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def needs_exact_int8_entry(flags: frozenset[str] | None) -> bool:
    """Whether ONNX Runtime needs :data:`EXACT_INT8_SESSION_ENTRY` for exact int8 products on a CPU of
    these flags: unless they show VNNI (unknown flags: yes; the entry is a no-op off x86)."""
    return flags is None or not VNNI_FLAGS & flags


INSTALL_HINT = "pip install 'fss[gpu]' (or pip install tensorrt) on a machine with an NVIDIA GPU"


def tensorrt_missing(what: str) -> str | None:
    """``None`` when TensorRT and a CUDA device are usable, else one line: what is missing, how to get it."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):  # OSError: the package is there but its libnvinfer is not
        missing.append("TensorRT (the tensorrt Python package cannot be imported)")
    if not torch.cuda.is_available():
        missing.append(f"a CUDA device (torch {torch.__version__} sees none)")
    return f"{what} needs {' and '.join(missing)}: {INSTALL_HINT}" if missing else None


def require_tensorrt(what: str):
    """The ``tensorrt`` module, or ``FssError`` with :func:`tensorrt_missing`'s line."""
    missing = tensorrt_missing(what)
    if missing:
        raise FssError(missing)
    import tensorrt

    return tensorrt


class TorchEncoder:
    """A PANet's encoder in eager PyTorch, on the device of its weights."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.feature_channels = model.encoder.out_channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.encode(images.to(self.device, torch.float32))


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise FssError(
            "ONNX Runtime is not installed: pip install 'fss[onnx]' (onnxruntime-gpu for CUDA)"
        ) from None
    return onnxruntime


def onnxruntime_has_cuda() -> bool:
    return "CUDAExecutionProvider" in import_onnxruntime().get_available_providers()


def cpu_session_options(ort):
    """One CPU thread budget for torch and ONNX Runtime (``torch.get_num_threads()``, which fss commands'
    ``--threads`` set), and idle threads that sleep: spinning costs ~15-20 % more CPU time at the same
    speed, taken from the threads that decode the next queries (docs/performance.md)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if needs_exact_int8_entry(cpu_flags()):  # int8 graphs: exact integer products (fss.export.quantize)
        options.add_session_config_entry(*EXACT_INT8_SESSION_ENTRY)
    return options


class OnnxRuntimeEncoder:
    """An ONNX encoder graph in ONNX Runtime: CPU execution provider, or CUDA when ``device`` is CUDA.

    On CUDA, IO binding hands ONNX Runtime torch's device pointers, so images and features stay on
    the GPU (unverified here: no GPU on the development machines).
    """

    def __init__(self, onnx_path, device=None):
        ort = import_onnxruntime()
        self.device = torch.device(device or "cpu")
        if self.device.type == "cuda":
            if not onnxruntime_has_cuda():
                raise FssError(
                    "ONNX Runtime has no CUDA provider: pip install onnxruntime-gpu (in place of onnxruntime)"
                )
            cuda = ("CUDAExecutionProvider", {"device_id": self.device.index or 0})
            providers = [cuda, "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), cpu_session_options(ort), providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own exception types for unloadable graphs
            reason = str(exc).splitlines()[0]
            raise FssError(f"ONNX Runtime cannot load the encoder: {reason}", onnx_path) from None
        (graph_input,) = self.session.get_inputs()
        (graph_output,) = self.session.get_outputs()
        self.input_name, self.output_name = graph_input.name, graph_output.name
        self.feature_shape = tuple(graph_output.shape[1:])  # C x h x w: only the batch axis is dynamic
        self.feature_channels = self.feature_shape[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().to(self.device, torch.float32).contiguous()
        if self.device.type == "cuda":
            return self.encode_bound(images)
        (features,) = self.session.run([self.output_name], {self.input_name: images.numpy()})
        return torch.from_numpy(features)

    def encode_bound(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.empty((len(images), *self.feature_shape), device=self.device)
        device_id = self.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(
            self.input_name, "cuda", device_id, np.float32, tuple(images.shape), images.data_ptr()
        )
        binding.bind_output(
            self.output_name, "cuda", device_id, np.float32, tuple(features.shape), features.data_ptr()
        )
        torch.cuda.current_stream(self.device).synchronize()  # ONNX Runtime runs on its own stream
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return features


class TensorRTEncoder:
    """A serialised TensorRT engine on one CUDA device, run on torch's current stream.

    Batches above the engine's profile maximum are split. UNVERIFIED HERE (no TensorRT, no GPU).
    """

    def __init__(self, engine_path, device=None):
        trt = require_tensorrt("the tensorrt backend")
        self.device = torch.device(device or "cuda")
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise FssError(
                "TensorRT cannot load this engine (built for another GPU or TensorRT version): "
                "re-export it with fss-export --trt on this machine, or use the onnxruntime backend",
                engine_path,
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if n != self.input_name)
        self.max_batch = self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0]
        self.feature_shape = tuple(self.engine.get_tensor_shape(self.output_name))[1:]
        self.feature_channels = self.feature_shape[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32).contiguous()
        features = torch.empty((len(images), *self.feature_shape), device=self.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            self.context.set_input_shape(self.input_name, tuple(chunk.shape))
            self.context.set_tensor_address(self.input_name, chunk.data_ptr())
            self.context.set_tensor_address(self.output_name, features[start : start + len(chunk)].data_ptr())
            if not self.context.execute_async_v3(stream):
                raise RuntimeError("TensorRT failed to run the encoder engine")
        return features
