"""fss-serve against the in-process Segmenter on the same photos (issue #14).

One request at a time, the bundled model, the example photos: the served path (client encode,
loopback HTTP, Triton, dynamic batcher, decode, encoder, head, reply) against ``Segmenter.segment``
on the same bytes. Every served mask is checked against ``fss-run``'s. Run:
``pytest benches/bench_serve.py --benchmark-only``.

The full load test (1 / 4 / 16 clients, 10,000 requests with memory, hostile clients, shutdown) is
``python benches/serve_load.py``; its figures are in docs/performance.md.
"""

import io
import itertools
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_load import ServerProcess, reference_masks, set_folder_support

import fss

pytest.importorskip("pytriton", reason="fss[serve] not installed")

ROOT = Path(__file__).resolve().parents[1]
SUPPORT, QUERIES = ROOT / "examples" / "support", ROOT / "examples" / "query"


@pytest.fixture(scope="module")
def photos():
    return {p.stem: p.read_bytes() for p in sorted(QUERIES.glob("*.jpg"))}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return reference_masks([], SUPPORT, QUERIES, tmp_path_factory.mktemp("fss-run"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fss.serve import Client

    server = ServerProcess([], tmp_path_factory.mktemp("serve") / "server.log")
    server.wait_ready()
    client = Client(server.url)
    yield client, client.register_support(SUPPORT)
    client.close()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=120) == 0


def test_in_process_segmenter(benchmark, photos):
    seg = fss.Segmenter(fss.load_model(None))
    set_folder_support(seg, SUPPORT)
    cycle = itertools.cycle(photos.values())
    # From a worker thread, as the server calls its Segmenter (see serve_load.paired_overhead).
    with ThreadPoolExecutor(1) as worker:
        benchmark.pedantic(
            lambda: worker.submit(seg.segment, [Image.open(io.BytesIO(next(cycle))).convert("RGB")]).result(),
            rounds=30,
            warmup_rounds=3,
        )


def test_served_segment(benchmark, served, photos, references):
    client, sid = served
    names = itertools.cycle(sorted(photos))
    results = []

    def one():
        name = next(names)
        results.append((name, client.segment(sid, photos[name])))

    benchmark.pedantic(one, rounds=30, warmup_rounds=3)
    assert all(np.array_equal(labels, references[name]) for name, labels in results)
