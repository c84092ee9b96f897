"""End-to-end runtime: fss-run (supports encoded once, fused head) against the official-style pipeline.

CPU case (issue #5): 1-way 1-shot, 8 queries, 417 x 417 images, full-width VGG16-dilated encoder.
The official-style pipeline runs one episode per query, re-encodes the support every time and
pools by upsample-then-pool, as the reference implementation does (tests/official_reference.py).
Both read the same image files. Run: ``pytest benches/bench_runtime.py --benchmark-only``.

GPU cases run only where CUDA is present: batch-1 episode latency and cached-support throughput.
"""

import numpy as np
import pytest
import torch
from official_reference import episode_logits, episode_prototypes
from PIL import Image

import fss
from fss.constants import PAPER_NORMALISATION as NORM
from fss.io import image_tensor, mask_tensor, read_image, read_mask
from fss.runtime.cli import main as fss_run

SIZE = 417
QUERIES = 8


@pytest.fixture(scope="module")
def episode_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    (root / "support" / "thing").mkdir(parents=True)
    (root / "query").mkdir()
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(
        root / "support" / "thing" / "s.jpg"
    )
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[100:300, 120:330] = 255
    Image.fromarray(mask).save(root / "support" / "thing" / "s.png")
    for i in range(QUERIES):
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(
            root / "query" / f"q{i}.jpg"
        )
    model = fss.PANet(width=1.0, meta={"input_size": SIZE})
    fss.save_checkpoint(model, root / "vgg16.pt")
    return root


def official_style_pipeline(root, model):
    """One episode per query, support re-encoded, upsample-then-pool prototypes, argmax at 417."""
    support = read_image(root / "support" / "thing" / "s.jpg")
    mask = mask_tensor(read_mask(root / "support" / "thing" / "s.png"), SIZE)
    fg, bg = (mask == 1).float()[None, None], (mask == 0).float()[None, None]
    labels = []
    with torch.no_grad():
        for path in sorted((root / "query").glob("*.jpg")):
            imgs = torch.stack(
                [image_tensor(support, SIZE, NORM), image_tensor(read_image(path), SIZE, NORM)]
            )
            feats = model.encoder(imgs)
            protos = episode_prototypes(feats[:1][None], fg, bg, [1])
            _, up = episode_logits(feats[1:], protos, (SIZE, SIZE))
            labels.append(up.argmax(1)[0].to(torch.uint8).numpy())
    return labels


@pytest.mark.benchmark(group="runtime-cpu-1way1shot-8q-417")
def test_official_style_pipeline(benchmark, episode_files):
    model = fss.load_model(episode_files / "vgg16.pt")
    labels = benchmark.pedantic(
        official_style_pipeline, args=(episode_files, model), rounds=2, warmup_rounds=0
    )
    assert len(labels) == QUERIES


@pytest.mark.benchmark(group="runtime-cpu-1way1shot-8q-417")
def test_fss_run(benchmark, episode_files, tmp_path):
    args = [
        "--support",
        episode_files / "support",
        "--query",
        episode_files / "query",
        "--ckpt",
        episode_files / "vgg16.pt",
        "--batch",
        "8",
        "--overwrite",
        "--no-overlays",
        "--out",
        tmp_path / "out",
    ]
    code = benchmark.pedantic(fss_run, args=([str(a) for a in args],), rounds=2, warmup_rounds=0)
    assert code == 0
    ours = np.asarray(Image.open(tmp_path / "out" / "q0.png"))
    reference = official_style_pipeline(episode_files, fss.load_model(episode_files / "vgg16.pt"))[0]
    assert (ours == reference).mean() > 0.999  # the fast pipeline computes the same masks


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gpu_segmenter(batch, precision):
    seg = fss.Segmenter(
        fss.PANet(width=1.0, meta={"input_size": SIZE}),
        device="cuda",
        size=SIZE,
        batch=batch,
        precision=precision,
        cuda_graph=True,
    )
    rng = np.random.default_rng(0)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[100:300, 100:300] = 1
    seg.set_support([[(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)]], [[mask]], ["thing"])
    return seg


@cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_episode_latency_batch1(benchmark, precision):
    seg = gpu_segmenter(1, precision)
    queries = torch.randn(1, 3, SIZE, SIZE, device="cuda")
    for _ in range(10):
        seg.segment_torch(queries, (SIZE, SIZE))

    def one():
        seg.segment_torch(queries, (SIZE, SIZE))
        torch.cuda.synchronize()

    benchmark.pedantic(one, rounds=200, warmup_rounds=10)


@cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 8, 32, 64])
def test_gpu_cached_support_throughput(benchmark, batch, precision):
    seg = gpu_segmenter(batch, precision)
    queries = torch.randn(batch, 3, SIZE, SIZE, device="cuda")

    def run():
        seg.segment_torch(queries, (SIZE, SIZE))
        torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
    benchmark.extra_info["queries_per_s"] = batch / benchmark.stats.stats.median
