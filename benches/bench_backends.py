"""Encoder latency per image at 417 x 417: eager torch against the exported bundle (issue #4).

Full-width VGG16-dilated with random weights (latency does not depend on their values), batch 1,
input already on the encoder's device. CPU: torch (eager, float32) vs ONNX Runtime (CPU execution
provider). GPU cases run only where CUDA is present: torch float32 / float16 (autocast, as the
runtime does) / torch.compile, ONNX Runtime CUDA (onnxruntime-gpu, IO binding), TensorRT float16.
Run: ``pytest benches/bench_backends.py --benchmark-only``; results in docs/performance.md.
"""

import copy

import pytest
import torch
from timing import QUICK

import fss
from fss.backends.bundle_model import load_bundle
from fss.backends.sessions import TorchEncoder, onnxruntime_has_cuda, tensorrt_missing
from fss.export.build import export_bundle

SIZE, WIDTH = (65, 0.125) if QUICK else (417, 1.0)
ROUNDS = 5
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fss.PANet(width=WIDTH, meta={"input_size": SIZE}).eval()


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-backends")
    fss.save_checkpoint(model, root / "vgg16.pt")
    with_engine = tensorrt_missing("--trt") is None
    out, _ = export_bundle(root / "vgg16.pt", root / "bundle", trt=with_engine, fp16=True, max_batch=1)
    return out


def measure(benchmark, encode, device="cpu"):
    images = torch.randn(1, 3, SIZE, SIZE, device=device)

    def run():
        features = encode(images)
        if features.is_cuda:
            torch.cuda.synchronize()
        return features

    features = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    assert features.shape == (1, int(512 * WIDTH), -(-SIZE // 8), -(-SIZE // 8))


@pytest.mark.benchmark(group="encoder-cpu-417-batch1")
def test_torch_cpu(benchmark, model):
    measure(benchmark, TorchEncoder(model).encode)


@pytest.mark.benchmark(group="encoder-cpu-417-batch1")
def test_onnxruntime_cpu(benchmark, bundle):
    measure(benchmark, load_bundle(bundle, backend="onnxruntime", device="cpu").encode)


@pytest.fixture(scope="module")
def cuda_model(model):
    return copy.deepcopy(model).cuda()


@needs_cuda
@pytest.mark.benchmark(group="encoder-cuda-417-batch1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_cuda(benchmark, cuda_model, dtype):
    def encode(images):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            return cuda_model.encode(images).float()

    measure(benchmark, encode, "cuda")


@needs_cuda
@pytest.mark.benchmark(group="encoder-cuda-417-batch1")
def test_torch_compile_cuda(benchmark, cuda_model):
    compiled = torch.compile(cuda_model.encoder)

    def encode(images):
        with torch.inference_mode():
            return compiled(images)

    measure(benchmark, encode, "cuda")


@needs_cuda
@pytest.mark.benchmark(group="encoder-cuda-417-batch1")
def test_onnxruntime_cuda(benchmark, bundle):
    if not onnxruntime_has_cuda():
        pytest.skip("needs onnxruntime-gpu")
    measure(benchmark, load_bundle(bundle, backend="onnxruntime", device="cuda").encode, "cuda")


@needs_cuda
@pytest.mark.benchmark(group="encoder-cuda-417-batch1")
def test_tensorrt_fp16(benchmark, bundle):
    if tensorrt_missing("TensorRT") is not None:
        pytest.skip("needs TensorRT")
    measure(benchmark, load_bundle(bundle, backend="tensorrt").encode, "cuda")
