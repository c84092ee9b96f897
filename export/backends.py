"""Encoder backends behind one contract, and bundles loaded as models for the runtime.

Contract of every encoder: ``encode(images)`` takes a normalised ``M x 3 x S x S`` float tensor (any
device) and returns ``M x C x h x w`` float32 features as a torch tensor on the encoder's ``device``;
``feature_channels`` is ``C``. The runtime never cares which backend computed them.

- :class:`TorchEncoder`: a checkpoint's encoder in eager PyTorch.
- :class:`OnnxRuntimeEncoder`: a bundle's ONNX graph; CPU, or CUDA with IO binding (onnxruntime-gpu).
- :class:`TensorRTEncoder`: a bundle's TensorRT engine (unverified here: no TensorRT, no GPU).
- :func:`load_bundle`: a validated bundle as a :class:`BundleModel` (encoder + its method's head).
"""

from pathlib import Path

import numpy as np
import torch

from fss.errors import FssError
from fss.export.bundle import validate_bundle
from fss.export.quantize import EXACT_INT8_SESSION_ENTRY, cpu_flags, needs_exact_int8_entry
from fss.export.tensorrt import require_tensorrt, tensorrt_missing
from fss.models.base import method_of

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


class TorchEncoder:
    """A model's encoder in eager PyTorch, on the device of its weights."""

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
                "re-export with --trt on this machine, or use --backend onnxruntime",
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


class BundleModel:
    """An exported encoder with its method's head on top (``meta["method"]``): what ``fss.load_model(DIR)``
    returns.

    Runs as an eval-mode model for inference: ``encode``, ``__call__`` (logits, as the model's
    ``forward``), ``meta``, ``impl``, ``to``/``eval``, and the method's interface
    (:class:`fss.models.base.FewShotModel`: ``shot_states``, ``combine``, ``segment``, ...) on
    ``network``, the method's model built from the bundle's graphs (``from_graphs``). ``device`` is where
    features and logits are returned; the encoder runs where it was loaded (``encoder.device``).
    """

    def __init__(
        self, encoder, manifest: dict, backend: str, impl: str = "auto", conditioning=None, graphs=None
    ):
        self.encoder = encoder
        self.conditioning = conditioning  # a method's support graph beside the encoder (ONNX Runtime)
        self.manifest = manifest
        self.backend = backend
        self.meta = dict(manifest["meta"])
        self.impl = impl
        self.feature_channels = encoder.feature_channels
        self.device = encoder.device
        graphs = {"encoder": self.encode, "conditioning": self.condition_masked, **(graphs or {})}
        self.network = method_of(self).from_graphs(self.meta, graphs, impl).eval()  # unknown: one line

    def __getattr__(self, name):
        """The method's interface (``shot_states``, ``segment``, ``scale``, ...): the network's."""
        if name == "network":  # not built yet
            raise AttributeError(name)
        return getattr(self.network, name)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``M x 3 x S x S`` normalised images (S the bundle's input size) -> ``M x C x h x w``."""
        size = self.meta["input_size"]
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be M x 3 x {size} x {size}, got {tuple(images.shape)}")
        return self.encoder.encode(images).to(self.device)

    def condition_masked(self, masked: torch.Tensor) -> torch.Tensor:
        """The conditioning graph: ``M x 3 x s x s`` masked supports -> ``M x (D+1)`` (OSLSM's weights)."""
        if self.conditioning is None:
            raise FssError(f"this {self.meta['method']} bundle has no conditioning branch")
        return self.conditioning.encode(masked).to(self.device)

    def __call__(self, supp_imgs, supp_fg, supp_bg, qry_imgs, shot_mask=None, refine="none"):
        """``B x Q x (1+N) x H x W`` logits, as the model's ``forward``."""
        with torch.inference_mode():
            return self.network(supp_imgs, supp_fg, supp_bg, qry_imgs, shot_mask, refine)

    def to(self, device=None, memory_format=None):
        """Deliver features and logits on ``device``; the memory format is the backend's (fixed at export)."""
        if device is not None:
            self.device = torch.device(device)
        return self

    def eval(self):
        return self


def engine_fits_here(engine: dict) -> bool:
    """An engine loads only under the TensorRT version and GPU architecture that built it."""
    import tensorrt

    major, minor = torch.cuda.get_device_capability()
    same_gpu = engine["compute_capability"] == f"{major}.{minor}"
    return same_gpu and engine["tensorrt_version"] == tensorrt.__version__


def choose_backend(manifest: dict, backend: str, device, bundle_dir: Path) -> tuple[str, torch.device]:
    """The concrete backend and device. ``auto`` prefers TensorRT (an engine that fits this GPU and
    TensorRT, device not CPU), then ONNX Runtime on CUDA (onnxruntime-gpu and a GPU), then on the CPU."""
    if backend not in BACKENDS:
        raise FssError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        raise FssError("backend torch runs checkpoints (--ckpt); a bundle runs on onnxruntime or tensorrt")
    device = None if device in (None, "auto") else torch.device(device)
    wants_gpu = device is None or device.type == "cuda"
    engine = manifest.get("tensorrt")
    if backend == "auto":
        usable = engine is not None and wants_gpu and tensorrt_missing("tensorrt") is None
        backend = "tensorrt" if usable and engine_fits_here(engine) else "onnxruntime"
    if backend == "tensorrt":
        if engine is None:
            raise FssError("bundle has no TensorRT engine: re-export it with fss-export --trt", bundle_dir)
        if not wants_gpu:
            raise FssError("the tensorrt backend runs on a CUDA device, not the CPU")
        return "tensorrt", device or torch.device("cuda")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() and onnxruntime_has_cuda() else "cpu")
    return "onnxruntime", device


