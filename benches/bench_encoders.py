"""The encoder choice on a CPU, and the bundled model's per-query time (issue #9).

1. Every registered encoder at the bundled model's input size, one image, eager torch and ONNX Runtime
   (weights random: latency does not depend on their values).
2. The bundled model through ``Segmenter`` (1-way 1-shot support registered once, 8 real example
   queries per round): per-query time with the torch encoder and with its ONNX Runtime bundle.

Run: ``pytest benches/bench_encoders.py --benchmark-only``; results in docs/performance.md.
"""

from pathlib import Path

import pytest
import torch
from timing import QUICK

import fss
import fss.io.images
from fss.backends.bundle_model import load_bundle
from fss.backends.sessions import TorchEncoder
from fss.export.build import export_bundle
from fss.models.encoders import encoder_names

ROUNDS = 5
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def size():
    return 65 if QUICK else int(fss.load_model(None).meta["input_size"])


@pytest.fixture(scope="module", params=encoder_names())
def exported(request, size, tmp_path_factory):
    """(torch encoder, ONNX Runtime encoder) of one registered encoder at full width."""
    torch.manual_seed(0)
    model = fss.PANet(encoder=request.param, meta={"input_size": size}).eval()
    root = tmp_path_factory.mktemp(request.param)
    fss.save_checkpoint(model, root / "model.pt")
    out, _ = export_bundle(root / "model.pt", root / "bundle")
    return TorchEncoder(model).encode, load_bundle(out, backend="onnxruntime", device="cpu").encode


@pytest.mark.benchmark(group="encoder-cpu-demo-size-batch1")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_encoder(benchmark, exported, backend, size):
    encode = exported[0 if backend == "torch" else 1]
    images = torch.randn(1, 3, size, size)
    features = benchmark.pedantic(lambda: encode(images), rounds=ROUNDS, warmup_rounds=1)
    assert features.shape[-1] == -(-size // 8)


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    from fss.checkpoint import DEMO_MODEL

    out, _ = export_bundle(DEMO_MODEL, tmp_path_factory.mktemp("demo") / "bundle")
    return out


def example_segmenter(source):
    seg = fss.Segmenter(source)
    support = EXAMPLES / "support" / "bus"
    image = sorted(support.glob("*.jpg"))[0]
    seg.set_support([[image]], [[image.with_suffix(".png")]], ["bus"])
    return seg


@pytest.mark.benchmark(group="demo-model-per-8-queries")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_demo_model_queries(benchmark, backend, demo_bundle):
    seg = example_segmenter(None if backend == "torch" else demo_bundle)
    queries = [fss.io.images.read_image(p) for p in sorted((EXAMPLES / "query").glob("*.jpg"))]
    queries = (queries * 3)[:8]
    labels = benchmark.pedantic(lambda: seg.segment(queries), rounds=ROUNDS, warmup_rounds=1)
    assert len(labels) == 8
