"""Does an exported encoder compute what eager PyTorch computes? Inputs, error measure, tolerances.

The reference is the checkpoint's encoder in eager PyTorch, float32, on the CPU (the exact numbers).
Error measure, per input batch: ``relative_error = max|exported - eager| / max|eager|``: the worst
deviation relative to the feature scale. Features have no fixed scale across checkpoints and the head
compares them by cosine, so a scale-relative bound is the meaningful one.

Tolerances (:data:`TOLERANCE`), by the precision the exported encoder computes in:
- float32: 1e-4. ONNX Runtime on CPU measures ~3e-6 at full width (docs/performance.md); a float32
  TensorRT engine is built with TF32 off, so it should be as close.
- float16: 2e-2. Rounding to fp16 through the 13 convs measures ~1e-3 in torch; the margin covers fp16
  accumulation in TensorRT kernels. A wrong weight or layout gives errors of order 1.
- int8 (opt-in, ``fss.export.quantize``): 0.5 on the smooth and real images (noise lies outside the
  calibrated ranges), a bound that only catches a broken graph; a working static quantisation of the
  bundled model measures 0.13-0.18 there; it is reported, not promised (mask agreement and held-out
  mean-IoU: docs/performance.md).
"""

import torch

from fss.constants import PAPER_NORMALISATION
from fss.errors import FssError

TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "int8": 0.5}
REFERENCE = "eager PyTorch, float32, CPU"
BATCH = 4  # images per encoder call: real-image sets can be long, activations at 417x417 are not small


class VerificationError(FssError):
    """The export ran but its result is refused (``fss-export`` exits 1 and writes nothing)."""


def smooth_images(
    count: int, size: int, generator: torch.Generator, normalisation: dict = PAPER_NORMALISATION
) -> torch.Tensor:
    """Normalised images with the low-frequency structure of photographs (white noise has none)."""
    coarse = torch.rand(count, 3, max(2, size // 16), max(2, size // 16), generator=generator)
    pixels = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(normalisation["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(normalisation["std"]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def verification_inputs(
    size: int, normalisation: dict, image_paths=(), seed: int = 0
) -> dict[str, torch.Tensor]:
    """Named ``M x 3 x size x size`` batches: Gaussian noise (batch 2, so the batch axis is exercised),
    a smooth synthetic image, and the real images given (resized and normalised as the runtime does,
    with the model's ``normalisation``)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "random": torch.randn(2, 3, size, size, generator=generator),
        "smooth": smooth_images(1, size, generator, normalisation),
    }
    if image_paths:
        from fss.io.images import read_image
        from fss.io.tensors import image_tensor

        images = [image_tensor(read_image(path), size, normalisation) for path in image_paths]
        inputs["images"] = torch.stack(images)
    return inputs


def encode_in_batches(encode, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([encode(images[i : i + BATCH]).cpu() for i in range(0, len(images), BATCH)])


def feature_errors(features: torch.Tensor, reference: torch.Tensor) -> dict:
    max_abs = (features.float() - reference).abs().max().item()
    scale = reference.abs().max().item()
    return {"max_abs_error": max_abs, "feature_scale": scale, "relative_error": max_abs / max(scale, 1e-30)}


def verify_encoder(name: str, encode, inputs: dict, references: dict, precision: str = "float32") -> dict:
    """Run ``encode`` on every input, compare with the eager references; refuse above tolerance.

    Returns the report stored in the manifest: the tolerance, the worst relative error, and per input
    its batch size and errors. Raises ``VerificationError`` naming the worst input otherwise.
    """
    tolerance = TOLERANCE[precision]
    per_input = {}
    for input_name, images in inputs.items():
        features = encode_in_batches(encode, images)
        if features.shape != references[input_name].shape:
            raise VerificationError(
                f"{name} features have shape {tuple(features.shape)}, eager PyTorch "
                f"{tuple(references[input_name].shape)}"
            )
        per_input[input_name] = {"batch": len(images), **feature_errors(features, references[input_name])}
    worst_input = max(per_input, key=lambda key: per_input[key]["relative_error"])
    worst = per_input[worst_input]["relative_error"]
    if not worst <= tolerance:  # NaN fails too
        raise VerificationError(
            f"{name} features differ from eager PyTorch: relative error {worst:.2e} > tolerance "
            f"{tolerance:.0e} ({worst_input} input); bundle refused"
        )
    return {"precision": precision, "tolerance": tolerance, "max_relative_error": worst, "inputs": per_input}
