"""What runs the predictor's encoder: the device, the encoder path (torch or a verified ONNX Runtime
graph, :mod:`fss.runtime.encoder_path`) and how it is called (:mod:`fss.runtime.encoder_call`), chosen by
one factory, :func:`build_backend`."""

from dataclasses import dataclass

import torch

from fss.errors import SettingError
from fss.runtime.encoder_call import make_encoder
from fss.runtime.encoder_path import choose_encoder_path


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("{device} cuda asked for, but torch sees no CUDA device")
    return device


@dataclass
class EncoderBackend:
    """``model``: what runs the encoder (the torch model, or a bundle around its exported graph);
    ``name`` / ``reason``: which backend and one line saying why; ``encode_batch``: one batch of
    ``M x 3 x S x S`` normalised images -> ``M x C x h x w`` fp32 features on the device."""

    model: object
    name: str
    reason: str
    encode_batch: object
    batch: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``M x 3 x S x S`` normalised images -> ``M x C x h x w`` fp32 features, ``batch`` at a time."""
        with torch.inference_mode():
            return torch.cat(
                [self.encode_batch(images[i : i + self.batch]) for i in range(0, len(images), self.batch)]
            )


def build_backend(
    model,
    device: torch.device,
    size: int,
    batch: int,
    precision: str = "fp32",
    channels_last: bool = True,
    cuda_graph: bool = False,
    backend: str = "auto",
    adapting: bool = False,
    expected_images: int | None = None,
    continuing: str | None = None,
) -> EncoderBackend:
    """The encoder backend of a loaded model on ``device`` (the arguments are :class:`Segmenter`'s)."""
    if precision == "fp32":
        path = choose_encoder_path(
            model, device, size, backend, adapting, images=expected_images, continuing=continuing
        )
        model, name, reason = path.model, path.backend, path.reason
    elif backend == "onnxruntime":
        raise SettingError(
            "{backend} onnxruntime runs the encoder in float32; {precision} {value} runs in torch",
            value=precision,
        )
    else:
        name, reason = "torch", f"torch ({precision})"
    encode_batch = make_encoder(model, device, batch, size, precision, channels_last, cuda_graph)
    return EncoderBackend(model, name, reason, encode_batch, batch)
