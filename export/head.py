"""A learned relation head in a bundle (e.g. SST's): its query path as verified ONNX, its weights.

``head.onnx`` maps ``features`` (``M x E x h x w``, the encoder's output) and ``descriptors`` (``M x C``) to
``logits`` (``M x 2 x h x w``): embedding, late fusion with the tiled descriptor, decoder. It is what every
streamed query pays. The support side (self-segmentation and the inner gradient step) needs autograd, so
it runs in PyTorch from ``head.pt`` (the head's state dict, read with ``weights_only=True``); it runs once
per support set.
"""

import warnings
from pathlib import Path

import torch
from torch import nn

from fss.backends.bundle_model import HEAD_INPUT_NAMES, HEAD_OUTPUT_NAME, OnnxRuntimeHead
from fss.export import verify
from fss.export.onnx import BATCH_AXIS, quiet_exporter
from fss.export.verify import VerificationError

HEAD_ONNX = "head.onnx"
HEAD_WEIGHTS = "head.pt"


class QueryPath(nn.Module):
    """``M x E x h x w`` encoder features, ``M x C`` descriptors -> ``M x 2 x h x w`` logits."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        return self.head.relate(self.head.embed(features), descriptors)


def sample_descriptors(model, features: torch.Tensor) -> torch.Tensor:
    """Realistic descriptors for verification: each feature map's embedding pooled over a central box."""
    with torch.inference_mode():
        embedded = model.head.embed(features)
        h, w = embedded.shape[-2:]
        return embedded[:, :, h // 4 : h - h // 4, w // 4 : w - w // 4].mean(dim=(2, 3))


def export_head(model, staging: Path, references: dict, opset: int, log) -> dict:
    """Write ``head.onnx`` and ``head.pt`` into ``staging``; verify the graph with ONNX Runtime (CPU)
    against eager on the encoder's verification features; return the manifest's ``head`` entry."""
    import onnx

    path = staging / HEAD_ONNX
    module = QueryPath(model.head).eval()
    features = next(iter(references.values()))
    example = (
        features[:1].expand(2, -1, -1, -1).contiguous(),
        sample_descriptors(model, features[:1]).expand(2, -1),
    )
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    log(f"exporting the head ({type(model.head).__name__}) as {HEAD_ONNX}")
    with quiet_exporter(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name")  # both inputs share the batch axis
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            dynamic_shapes=({0: batch}, {0: batch}),
            input_names=list(HEAD_INPUT_NAMES),
            output_names=[HEAD_OUTPUT_NAME],
            opset_version=opset,
            verbose=False,
        )
        program.save(str(path), external_data=True)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"onnx.checker rejects the head: {str(exc).splitlines()[0]}", path) from None
    torch.save(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, staging / HEAD_WEIGHTS
    )
    log(f"verifying {HEAD_ONNX} with ONNX Runtime (CPU) on {', '.join(references)} features")
    runner = OnnxRuntimeHead(path, "cpu")
    per_input = {}
    for name, feats in references.items():
        desc = sample_descriptors(model, feats)
        with torch.inference_mode():
            expected = module(feats, desc)
        per_input[name] = {"batch": len(feats), **verify.feature_errors(runner.relate(feats, desc), expected)}
    worst = max(entry["relative_error"] for entry in per_input.values())
    tolerance = verify.TOLERANCE["float32"]
    if not worst <= tolerance:
        raise VerificationError(
            f"ONNX Runtime head logits differ from eager PyTorch: relative error {worst:.2e} > tolerance "
            f"{tolerance:.0e}; bundle refused"
        )
    return {
        "file": HEAD_ONNX,
        "weights": HEAD_WEIGHTS,
        "inputs": list(HEAD_INPUT_NAMES),
        "output": HEAD_OUTPUT_NAME,
        "verification": {
            "onnxruntime": {"tolerance": tolerance, "max_relative_error": worst, "inputs": per_input}
        },
    }
