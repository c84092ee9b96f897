"""End-to-end runtime: fss-run (supports encoded once, fused head) against the official-style pipeline.

CPU case (issues #5, #15): 1-way 1-shot, 8 queries, 417 x 417 images, full-width VGG16-dilated
encoder, each pipeline a whole process (interpreter, imports, model load, decoding, writing PNGs).
The official-style pipeline (``official_style.py``) runs one episode per query, re-encodes the support
every time and pools by upsample-then-pool, as the reference implementation does. fss-run runs with
its default encoder path (ONNX Runtime from the verified-graph cache, warmed once outside the timer;
the cold first run is recorded in ``extra_info``) and with ``--backend torch``. All read the same
files; their masks are compared. The bundled model's steady-state queries per second (Segmenter,
per encoder path) and its start-up time (a process loading it, ready to segment) follow.
Run: ``pytest benches/bench_runtime.py --benchmark-only``.

GPU cases run only where CUDA is present: batch-1 episode latency and cached-support throughput.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timing import QUICK, wait_for_background_export, write_random_episode

import fss

SIZE, WIDTH, QUERIES = (65, 0.125, 2) if QUICK else (417, 1.0, 8)


def at_size(pixels: int) -> int:
    """A coordinate of the 417-pixel case at ``SIZE``."""
    return pixels * SIZE // 417


BENCHES = Path(__file__).resolve().parent
EXAMPLES = BENCHES.parent / "examples"


@pytest.fixture(scope="module")
def episode_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_random_episode(
        root, SIZE, QUERIES, (slice(at_size(100), at_size(300)), slice(at_size(120), at_size(330)))
    )
    model = fss.PANet(width=WIDTH, meta={"input_size": SIZE})
    fss.save_checkpoint(model, root / "vgg16.pt")
    return root


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A fresh encoder cache for the fss-run processes (never the user's)."""
    return {**os.environ, "FSS_CACHE_DIR": str(tmp_path_factory.mktemp("fss-cache"))}


def fss_run_process(root: Path, out: Path, env: dict, *options: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "fss.runtime.cli",
        "--support",
        root / "support",
        "--query",
        root / "query",
    ]
    if "--bundle" not in options:
        command += ["--ckpt", root / "vgg16.pt"]
    command += ["--batch", "8", "--no-overlays", "--out", out, *options]
    subprocess.run([str(c) for c in command], check=True, env=env, stderr=subprocess.DEVNULL)


def agreement(folder: Path, reference: Path) -> float:
    """Worst fraction of equal mask pixels over the queries."""
    return min(
        float((np.asarray(Image.open(path)) == np.asarray(Image.open(folder / path.name))).mean())
        for path in sorted(reference.glob("*.png"))
    )


@pytest.fixture(scope="module")
def official_masks(episode_files):
    subprocess.run([sys.executable, BENCHES / "official_style.py", episode_files], check=True)
    return episode_files / "official-out"


@pytest.mark.benchmark(group="runtime-cpu-1way1shot-8q-417")
def test_official_style_pipeline(benchmark, episode_files, official_masks):
    command = [sys.executable, str(BENCHES / "official_style.py"), str(episode_files)]
    benchmark.pedantic(subprocess.run, args=(command,), kwargs={"check": True}, rounds=3, warmup_rounds=0)


@pytest.mark.benchmark(group="runtime-cpu-1way1shot-8q-417")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fss_run(benchmark, episode_files, official_masks, cache_env, tmp_path, backend):
    out = tmp_path / "out"
    start = time.perf_counter()
    fss_run_process(episode_files, out, cache_env, "--backend", backend)  # auto: exports in the background
    benchmark.extra_info["first_run_s"] = round(time.perf_counter() - start, 2)
    if backend == "auto":
        wait_for_background_export(Path(cache_env["FSS_CACHE_DIR"]))
    benchmark.pedantic(
        fss_run_process, args=(episode_files, out, cache_env, "--backend", backend), rounds=3, warmup_rounds=0
    )
    equal = agreement(out, official_masks)
    benchmark.extra_info["mask_agreement_with_official"] = equal
    assert equal > 0.999  # the fast pipeline computes the same masks


@pytest.fixture(scope="module")
def int8_bundle(episode_files):
    from fss.export.build import export_bundle
    from fss.export.quantize import calibration_photos

    photos = calibration_photos(EXAMPLES)  # real photos (the bundled examples)
    bundle, _ = export_bundle(episode_files / "vgg16.pt", episode_files / "bundle-int8", int8_photos=photos)
    return bundle


@pytest.mark.benchmark(group="runtime-cpu-1way1shot-8q-417")
def test_fss_run_int8(benchmark, episode_files, official_masks, int8_bundle, cache_env, tmp_path):
    """Opt-in int8 (a bundle made by fss-export --int8): timed; its agreement is recorded, not asserted
    (random weights: docs/performance.md measures it on the bundled model and real photos)."""
    out = tmp_path / "out"
    args = (episode_files, out, cache_env, "--bundle", int8_bundle, "--int8")
    benchmark.pedantic(fss_run_process, args=args, rounds=3, warmup_rounds=0)
    benchmark.extra_info["mask_agreement_with_official"] = agreement(out, official_masks)


def example_segmenter(backend: str):
    support = EXAMPLES / "support" / "bus"
    seg = fss.Segmenter(None, batch=4, backend=backend)
    shots = sorted(support.glob("*.jpg"))
    seg.set_support([shots], [[path.with_suffix(".png") for path in shots]], ["bus"])
    return seg


@pytest.mark.benchmark(group="bundled-model-steady-state-16q")
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_bundled_model_queries(benchmark, backend, monkeypatch, tmp_path):
    monkeypatch.setenv("FSS_CACHE_DIR", str(tmp_path))
    seg = example_segmenter(backend)
    queries = sorted((EXAMPLES / "query").glob("*.jpg")) * 6  # 18 photos of 400-640 px, decoded each time

    def stream():
        return sum(1 for result in seg.segment_stream(queries) if result.error is None)

    stream()
    assert benchmark.pedantic(stream, rounds=3, warmup_rounds=0) == len(queries)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["queries_per_s"] = len(queries) / benchmark.stats.stats.median


@pytest.mark.benchmark(group="bundled-model-start-up")
def test_bundled_model_start_up(benchmark, cache_env):
    """A fresh process: import fss, load the bundled model, its cached ONNX Runtime encoder ready."""
    command = [sys.executable, "-c", "import fss; fss.Segmenter(None)"]
    subprocess.run(command, check=True, env=cache_env)  # fills the cache
    benchmark.pedantic(subprocess.run, args=(command,), kwargs={"check": True, "env": cache_env}, rounds=5)


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
    mask[at_size(100) : at_size(300), at_size(100) : at_size(300)] = 1
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
