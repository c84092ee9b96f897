"""Head cost of the mask-quality options of #24, side by side with the plain fused head, per query.

The bundled model's shapes: C = 384 features on a 41 x 41 grid, labels at 321 x 321, 1 and 3 ways.
``none`` is the fused head alone; ``ssp`` self-support prototypes (``--refine ssp``); ``fusion``
PRNet's; ``presence`` the scores (computed beside the head; ``min_score`` needs them);
``guided`` the guided filter of the probabilities at 321 px (``--edges guided``).
Run: ``pytest benches/bench_quality.py --benchmark-only``.
"""

import pytest
import torch
from timing import synced

import fss
from fss.kernels.guided import guided_labels

C, FEAT, SIZE = 384, 41, 321
WAYS = pytest.mark.parametrize("ways", [1, 3])


@pytest.fixture(scope="module")
def model():
    return fss.PANet(encoder="efficientnet-lite0", meta={"input_size": SIZE}).eval()


def inputs(ways):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 1, C, FEAT, FEAT, generator=gen), torch.randn(1, 1 + ways, C, generator=gen)


@WAYS
@pytest.mark.parametrize("refine", ["none", "ssp", "fusion"])
def test_head_with_refinement(benchmark, model, ways, refine):
    benchmark.group = f"quality options, {ways}-way, per query (CPU)"
    with torch.inference_mode():
        labels = benchmark(synced(lambda q, p: model.segment(q, p, (SIZE, SIZE), refine)), *inputs(ways))
    assert labels.shape == (1, 1, SIZE, SIZE)


@WAYS
def test_presence_scores(benchmark, model, ways):
    benchmark.group = f"quality options, {ways}-way, per query (CPU)"
    with torch.inference_mode():
        scores = benchmark(synced(model.presence), *inputs(ways))
    assert scores.shape == (1, 1, ways)


@WAYS
def test_guided_edges(benchmark, model, ways):
    benchmark.group = f"quality options, {ways}-way, per query (CPU)"
    with torch.inference_mode():
        logits = model.logits(*inputs(ways), (SIZE, SIZE))[0, 0]
    grey = torch.rand(SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    labels, _ = benchmark(synced(guided_labels), grey, logits)
    assert labels.shape == (SIZE, SIZE)
