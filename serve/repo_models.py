"""Python-backend models of the Triton model repository written by ``fss-export --triton-repo``.

Each ``model.py`` of the repository is one line (``from fss.serve.repo_models import SupportModel as
TritonPythonModel``), so the server's Python environment needs ``pip install fss``. The models speak
the same protocol as ``fss-serve`` (same inputs, outputs and errors; the same client works) and run
the same handlers; two things differ because Triton runs every Python-backend model instance in its
own process:

- the encoder is the repository's ``fss_encoder`` model (ONNX Runtime or TensorRT backend, dynamically
  batched, on the GPU), called through BLS; with the ``ENCODER`` parameter ``local`` the bundle's ONNX
  graph runs in ONNX Runtime inside the Python process instead (servers without those backends);
- support sets live in a content-addressed cache directory (:class:`DiskStore`, on tmpfs by default),
  so a set registered through ``fss_support`` is found by every ``fss_segment`` instance of the server.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from fss.serve.handlers import Limits
from fss.serve.support_store import SupportStore


class BlsEncoder:
    """The encoder contract (``M x 3 x S x S`` -> ``M x C x h x w`` float32) over a Triton model (BLS).

    When the server cannot run that model (no ONNX Runtime / TensorRT backend, as in the server bundled
    with PyTriton), the first call switches, once and for good, to ``fallback()``: the same ONNX graph
    in ONNX Runtime inside this Python process.
    """

    MISSING = ("unknown model", "not found", "is not ready", "unavailable")

    def __init__(self, model_name: str, feature_channels: int, max_batch: int, fallback):
        import torch

        self.model_name = model_name
        self.feature_channels = feature_channels
        self.max_batch = max_batch
        self.device = torch.device("cpu")
        self.fallback = fallback
        self.local = None

    def encode(self, images):
        if self.local is not None:
            return self.local.encode(images)
        try:
            return self.encode_remote(images)
        except LookupError as err:
            import triton_python_backend_utils as pb_utils

            pb_utils.Logger.log_warn(
                f"fss: encoder model {self.model_name} unavailable ({err}): running the bundle's ONNX "
                "graph in ONNX Runtime inside the Python backend"
            )
            self.local = self.fallback()
            return self.local.encode(images)

    def encode_remote(self, images):
        import torch
        import triton_python_backend_utils as pb_utils

        features = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch].detach().float().contiguous().numpy()
            request = pb_utils.InferenceRequest(
                model_name=self.model_name,
                requested_output_names=["features"],
                inputs=[pb_utils.Tensor("images", chunk)],
            )
            response = request.exec()
            if response.has_error():
                message = response.error().message()
                if any(m in message.lower() for m in self.MISSING):
                    raise LookupError(message)
                raise RuntimeError(f"{self.model_name}: {message}")
            features.append(pb_utils.get_output_tensor_by_name(response, "features").as_numpy())
        return torch.from_numpy(np.concatenate(features))


class DiskStore(SupportStore):
    """The in-memory LRU in front of a directory of content-addressed support sets (``<hash>.pt``).

    Files are written atomically and never change (an id is its content), so processes share them
    without locks; the directory keeps the ``capacity`` most recently used sets.
    """

    def __init__(self, capacity: int, directory: Path, combine):
        """``combine``: the served model's (``FewShotModel.combine``), which rebuilds a loaded set's state."""
        super().__init__(capacity)
        self.combine = combine
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / f"{key.rpartition(':')[2]}.pt"

    def put(self, key: str, support, shots) -> None:
        import torch

        super().put(key, support, shots)
        state = {
            "classes": list(support.classes),
            "fg": list(support.fg),
            "bg": list(support.bg),
            "shots": shots,
        }
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.trim()

    def trim(self) -> None:
        files = sorted(self.directory.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in files[self.capacity :]:
            stale.unlink(missing_ok=True)

    def load(self, key: str) -> bool:
        """Bring a set from the directory into memory; False when no process has stored it."""
        import torch

        from fss.runtime.supports import SupportSet

        path = self.path(key)
        try:
            state = torch.load(path, weights_only=True)
            os.utime(path)
        except (FileNotFoundError, EOFError, RuntimeError):
            return False
        fg, bg = state["fg"], state["bg"]
        support = SupportSet(state["classes"], fg, bg, self.combine(fg, bg), self.combine)
        SupportStore.put(self, key, support, state["shots"])
        return True

    def __contains__(self, key):
        return super().__contains__(key) or self.load(key)

    def __getitem__(self, key):
        if not super().__contains__(key) and not self.load(key):
            raise KeyError(key)
        return super().__getitem__(key)

    def shots(self, key: str):
        if not super().__contains__(key) and not self.load(key):
            raise KeyError(key)
        return super().shots(key)


class PbRequest:
    """A Python-backend request as the handlers of :mod:`fss.serve.server` read one."""

    def __init__(self, request):
        self.data = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        self.requested_output_names = list(request.requested_output_names()) or None


def parameters(model_config: dict) -> dict:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def build_services(args: dict):
    """The handlers of one model instance, from its ``config.pbtxt`` parameters."""
    from fss.backends.bundle_format import validate_bundle
    from fss.backends.bundle_model import bundle_model, load_bundle
    from fss.serve.server import ServeConfig, Services

    model_config = json.loads(args["model_config"])
    params = parameters(model_config)
    repo = Path(args["model_repository"]).parent
    bundle = repo / params["BUNDLE"]
    max_batch = int(params["MAX_BATCH"])
    if params["ENCODER"] == "local":
        model = load_bundle(bundle, backend="onnxruntime", device="cpu")
    else:
        manifest = validate_bundle(bundle)
        encoder = BlsEncoder(
            params["ENCODER"],
            int(params["FEATURE_CHANNELS"]),
            max_batch,
            lambda: load_bundle(bundle, backend="onnxruntime", device="cpu").encoder,
        )
        model = bundle_model(bundle, manifest, encoder, backend="triton")
    config = ServeConfig(
        bundle=bundle,
        max_batch=max_batch,
        max_supports=int(params["MAX_SUPPORTS"]),
        limits=Limits(int(params["MAX_IMAGE_BYTES"]), int(params["MAX_PIXELS"]), int(params["MAX_SHOTS"])),
    )
    cache = params.get("SUPPORT_CACHE") or os.path.join(
        "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(), f"fss-supports-{os.getuid()}"
    )
    store = DiskStore(config.max_supports, Path(cache) / params["REPO_ID"], model.combine)
    return Services(config, model=model, device=model.device, store=store)


def responses(replies: list[dict], requests) -> list:
    import triton_python_backend_utils as pb_utils

    out = []
    for reply, request in zip(replies, requests, strict=True):
        wanted = request.requested_output_names
        tensors = [
            pb_utils.Tensor(name, value) for name, value in reply.items() if not wanted or name in wanted
        ]
        out.append(pb_utils.InferenceResponse(output_tensors=tensors))
    return out


class SupportModel:
    """``fss_support`` as a Python-backend model."""

    def initialize(self, args):
        from fss.serve.server import make_support_infer

        self.infer = make_support_infer(build_services(args))

    def execute(self, requests):
        adapted = [PbRequest(r) for r in requests]
        return responses(self.infer(adapted), adapted)


class SegmentModel:
    """``fss_segment`` as a Python-backend model (dynamically batched by Triton)."""

    def initialize(self, args):
        from fss.serve.server import make_segment_infer

        self.infer = make_segment_infer(build_services(args).segmenters[0])

    def execute(self, requests):
        adapted = [PbRequest(r) for r in requests]
        return responses(self.infer(adapted), adapted)
