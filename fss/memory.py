"""Will an encoder fit? An estimate of its activation memory, checked before any work starts."""

import resource
from pathlib import Path

import torch

from fss.errors import FssError

PROBE_SIZE = 16  # small: the probe runs the encoder once for real
DEFAULT_BYTES_PER_PIXEL = 2 * 64 * 4  # input + output of a 64-channel float32 layer at full resolution


def available_bytes(device) -> int | None:
    """Memory this process may still take on ``device`` (None where unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = address_space_bytes()
        if used is not None:
            headroom = max(0, soft - used)
            available = headroom if available is None else min(available, headroom)
    return available


def address_space_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bytes_per_input_pixel(model) -> float:
    """Peak activation bytes per input pixel of one image: the largest layer's input + output,
    measured with hooks on one small image (a constant for encoders torch does not run)."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        return DEFAULT_BYTES_PER_PIXEL
    largest = [0]

    def hook(_module, _inputs, output):
        if torch.is_tensor(output):
            largest[0] = max(largest[0], output.numel())

    leaves = [m for m in encoder.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        param = next(encoder.parameters(), None)
        probe = torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=param.device if param is not None else "cpu")
        with torch.inference_mode():
            encoder(probe)
    finally:
        for handle in handles:
            handle.remove()
    return 2 * largest[0] * 4 / PROBE_SIZE**2


def check_encoder_memory(model, size, images: int, device, factor=1.0, hint="the batch", size_name="size"):
    """Refuse (one line) a ``size`` whose encoder activations for ``images`` images at once cannot fit.

    ``factor``: training keeps every activation for the backward pass (about 3x). A model whose encoder
    pads its input (OSLSM's official geometry) says by how much with ``encoder_input_side(size)``.
    """
    side = model.encoder_input_side(size)
    need = factor * images * side * side * bytes_per_input_pixel(model)
    available = available_bytes(device)
    if available is not None and need > available:
        raise FssError(
            f"{size_name} {size} needs about {need / 2**30:.1f} GiB for the encoder ({images} image(s) at "
            "once), "
            f"more than the {available / 2**30:.1f} GiB available: lower {size_name} or {hint}"
        )