def load_bundle(
    bundle_dir, backend: str = "auto", device=None, input_size: int | None = None, impl="auto", int8=False
):
    """A bundle written by ``fss-export`` as a :class:`BundleModel`, ready for inference.

    The bundle is validated first (format version, every file's sha256, ``input_size`` when given):
    any mismatch raises ``FssError`` with one line naming the file, before a backend is started.

    Args:
        backend: ``auto | onnxruntime | tensorrt`` (``torch`` is refused: it runs checkpoints).
        device: ``None``/``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``: where the encoder runs.
        input_size: the size the caller will feed; refused if the bundle was built for another.
        impl: kernels of the head (``fss.kernels``).
        int8: run the bundle's int8 encoder (``fss-export --int8``) in ONNX Runtime on the CPU.
    """
    bundle_dir = Path(bundle_dir)
    manifest = validate_bundle(bundle_dir, input_size)
    if int8:
        backend, encoder = "onnxruntime-int8", int8_encoder(bundle_dir, manifest, backend, device)
    else:
        backend, device = choose_backend(manifest, backend, device, bundle_dir)
        if backend == "tensorrt":
            encoder = TensorRTEncoder(bundle_dir / manifest["tensorrt"]["engine"], device)
        else:
            encoder = OnnxRuntimeEncoder(bundle_dir / manifest["onnx"]["file"], device)
    return bundle_model(bundle_dir, manifest, encoder, backend, impl)


def bundle_model(bundle_dir: Path, manifest: dict, encoder, backend: str, impl="auto") -> "BundleModel":
    """A validated bundle's method around ``encoder`` (any object with ``encode`` and ``device``): its
    other graphs (a conditioning branch, a learned head) come from the bundle's own files."""
    conditioning = manifest.get("conditioning")
    if conditioning is not None:  # a support branch beside the encoder (OSLSM's)
        conditioning = OnnxRuntimeEncoder(Path(bundle_dir) / conditioning["file"], encoder.device)
    graphs = {}
    if "head" in manifest:  # a learned head (SST's)
        from fss.export.head import head_graphs

        graphs = head_graphs(Path(bundle_dir), manifest, encoder.device)
    return BundleModel(encoder, manifest, backend, impl, conditioning, graphs)


def int8_encoder(bundle_dir: Path, manifest: dict, backend: str, device) -> "OnnxRuntimeEncoder":
    """The bundle's int8 encoder (the backend ``onnxruntime-int8``): opt-in, CPU only."""
    if manifest.get("int8") is None:
        raise FssError("bundle has no int8 encoder: re-export it with fss-export --int8 PHOTOS", bundle_dir)
    if backend not in ("auto", "onnxruntime") or (
        device not in (None, "auto") and torch.device(device).type != "cpu"
    ):
        raise FssError(
            "the int8 encoder runs in ONNX Runtime on the CPU (--backend onnxruntime, --device cpu)"
        )
    return OnnxRuntimeEncoder(bundle_dir / manifest["int8"]["file"], "cpu")
