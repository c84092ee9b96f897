"""Which path runs a checkpoint's encoder: the fastest *verified* one this machine has.

On the CPU, ONNX Runtime runs our encoders in a fraction of eager PyTorch's time (docs/performance.md).
``auto`` therefore exports a model's encoder once, verifies it against eager PyTorch (``fss.export``'s
float32 tolerance, on noise, a smooth image and the bundled example photos), and keeps the verified
bundle in a cache folder under a digest of everything the bundle depends on: the model's weights and
metadata, the input size and the versions of fss, torch and ONNX Runtime.
Later runs validate the cached bundle (every file's sha256) and load it in milliseconds; a graph that
failed verification is remembered (``<digest>.refused``) and not exported again. Where the ONNX
Runtime path is not possible (ONNX tools not installed, cache not writable, export refused), ``auto``
runs torch and says why. On CUDA, and for adaptation (it fine-tunes the torch weights), the path is torch.

The cache folder is ``$FSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/fss``, else ``~/.cache/fss``.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import fss
from fss.errors import FssError

CHOICES = ("auto", "torch", "onnxruntime")
CACHE_ENV = "FSS_CACHE_DIR"
CACHE_FORMAT = 1  # bump when the cached bundle's layout or verification changes
EXAMPLE_PHOTOS = Path(fss.__file__).resolve().parent.parent / "examples"
ONNX_TOOLS = ("onnx", "onnxscript", "onnxruntime")
log = logging.getLogger("fss.runtime")  # commands print its notes (fss.command)


@dataclass(frozen=True)
class EncoderPath:
    """The model to run (a torch model, or a :class:`fss.export.backends.BundleModel`), the backend's
    name and one line saying why."""

    model: object
    backend: str
    reason: str


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fss"


def missing_onnx_tools() -> list[str]:
    return [name for name in ONNX_TOOLS if importlib.util.find_spec(name) is None]


def encoder_digest(model, size: int) -> str:
    """sha256 of what the cached bundle depends on: the model's weights (names, dtypes, shapes, bytes;
    all of them: a bundle may carry a head or a second branch besides the encoder), its meta (the
    bundle's manifest repeats it), the input size and the tool versions."""
    import onnxruntime

    header = {
        "cache_format": CACHE_FORMAT,
        "meta": model.meta,
        "width": getattr(model.encoder, "width", None),
        "size": int(size),
        "fss": fss.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def verification_photos() -> list[Path]:
    """Real photos for the export's verification: the bundled examples, where this install has them."""
    from fss.io import list_images

    if not (EXAMPLE_PHOTOS / "query").is_dir():
        return []
    return list_images(EXAMPLE_PHOTOS / "query")[0][:2]


def cached_bundle(model, size: int):
    """``(bundle, folder)``: the verified ONNX bundle of ``model`` at ``size``, loaded for ONNX Runtime
    on the CPU, from the cache or exported into it first. Loading validates the bundle (every file's
    sha256), so a damaged entry is found by the same single pass that loads it.

    Raises ``FssError`` (export refused, cache not writable) and ``OSError``.
    """
    from fss.export.build import export_model_bundle
    from fss.export.verify import VerificationError

    folder = cache_root() / "encoders" / encoder_digest(model, size)[:40]
    refused = folder.with_name(folder.name + ".refused")
    if refused.is_file():  # verification is deterministic: a refused graph is not exported again
        raise VerificationError(refused.read_text().strip())
    if folder.exists():
        try:
            return load_cached(folder, model, size), folder
        except FssError as exc:  # ours to replace: a cache entry, never user data
            log.warning("rebuilding a damaged cached encoder (%s)", exc)
            shutil.rmtree(folder, ignore_errors=True)
    log.info("exporting and verifying the encoder for ONNX Runtime (once per checkpoint and size)")
    source = {"file": "(in-memory model)", "encoder_digest": folder.name}
    try:
        export_model_bundle(model, folder, source, size=size, verify_images=verification_photos())
    except VerificationError as exc:
        refused.write_text(f"{exc.message}\n")
        raise
    return load_cached(folder, model, size), folder


def load_cached(folder: Path, model, size: int):
    from fss.export.backends import load_bundle

    return load_bundle(folder, backend="onnxruntime", device="cpu", input_size=size, impl=model.impl)


def choose_encoder_path(
    model, device: torch.device, size: int, backend: str = "auto", adapting: bool = False
) -> EncoderPath:
    """The encoder path for a loaded model on ``device``: ``backend`` ``torch``, ``onnxruntime`` (the
    cached verified export; an error when impossible) or ``auto`` (ONNX Runtime on the CPU when it can
    be had, torch otherwise)."""
    if backend not in CHOICES:
        raise FssError(f"unknown encoder backend {backend!r}: choose one of {', '.join(CHOICES)}")
    current = getattr(model, "backend", "torch")
    if current != "torch":  # already an exported bundle
        return EncoderPath(model, current, f"{current} (bundle)")
    why_torch = torch_reason(device, backend, adapting)
    if why_torch is not None:
        if backend == "onnxruntime":
            raise FssError(f"the onnxruntime encoder path is not available: {why_torch}")
        return EncoderPath(model, "torch", f"torch ({why_torch})" if backend == "auto" else "torch")
    try:
        bundle, folder = cached_bundle(model, size)
    except Exception as exc:  # auto never fails a model that runs in torch: it says why and runs torch
        if backend == "onnxruntime":
            raise
        reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}".splitlines()[0]
        return EncoderPath(model, "torch", f"torch (no verified ONNX graph: {reason})")
    return EncoderPath(bundle, "onnxruntime", f"onnxruntime (verified graph cached in {folder})")


def torch_reason(device: torch.device, backend: str, adapting: bool) -> str | None:
    """Why the encoder must run in torch here, or None."""
    if backend == "torch":
        return "asked for"
    if device.type != "cpu":
        return f"on {device.type}"
    if adapting:
        return "adaptation fine-tunes the torch weights"
    if missing := missing_onnx_tools():
        return f"{', '.join(missing)} not installed: pip install 'fss[onnx]' for the ONNX Runtime path"
    return None
