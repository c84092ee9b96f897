"""Bundles loaded as models for the runtime: a validated bundle's encoder session with its method's head
on top (:class:`BundleModel`, what ``fss.load_model(DIR)`` returns).
"""

from pathlib import Path

import torch

from fss.backends.bundle_format import validate_bundle
from fss.backends.sessions import (
    OnnxRuntimeEncoder,
    TensorRTEncoder,
    import_onnxruntime,
    onnxruntime_has_cuda,
    tensorrt_missing,
)
from fss.errors import FssError
from fss.models.base import build_model, method_of
from fss.validation import read_torch_file

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
HEAD_INPUT_NAMES = ("features", "descriptors")  # a learned head's ONNX graph (fss.export.head)
HEAD_OUTPUT_NAME = "logits"


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
        raise FssError("backend torch runs checkpoints; a bundle runs on onnxruntime or tensorrt")
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
    graphs = head_graphs(Path(bundle_dir), manifest, encoder.device) if "head" in manifest else {}
    if "decision_head" in manifest:
        graphs["decision_head"] = decision_head_graph(Path(bundle_dir), manifest, encoder.device)
    return BundleModel(encoder, manifest, backend, impl, conditioning, graphs)


def int8_encoder(bundle_dir: Path, manifest: dict, backend: str, device) -> "OnnxRuntimeEncoder":
    """The bundle's int8 encoder (the backend ``onnxruntime-int8``): opt-in, CPU only."""
    if manifest.get("int8") is None:
        raise FssError("bundle has no int8 encoder: re-export it with fss-export --int8 PHOTOS", bundle_dir)
    if backend not in ("auto", "onnxruntime") or (
        device not in (None, "auto") and torch.device(device).type != "cpu"
    ):
        raise FssError("the int8 encoder runs in ONNX Runtime on the CPU (backend onnxruntime, device cpu)")
    return OnnxRuntimeEncoder(bundle_dir / manifest["int8"]["file"], "cpu")


class OnnxRuntimeHead:
    """The query path of ``head.onnx`` with the head interface the method uses: ``embed`` is the identity
    (the graph embeds), ``relate(features, descriptors)`` runs the graph."""

    def __init__(self, path, device=None):
        ort = import_onnxruntime()
        self.device = torch.device(device or "cpu")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own exception types for unloadable graphs
            raise FssError(f"ONNX Runtime cannot load the head: {str(exc).splitlines()[0]}", path) from None

    @staticmethod
    def embed(features: torch.Tensor) -> torch.Tensor:
        return features

    def relate(self, features: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        feeds = {
            name: t.detach().to("cpu", torch.float32).contiguous().numpy()
            for name, t in zip(HEAD_INPUT_NAMES, (features, descriptors), strict=True)
        }
        (logits,) = self.session.run([HEAD_OUTPUT_NAME], feeds)
        return torch.from_numpy(logits).to(features.device)


def head_graphs(bundle_dir: Path, manifest: dict, device) -> dict:
    """A bundle's learned head (e.g. SST's) as the graphs its method's ``from_graphs`` takes: ``head``
    (PyTorch, for the support side) and ``query_head`` (ONNX Runtime)."""
    entry = manifest["head"]
    meta = manifest["meta"]
    network = build_model(meta["method"], meta["encoder"], meta["width"], meta, path=bundle_dir)
    state = read_torch_file(bundle_dir / entry["weights"])
    if not isinstance(state, dict):
        raise FssError("head weights are not a state dict", bundle_dir / entry["weights"])
    try:
        network.head.load_state_dict(state)
    except RuntimeError as exc:
        raise FssError(
            f"head weights do not fit: {str(exc).splitlines()[0]}", bundle_dir / entry["weights"]
        ) from None
    return {
        "head": network.head.eval().to(device),
        "query_head": OnnxRuntimeHead(bundle_dir / entry["file"], device),
    }


def decision_head_graph(bundle_dir: Path, manifest: dict, device) -> torch.nn.Module:
    """A bundle's learned decision head (PANet / PRNet's ``--refine learned``), run in PyTorch."""
    from fss.models.decision_head import DecisionHead

    path = bundle_dir / manifest["decision_head"]["weights"]
    options = manifest["meta"].get("decision_head")
    if not isinstance(options, dict):
        raise FssError("bundle has decision head weights but its meta has no 'decision_head'", bundle_dir)
    head = DecisionHead(int(options["width"]))
    try:
        head.load_state_dict(read_torch_file(path))
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise FssError(f"decision head weights do not fit: {str(exc).splitlines()[0]}", path) from None
    return head.eval().to(device)
