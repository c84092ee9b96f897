"""How the runtime calls a model's encoder: precision, memory layout, pinned staging, optional CUDA graph.

(Which encoders exist is the registry's business: :mod:`fss.models.encoders`.)
"""

import torch

from fss.errors import SettingError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_encoder(
    model, device: torch.device, batch: int, size: int, precision: str, channels_last: bool, cuda_graph: bool
):
    """``M x 3 x S x S`` normalised (host or device) -> ``M x C x h x w`` fp32 features on ``device``."""
    check_encoder_settings(model, device, precision, cuda_graph)
    dtype = PRECISIONS[precision]
    if getattr(model, "backend", "torch") != "torch":
        return lambda x: model.encode(x).float()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)

    def encode(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model.encode(x).float()

    if device.type != "cuda":
        return encode
    staged = pinned_staging(encode, batch, size)
    return CudaGraphEncoder(staged, batch, size, device) if cuda_graph else staged


def check_encoder_settings(model, device: torch.device, precision: str, cuda_graph: bool) -> None:
    """A ``SettingError`` for settings :func:`make_encoder` cannot honour (callers check first)."""
    if precision not in PRECISIONS:
        raise SettingError(
            "{precision} must be one of {known}, got {value!r}", known=sorted(PRECISIONS), value=precision
        )
    if PRECISIONS[precision] == torch.float16 and device.type != "cuda":
        raise SettingError("{precision} fp16 needs CUDA; use fp32 (or bf16) on the CPU")
    if getattr(model, "backend", "torch") != "torch" and (precision != "fp32" or cuda_graph):
        # An exported bundle: precision and layout were fixed at export, and ONNX Runtime / TensorRT
        # cannot be captured in a torch CUDA graph.
        raise SettingError(
            "{precision} and {cuda_graph} apply to torch models; a bundle's precision is set at export"
        )


def pinned_staging(encode, batch: int, size: int):
    """Host batches go through one pinned buffer (allocated once) for asynchronous copies."""
    buffer = torch.empty(batch, 3, size, size).pin_memory()

    def staged(x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            buffer[: len(x)].copy_(x)
            x = buffer[: len(x)]
        return encode(x)

    return staged


class CudaGraphEncoder:
    """The encoder captured once at ``batch x 3 x size x size``; partial batches are padded.

    Unverified on this project's machines (no GPU in CI): see docs/performance.md.
    """

    def __init__(self, encode, batch: int, size: int, device: torch.device):
        self.static_in = torch.zeros(batch, 3, size, size, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (cuDNN autotuning, allocator) outside the capture
                encode(self.static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = encode(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        self.static_in[:n].copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_out[:n].clone()
