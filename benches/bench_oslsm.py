"""OSLSM's head: fss.kernels.logistic.segment against the official pipeline (per-shot deconvolution).

Official geometry (the paper's test query): D = 4096 fc7 features at 18 x 18 -> 500 x 500, 1 way,
K = 1 and 5 shots. "official" is what the Caffe net computes per shot (the 1x1 product, the fixed
bilinear deconvolution, kernel 64 / stride 32, the crop), then the OR of the K thresholded masks;
``torch`` is fss's reference (four gathered taps per pixel), ``auto`` the CPU fast path (separable
upsampling as two GEMMs per map). The stride-8 variant (D = 512, 41 x 41 -> 321) beside it.
GPU (Triton) cases skip without CUDA. Run: ``pytest benches/bench_oslsm.py --benchmark-only``.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timing import synced

from fss.kernels.logistic import segment

has_cuda = torch.cuda.is_available()
SHOTS = pytest.mark.parametrize("shots", [1, 5])
CASES = {"official": (4096, 18, 500, (32.0, 8.5, 500, 500)), "stride8": (512, 41, 321, None)}


def head_inputs(case, shots, device="cpu"):
    D, h, _, _ = CASES[case]
    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(1, 1, D, h, h, generator=gen)  # fc7 after ReLU
    weights = torch.randn(1, 1, shots, D + 1, generator=gen) / D**0.5
    return feats.to(device), weights.to(device)


def deconv_kernel(device) -> torch.Tensor:
    og = torch.arange(64, dtype=torch.float32, device=device)
    filt = 1 - (og - 31.5).abs() / 32
    return (filt[:, None] * filt[None, :])[None, None]


def official_segment(feats, weights):
    """Per shot: 1x1 product, deconvolution + crop, threshold; the K masks OR-ed."""
    kernel = deconv_kernel(feats.device)
    masks = []
    for k in range(weights.shape[2]):
        w = weights[0, 0, k]
        low = F.conv2d(feats[0], w[:-1].view(1, -1, 1, 1), w[-1:])  # Q x 1 x h x w
        up = F.conv_transpose2d(low, kernel, stride=32)[:, 0, 40:540, 40:540]
        masks.append(up > 0)
    return torch.stack(masks).any(dim=0)


def bench(benchmark, case, shots, device, fn):
    D, h, size, _ = CASES[case]
    benchmark.group = f"oslsm head {case} 1-way {shots}-shot D={D} {h}->{size} ({device.upper()})"
    with torch.no_grad():
        return benchmark(synced(fn), *head_inputs(case, shots, device))


@SHOTS
def test_official_pipeline_cpu(benchmark, shots):
    bench(benchmark, "official", shots, "cpu", official_segment)


@SHOTS
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_segment_cpu(benchmark, case, shots, impl):
    _, _, size, geometry = CASES[case]
    labels = bench(benchmark, case, shots, "cpu", lambda f, w: segment(f, w, size, geometry, impl=impl))
    if case == "official":
        expected = official_segment(*head_inputs(case, shots))
        assert (labels[0].bool() != expected).float().mean() <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs CUDA")
@SHOTS
@pytest.mark.parametrize("impl", ["triton", "native"])
def test_segment_cuda(benchmark, shots, impl):
    _, _, size, geometry = CASES["official"]
    bench(benchmark, "official", shots, "cuda", lambda f, w: segment(f, w, size, geometry, impl=impl))


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LITE0_METHODS = pytest.mark.parametrize("method", ["panet", "oslsm"])
ENCODER_PATHS = pytest.mark.parametrize("backend", ["auto", "torch"])


def lite0_segmenter(benchmark, method, backend):
    """The bundled PANet, or an OSLSM of the same encoder and size (random weights: the cost is the same);
    the encoder path that ``backend`` chose is recorded with the timing."""
    import fss
    from fss.models.base import build_model
    from fss.runtime.segmenter import Segmenter

    model = fss.load_model(None)
    if method == "oslsm":
        meta = {"input_size": model.meta["input_size"]}
        torch.manual_seed(0)  # the same weights in every case: `auto` exports and verifies them once
        model = build_model("oslsm", "efficientnet-lite0", 1.0, meta).eval()
    seg = Segmenter(model, device="cpu", batch=1, backend=backend)
    benchmark.extra_info["encoder path"] = seg.backend
    return seg


def example_shots(shots):
    """``shots`` (photo, mask) paths of the bundled examples (bus and pizza; repeated past four)."""
    photos = sorted((EXAMPLES / "support").glob("*/*.jpg"))
    picked = [photos[i % len(photos)] for i in range(shots)]
    return picked, [p.with_suffix(".png") for p in picked]


@LITE0_METHODS
@ENCODER_PATHS
@SHOTS
def test_query_cost_lite0(benchmark, method, backend, shots):
    """Cost per query through ``Segmenter.segment`` (decode, encode, head) on EfficientNet-Lite0 at 321,
    one support set registered beforehand; ``auto`` is the CPU default (ONNX Runtime encoder)."""
    seg = lite0_segmenter(benchmark, method, backend)
    photos, masks = example_shots(shots)
    seg.set_support([photos], [masks], ["object"])
    query = sorted((EXAMPLES / "query").glob("*.jpg"))[0]
    benchmark.group = f"cost per query, EfficientNet-Lite0 at 321, 1-way {shots}-shot (CPU)"
    benchmark(seg.segment, [query])


@LITE0_METHODS
@ENCODER_PATHS
@SHOTS
def test_set_support_cost_lite0(benchmark, method, backend, shots):
    """Cost of registering a support set (decode, PANet's encoder at 321 or OSLSM's conditioning
    branch at 224 per shot), paid once per support set, not per query."""
    seg = lite0_segmenter(benchmark, method, backend)
    photos, masks = example_shots(shots)
    benchmark.group = f"set_support, EfficientNet-Lite0, 1-way {shots}-shot (CPU)"
    benchmark(seg.set_support, [photos], [masks], ["object"])
