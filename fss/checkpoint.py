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

from fss.errors import CheckpointError, SettingError
from fss.io.outputs import atomic_write
from fss.models.base import DEFAULT_METHOD, FewShotModel, build_model, default_meta, get_method, method_of
from fss.models.encoders import DEFAULT_ENCODER, OUR_PREFIX, encoder_state, foreign_encoder_state, get_encoder
from fss.validation import check_checkpoint, read_torch_file

CHECKPOINT_FORMAT = "fss-checkpoint"
CHECKPOINT_VERSION = 1
DEMO_MODEL = Path(__file__).parent / "assets" / "demo-panet.pt"
PRETRAINED_ONLY_SUFFIXES = (".h5", ".whl")  # never torch files: straight to the encoder's own reader


def load_state_strict(model: FewShotModel, state: dict, path) -> None:
    """Load with a one-line error naming missing / unexpected keys or the first shape mismatch."""
    expected = model.state_dict()
    target = model.name if isinstance(model, FewShotModel) else type(model).__name__  # a model, or a trunk
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
        raise CheckpointError(f"checkpoint does not fit {target}: " + "; ".join(parts), path)
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"checkpoint does not fit {target}: {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(value.shape)}",
                path,
            )
    model.load_state_dict(state)


def model_from_state(obj, path) -> FewShotModel:
    check_checkpoint(obj, path, CHECKPOINT_FORMAT)
    if not isinstance(obj, dict):
        raise CheckpointError(f"not a PANet/fss checkpoint: holds a {type(obj).__name__}, not a dict", path)
    if obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"unsupported fss checkpoint version {obj.get('version')!r}", path)
        meta = obj.get("meta", {})
        method = get_method(meta.get("method", DEFAULT_METHOD), path)  # unknown: one line naming the known
        state = obj.get("state_dict")
        if not isinstance(state, dict):
            raise CheckpointError("fss checkpoint without a state_dict", path)
        encoder = meta.get("encoder", DEFAULT_ENCODER)  # fss checkpoints before the registry: VGG
        width = meta.get("width") or get_encoder(encoder, path).width_of(encoder_state(state), path)
    else:
        found = foreign_encoder_state(obj, path)
        if found is None:
            sample = ", ".join(sorted(map(str, obj))[:3]) or "none"
            raise CheckpointError(f"not a PANet/fss checkpoint: no encoder tensors (keys: {sample})", path)
        encoder, encoder_tensors = found
        state = {OUR_PREFIX + k: v for k, v in encoder_tensors.items()}
        width = get_encoder(encoder, path).width_of(encoder_tensors, path)
        meta = {"source": "official PANet snapshot"}
        method = get_method(DEFAULT_METHOD)
    model = build_model(method.name, encoder, width, meta, path=path)
    load_state_strict(model, state, path)
    return model


def load_model(path=None, device=None, impl: str = "auto") -> FewShotModel:
    """A model in eval mode from an official snapshot, an fss checkpoint, a bundle directory written by
    ``fss-export`` (its encoder runs in ONNX Runtime or TensorRT), or (``None``) the demo model.
    """
    path = DEMO_MODEL if path is None else Path(path)
    if path.is_dir():
        from fss.backends.bundle_model import load_bundle

        return load_bundle(path, backend="auto", device=device, impl=impl)
    model = model_from_state(read_torch_file(path), path)
    model.impl = impl
    return model.to(device or "cpu").eval()


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_dict(model: FewShotModel, **meta_updates) -> dict:
    defaults = default_meta(model.encoder.width, model.meta["encoder"], model.meta["method"])
    meta = {**defaults, **model.meta, **meta_updates}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "meta": meta, "state_dict": state}


def save_checkpoint(model: FewShotModel, path, **meta_updates) -> None:
    """Write ``model`` in fss's format (weights + metadata), atomically."""
    atomic_save(checkpoint_dict(model, **meta_updates), path)


def init_encoder(model: FewShotModel, path) -> None:
    """Start ``model``'s encoder from a file: an fss checkpoint or official snapshot of the same encoder
    and width, or a pretrained file its registry entry knows (torchvision's or HED's VGG16, the
    EfficientNet-Lite ImageNet weights, ...). ``"auto"`` means the entry's default pretrained weights.
    The normalisation the weights expect becomes the model's."""
    entry = get_encoder(model.meta["encoder"])
    if str(path) == "auto":
        if entry.default_init is None:
            raise SettingError("{init} auto: no pretrained weights are known for {name}", name=entry.name)
        path = entry.default_init()
    path = Path(path)
    if path.suffix not in PRETRAINED_ONLY_SUFFIXES:
        obj = read_torch_file(path)
        if isinstance(obj, dict) and (
            obj.get("format") == CHECKPOINT_FORMAT or foreign_encoder_state(obj, path) is not None
        ):
            source = model_from_state(obj, path)
            if source.meta["encoder"] != entry.name:
                raise CheckpointError(
                    f"checkpoint has encoder {source.meta['encoder']}, the model {entry.name}", path
                )
            if method_of(source) is method_of(model):  # the whole model too, but a decision head:
                state = source.state_dict()  # that one is learned anew on the tuned encoder
                load_state_strict(
                    model, {k: v for k, v in state.items() if not k.startswith("decision_head.")}, path
                )
            else:  # another method's model (a PANet for an SST): its query trunk starts every trunk
                for trunk in model.trunks():
                    load_state_strict(trunk, source.trunks()[0].state_dict(), path)
            model.meta["normalisation"] = source.meta["normalisation"]
            return
    first, *others = model.trunks()
    model.meta.update(entry.init(first, path))
    for trunk in others:  # e.g. OSLSM's conditioning trunk
        entry.init(trunk, path)
