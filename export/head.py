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

from fss.errors import FssError
from fss.export import verify
from fss.export.onnx import BATCH_AXIS, quiet_exporter
from fss.export.verify import VerificationError

HEAD_ONNX = "head.onnx"
HEAD_WEIGHTS = "head.pt"
INPUT_NAMES = ("features", "descriptors")
OUTPUT_NAME = "logits"
HEAD_OPS = frozenset(
    {"Conv", "Relu", "Add", "Concat", "ReduceMean", "Expand", "Shape", "Unsqueeze", "Reshape"}
)


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
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
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
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "verification": {
            "onnxruntime": {"tolerance": tolerance, "max_relative_error": worst, "inputs": per_input}
        },
    }


class OnnxRuntimeHead:
    """The query path of ``head.onnx`` with the head interface the method uses: ``embed`` is the identity
    (the graph embeds), ``relate(features, descriptors)`` runs the graph."""

    def __init__(self, path, device=None):
        from fss.export.backends import import_onnxruntime

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
            for name, t in zip(INPUT_NAMES, (features, descriptors), strict=True)
        }
        (logits,) = self.session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(logits).to(features.device)


def head_graphs(bundle_dir: Path, manifest: dict, device) -> dict:
    """A bundle's learned head as the graphs its method's ``from_graphs`` takes: ``head`` (PyTorch, for
    the support side) and ``query_head`` (ONNX Runtime)."""
    from fss.checkpoint import read_torch_file
    from fss.models.base import build_model

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
