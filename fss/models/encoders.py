"""The encoder registry: one entry per encoder, keyed by the name a checkpoint stores in ``meta["encoder"]``.

An entry owns everything callers need to know about its encoder: construction (name, width), the width
a state dict implies, the normalisation its weights expect, its pretrained initialisations, foreign
checkpoint layouts it can read, and the ONNX ops its exported graph may contain. ``load_model``,
``fss-train``, ``fss-eval``, ``fss-export``, the runtime and bundles all go through :func:`get_encoder`.

Adding an encoder: one module that calls :func:`register`, named in ``ENCODER_MODULES``.

Every encoder module maps ``M x 3 x S x S`` normalised images to ``M x C x h x w`` features with
``h = ceil(S / 8)`` and has ``out_channels``, ``feature_size(S)`` and ``stages()`` (its parameter
groups from input to output, for ``fss-train --freeze-stages``).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fss.errors import CheckpointError, FssError
from fss.models.registry import Registry

ENCODER_MODULES = ("fss.models.vgg", "fss.models.efficientnet_lite")
# The paper's encoder: the default of fss-train, and the encoder of checkpoints written before the registry.
DEFAULT_ENCODER = "vgg16-dilated"
OUR_PREFIX = "encoder."  # encoder parameters inside a model's state dict


@dataclass(frozen=True)
class Encoder:
    """What the rest of fss knows about one encoder.

    Attributes:
        name: the registry key (``meta["encoder"]``).
        build: ``width -> nn.Module``; raises ``ValueError`` for a width the encoder does not have.
        normalisation: ``{"mean": [r, g, b], "std": [r, g, b]}`` applied to RGB in [0, 1]: what its
            pretrained weights expect; a checkpoint's own ``meta["normalisation"]`` wins over it.
        width_of: encoder state dict (keys without ``encoder.``) -> width; raises ``CheckpointError``.
        init: ``(module, path) -> meta updates``: start the module from a pretrained file of a layout
            the entry knows (raises ``CheckpointError`` otherwise); returns e.g. the normalisation the
            file's weights expect.
        default_init: ``() -> Path`` of the pretrained weights ``--init auto`` means (raises ``FssError``
            with the install hint when they are not installed), or None when there are none.
        foreign: ``(state, path) -> encoder state (our keys) | None``: a whole checkpoint of a foreign
            layout (e.g. the official PANet snapshot) that this entry recognises, None for any other.
        onnx_ops: the ONNX op types its exported graph may contain.
    """

    name: str
    build: Callable[[float], nn.Module]
    normalisation: dict
    width_of: Callable[[dict, Path | None], float]
    init: Callable[[nn.Module, Path], dict]
    default_init: Callable[[], Path] | None = None
    foreign: Callable[[dict, Path | None], dict | None] = field(default=lambda state, path: None)
    onnx_ops: frozenset = frozenset()


_REGISTRY = Registry("encoder", ENCODER_MODULES)
register = _REGISTRY.register
encoder_names = _REGISTRY.names


def get_encoder(name: str, path=None) -> Encoder:
    """The entry called ``name``; an unknown name is a one-line error naming the known ones."""
    return _REGISTRY.get(name, path)


def build_encoder(name: str, width: float, path=None) -> nn.Module:
    try:
        return get_encoder(name, path).build(float(width))
    except ValueError as exc:
        raise CheckpointError(str(exc), path) if path is not None else FssError(str(exc)) from None


def foreign_encoder_state(state: dict, path=None) -> tuple[str, dict] | None:
    """(encoder name, encoder state) of a checkpoint in a layout some entry recognises, else None."""
    _REGISTRY.load_all()
    for entry in _REGISTRY.entries.values():
        converted = entry.foreign(state, path)
        if converted is not None:
            return entry.name, converted
    return None


def encoder_state(state: dict) -> dict:
    """A model state dict's encoder part, keys without the ``encoder.`` prefix."""
    return {k[len(OUR_PREFIX) :]: v for k, v in state.items() if k.startswith(OUR_PREFIX)}


def copy_tensors(module: nn.Module, tensors: dict, path, what: str) -> None:
    """Copy ``tensors`` (module keys -> tensors) into ``module``, which must have each with that shape."""
    own = module.state_dict()
    for key, value in tensors.items():
        if key not in own:
            raise CheckpointError(f"{what}: {key} is not a parameter of the encoder", path)
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{what}: {key} has shape {tuple(value.shape)}, the encoder expects {tuple(own[key].shape)}",
                path,
            )
    missing = [k for k in own if k not in tensors]
    if missing:
        raise CheckpointError(f"{what}: missing {', '.join(missing[:4])}", path)
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
