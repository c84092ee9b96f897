"""The first run of a new checkpoint against its warm runs (issue #22, item 6), whole fss-run processes.

Per encoder (full-width VGG16-dilated at 417 px, full-width EfficientNet-Lite0 at 321 px; random weights,
saved with ``fss.save_checkpoint``), 1-way 1-shot, 8 queries, ``fss-run --batch 8 --no-overlays``,
three pipelines side by side in every round:

- **cold**: ``--backend auto`` with a fresh ``$FSS_CACHE_DIR``: the job runs in torch and the verified
  ONNX graph is exported by a background process at idle priority (waited for after the run, untimed,
  so that it does not overlap the next pipeline);
- **torch**: ``--backend torch`` with a fresh cache: the same job with no exporter beside it (what the
  background exporter costs the cold run on a 2-core machine is cold - torch);
- **export first**: ``--backend onnxruntime`` with a fresh cache: export + verify, then ONNX Runtime
  (what ``auto`` did on a new checkpoint before issue #22);
- **warm**: ``--backend auto`` with the checkpoint's verified graph cached (the timed benchmark).

Every round's times go to ``extra_info`` with the ratios of the medians; the table is printed (``-s``).
Run: ``pytest benches/bench_first_run.py --benchmark-only -s``. Under ``--benchmark-disable`` (the quick
mode) one round of each runs on narrow models at small sizes.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timing import wait_for_background_export, write_random_episode

import fss

QUERIES = 8
CASES = {"vgg16-dilated": 417, "efficientnet-lite0": 321}
ROUNDS = 3


def make_episode(root: Path, encoder: str, size: int, width: float) -> Path:
    write_random_episode(
        root, size, QUERIES, (slice(size // 4, 3 * size // 4), slice(size // 5, 4 * size // 5))
    )
    model = fss.PANet(width=width, meta={"input_size": size}, encoder=encoder)
    fss.save_checkpoint(model, root / "model.pt")
    return root


def fss_run_seconds(root: Path, out: Path, cache: Path, backend: str) -> float:
    """Wall time of one whole fss-run process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "fss.runtime.cli", "--support", root / "support", "--query"]
    command += [root / "query", "--ckpt", root / "model.pt", "--batch", "8", "--no-overlays"]
    command += ["--out", out, "--backend", backend]
    env = {**os.environ, "FSS_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    subprocess.run([str(c) for c in command], check=True, env=env, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def worst_agreement(folder: Path, reference: Path) -> float:
    return min(
        float((np.asarray(Image.open(path)) == np.asarray(Image.open(folder / path.name))).mean())
        for path in sorted(reference.glob("*.png"))
    )


@pytest.mark.benchmark(group="first-run-of-a-checkpoint-8q")
@pytest.mark.parametrize("encoder", list(CASES))
def test_cold_against_warm_fss_run(benchmark, encoder, tmp_path):
    quick = benchmark.disabled
    # Quick mode: small inputs, and VGG16 narrow (EfficientNet-Lite has width 1 only)
    size, width = (65, 0.125 if encoder.startswith("vgg") else 1.0) if quick else (CASES[encoder], 1.0)
    root = make_episode(tmp_path / "episode", encoder, size, width)
    warm_cache = tmp_path / "warm-cache"
    fss_run_seconds(root, tmp_path / "warm", warm_cache, "onnxruntime")  # fills the warm cache
    backends = {"cold": "auto", "torch": "torch", "export_first": "onnxruntime"}
    times = {name: [] for name in [*backends, "warm"]}

    def cold_pipelines():
        for name, backend in backends.items():
            cache = tmp_path / f"{name}-cache"
            shutil.rmtree(cache, ignore_errors=True)
            times[name].append(fss_run_seconds(root, tmp_path / name, cache, backend))
            if name == "cold":
                wait_for_background_export(cache)

    def warm():
        times["warm"].append(fss_run_seconds(root, tmp_path / "warm", warm_cache, "auto"))

    benchmark.pedantic(warm, setup=cold_pipelines, rounds=1 if quick else ROUNDS, warmup_rounds=0)
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in times}
    paths = {name: run["settings"]["backend"] for name, run in results.items()}
    assert paths == {"cold": "torch", "torch": "torch", "export_first": "onnxruntime", "warm": "onnxruntime"}
    assert worst_agreement(tmp_path / "cold", tmp_path / "warm") > 0.999  # the same masks up to argmax ties
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        benchmark.extra_info[f"{name}_s"] = [round(t, 2) for t in values]
    for name in backends:
        benchmark.extra_info[f"{name}_over_warm"] = round(medians[name] / medians["warm"], 3)
    summary = ", ".join(f"{name} {median:.2f} s" for name, median in medians.items())
    print(f"\n{encoder} {size}px width {width}: medians {summary}; {benchmark.extra_info}")
