"""SST against PANet on the same encoder (EfficientNet-Lite0, 321 x 321, SST head 128 channels as trained in
docs/methods.md): per-query inference with a cached support, the support set's registration (the inner loop
once per set), and one training step (second order, first order, no inner loop) beside PANet's.

Run: ``OMP_NUM_THREADS=1 pytest benches/bench_sst.py --benchmark-only`` (weights are random: costs do not
depend on them).
"""

import numpy as np
import pytest
import torch
from timing import QUICK

import fss
from fss.models.base import build_model

SIZE, QUERIES, CHANNELS = (65, 2, 16) if QUICK else (321, 4, 128)


def at_size(pixels: int) -> int:
    """A coordinate of the 321-pixel case at ``SIZE``."""
    return pixels * SIZE // 321


def sst_model(**options):
    torch.manual_seed(0)
    return build_model(
        "sst", "efficientnet-lite0", 1.0, {"input_size": SIZE, "sst": {"channels": CHANNELS, **options}}
    )


def panet_model():
    torch.manual_seed(0)
    return build_model("panet", "efficientnet-lite0", 1.0, {"input_size": SIZE})


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    images = [(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(QUERIES + 1)]
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[at_size(80) : at_size(240), at_size(100) : at_size(260)] = 1
    return images[0], mask, images[1:]


@pytest.mark.parametrize("method", ["panet", "sst"])
def test_query_with_cached_support(benchmark, photos, method):
    support, mask, queries = photos
    seg = fss.Segmenter(sst_model() if method == "sst" else panet_model(), batch=QUERIES)
    seg.set_support([[support]], [[mask]], ["thing"])
    benchmark.extra_info["queries"] = QUERIES
    benchmark.pedantic(seg.segment, args=(queries,), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("refine", ["tune", "none"])
def test_sst_support_registration(benchmark, photos, refine):
    support, mask, _ = photos
    seg = fss.Segmenter(sst_model(), refine=refine)
    benchmark.pedantic(seg.set_support, args=([[support]], [[mask]], ["thing"]), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("variant", ["panet", "sst-second-order", "sst-first-order", "sst-no-tune"])
def test_training_step(benchmark, variant):
    options = {"sst-first-order": {"second_order": False}, "sst-no-tune": {"tune": False}}.get(variant, {})
    model = panet_model() if variant == "panet" else sst_model(**options)
    model.train()
    gen = torch.Generator().manual_seed(0)
    supp = torch.randn(1, 1, 1, 3, SIZE, SIZE, generator=gen)
    fg = torch.zeros(1, 1, 1, SIZE, SIZE)
    fg[..., at_size(80) : at_size(240), at_size(100) : at_size(260)] = 1
    qry = torch.randn(1, 1, 3, SIZE, SIZE, generator=gen)
    labels = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.long)
    labels[..., at_size(60) : at_size(200), at_size(90) : at_size(250)] = 1

    def step():
        model.zero_grad(set_to_none=True)
        query_loss, second = model.losses(supp, fg, 1 - fg, qry, labels)
        (query_loss + second).backward()

    benchmark.extra_info["episodes"] = 1
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
