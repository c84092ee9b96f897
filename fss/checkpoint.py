"""Checkpoint formats: the official PANet snapshot, fss's own checkpoint, torchvision's VGG16 weights.

- Official snapshot: ``torch.save(nn.DataParallel(model).state_dict())``, 26 tensors named
  ``module.encoder.backbone.features.<B>.<L>.weight|bias`` (``module.`` absent without DataParallel).
- fss checkpoint: ``{"format": "fss-checkpoint", "version": 1, "meta": {...}, "state_dict": {...}}``
  with our parameter names ``encoder.features.<B>.<L>.*`` and the metadata of :func:`default_meta`.
- torchvision ``vgg16-397923af.pth``: the first 26 tensors (13 conv weight/bias pairs) initialise the
  encoder, in order, as the official code does.

Everything is read with ``torch.load(weights_only=True)``.
"""

from pathlib import Path

import torch

from fss.errors import CheckpointError, summary
from fss.io import atomic_write
from fss.models.panet import PANet, default_meta
from fss.validation import check_archive, check_checkpoint

CHECKPOINT_FORMAT = "fss-checkpoint"
CHECKPOINT_VERSION = 1
OFFICIAL_PREFIXES = ("module.encoder.backbone.", "encoder.backbone.")
OUR_PREFIX = "encoder."
DEMO_MODEL = Path(__file__).parent / "assets" / "demo-panet.pt"


def read_torch_file(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path)
    check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / foreign / pickled files
        raise CheckpointError(f"unreadable checkpoint: {summary(exc)}", path) from None


def encoder_state_from_official(state: dict, path) -> dict:
    """Official snapshot keys -> our encoder keys; one clear error for anything else."""
    out, unexpected = {}, []
    for key, value in state.items():
        prefix = next((p for p in OFFICIAL_PREFIXES if key.startswith(p)), None)
        if prefix is None or not torch.is_tensor(value):
            unexpected.append(key)
        else:
            out[OUR_PREFIX + key[len(prefix) :]] = value
    if not out:
        sample = ", ".join(sorted(map(str, state))[:3]) or "none"
        raise CheckpointError(f"not a PANet/fss checkpoint: no encoder tensors (keys: {sample})", path)
    if unexpected:
        raise CheckpointError(f"not a PANet checkpoint: unexpected keys {', '.join(unexpected[:5])}", path)
    return out


def infer_width(state: dict, path) -> float:
    first = state.get(OUR_PREFIX + "features.0.0.weight")
    if first is None or first.dim() != 4:
        raise CheckpointError("not a PANet checkpoint: missing key encoder features.0.0.weight", path)
    return first.shape[0] / 64


def load_state_strict(model: PANet, state: dict, path) -> None:
    """Load with a one-line error naming missing / unexpected keys or the first shape mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(
                f"unexpected keys {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"
            )
        raise CheckpointError("checkpoint does not fit PANet: " + "; ".join(parts), path)
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"checkpoint does not fit PANet: {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(value.shape)}",
                path,
            )
    model.load_state_dict(state)


def model_from_state(obj, path) -> PANet:
    check_checkpoint(obj, path, CHECKPOINT_FORMAT)
    if not isinstance(obj, dict):
        raise CheckpointError(f"not a PANet/fss checkpoint: holds a {type(obj).__name__}, not a dict", path)
    if obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"unsupported fss checkpoint version {obj.get('version')!r}", path)
        meta = obj.get("meta", {})
        if meta.get("method", "panet") != "panet":
            raise CheckpointError(f"checkpoint is for method {meta.get('method')!r}, not panet", path)
        state = obj.get("state_dict")
        if not isinstance(state, dict):
            raise CheckpointError("fss checkpoint without a state_dict", path)
        model = PANet(width=float(meta.get("width", 1.0)), meta=meta)
    else:
        state = encoder_state_from_official(obj, path)
        model = PANet(width=infer_width(state, path), meta={"source": "official PANet snapshot"})
    load_state_strict(model, state, path)
    return model


def load_model(path=None, device=None, impl: str = "auto") -> PANet:
    """A model in eval mode from an official snapshot, an fss checkpoint, a bundle directory written by
    ``fss-export`` (its encoder runs in ONNX Runtime or TensorRT), or (``None``) the demo model.
    """
    path = DEMO_MODEL if path is None else Path(path)
    if path.is_dir():
        from fss.export.backends import load_bundle

        return load_bundle(path, backend="auto", device=device, impl=impl)
    model = model_from_state(read_torch_file(path), path)
    model.impl = impl
    return model.to(device or "cpu").eval()


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_dict(model: PANet, **meta_updates) -> dict:
    meta = {**default_meta(model.encoder.width), **model.meta, **meta_updates}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "meta": meta, "state_dict": state}


def save_checkpoint(model: PANet, path, **meta_updates) -> None:
    """Write ``model`` in fss's format (weights + metadata), atomically."""
    atomic_save(checkpoint_dict(model, **meta_updates), path)


def init_encoder(model: PANet, path) -> None:
    """Start ``model``'s encoder from a file: an fss checkpoint or official snapshot of the same width
    (e.g. a pretrained encoder), or torchvision's ``vgg16-397923af.pth``."""
    obj = read_torch_file(path)
    if (
        isinstance(obj, dict)
        and obj.get("format") == CHECKPOINT_FORMAT
        or any(str(k).startswith(OFFICIAL_PREFIXES) for k in (obj if isinstance(obj, dict) else ()))
    ):
        load_state_strict(model, model_from_state(obj, path).state_dict(), path)
    else:
        load_vgg16_imagenet(model, path)


def load_vgg16_imagenet(model: PANet, path) -> None:
    """Initialise the encoder from torchvision's ``vgg16-397923af.pth``: its first 26 tensors, in order."""
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError("not a torchvision VGG16 state dict", path)
    tensors = list(state.values())[:26]
    params = [p for conv in model.encoder.convs() for p in (conv.weight, conv.bias)]
    if len(tensors) < len(params):
        raise CheckpointError(f"VGG16 file has {len(tensors)} tensors, need {len(params)}", path)
    names = list(state)[:26]
    with torch.no_grad():
        for name, src, dst in zip(names, tensors, params, strict=True):
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError(
                    f"VGG16 tensor {name} has shape {tuple(src.shape)}, encoder expects {tuple(dst.shape)} "
                    f"(ImageNet weights fit width 1.0 only)",
                    path,
                )
            dst.copy_(src)
