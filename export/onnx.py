"""The encoder as an ONNX graph (``torch.onnx.export``, dynamo exporter), and the checks on that graph.

The graph takes ``images`` (``batch x 3 x S x S`` float32, normalised) and returns ``features``
(``batch x C x h x w`` float32); only the batch axis is dynamic. The prototype / matching head is not
exported: it depends on the support set and runs in fss's kernels on top of any encoder backend.
"""

import contextlib
import copy
import importlib.util
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from fss.errors import FssError
from fss.export.verify import VerificationError

INPUT_NAME = "images"
OUTPUT_NAME = "features"
DEFAULT_OPSET = 18  # the dynamo exporter's native floor; TensorRT 8.6+ and ONNX Runtime 1.14+ read it
BATCH_AXIS = "batch"
# Beside the ops of the encoder's registry entry: Cast appears in the float16 graph built for TensorRT.
EXTRA_OPS = frozenset({"Cast"})


def require_onnx_tools() -> None:
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not importlib.util.find_spec(name)]
    if missing:
        raise FssError(f"exporting needs {', '.join(missing)}: pip install 'fss[onnx]'")


class Float16Encoder(nn.Module):
    """float32 in and out, float16 inside: the graph a float16 TensorRT engine is built from.

    TensorRT 10.12+ deprecates (and 11 removes) the FP16 builder flag; precision now lives in the graph.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).half()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images.half()).float()


@contextlib.contextmanager
def quiet_exporter():
    """Keep the exporter's progress notes and third-party deprecation noise off the user's terminal."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(
    encoder: nn.Module, path: Path, size: int, ops, opset: int = DEFAULT_OPSET, float16=False
) -> dict:
    """Write ``encoder`` (eval mode, CPU) to ``path`` (+ ``path.data``), then check the graph against
    ``ops``, the op types its registry entry allows.

    Returns :func:`check_graph`'s description. ``float16`` exports :class:`Float16Encoder` instead.
    """
    module = Float16Encoder(encoder).eval() if float16 else encoder
    example = torch.randn(2, 3, size, size)  # batch 2: torch.export specialises a batch of 1
    with quiet_exporter():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS, min=1)},),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            verbose=False,
        )
        program.save(str(path), external_data=True)
    graph = check_graph(path, ops)
    if graph["opset"] != opset:  # the exporter falls back silently when it cannot convert
        raise FssError(f"the ONNX exporter cannot write opset {opset} (it wrote opset {graph['opset']})")
    return graph


def tensor_shape(value_info) -> list:
    return [dim.dim_param or dim.dim_value for dim in value_info.type.tensor_type.shape.dim]


def check_graph(path: Path, allowed_ops) -> dict:
    """``onnx.checker`` (with shape inference) plus what TensorRT's ONNX parser and the runtime rely on.

    One input and one output, named as above, standard-domain operators of ``allowed_ops`` (the
    encoder's registry entry), a symbolic batch axis (and no other). Returns opset, operators, shapes and
    dynamic axes for the manifest; raises ``VerificationError`` otherwise.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"onnx.checker rejects the graph: {str(exc).splitlines()[0]}", path) from None
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    ops = sorted({(node.domain or "ai.onnx", node.op_type) for node in graph.node})
    unexpected = [
        f"{domain}::{op}" for domain, op in ops if domain != "ai.onnx" or op not in allowed_ops | EXTRA_OPS
    ]
    if unexpected:
        raise VerificationError(f"unexpected operators in the encoder graph: {', '.join(unexpected)}", path)
    if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise VerificationError(f"graph must map {INPUT_NAME!r} to {OUTPUT_NAME!r}", path)
    shapes = {value.name: tensor_shape(value) for value in (graph.input[0], graph.output[0])}
    dynamic_axes = {
        name: {str(axis): dim for axis, dim in enumerate(shape) if isinstance(dim, str)}
        for name, shape in shapes.items()
    }
    if any(axes != {"0": BATCH_AXIS} for axes in dynamic_axes.values()):
        raise VerificationError(f"only the batch axis may be dynamic, got {dynamic_axes}", path)
    return {"opset": opset, "ops": [op for _, op in ops], "shapes": shapes, "dynamic_axes": dynamic_axes}
