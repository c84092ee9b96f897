"""Head cost of the mask-quality options of #24, side by side with the plain fused head, per query.

The bundled model's shapes: C = 384 features on a 53 x 53 grid, labels at 417 x 417, 1 and 3 ways.
``none`` is the fused head alone; ``ssp`` self-support prototypes (``--refine ssp``); ``fusion``
PRNet's; ``learned`` the decision head (``--refine learned``, width 32); ``presence`` the scores
(computed beside the head; ``min_score`` needs them); ``guided`` the guided filter of the
probabilities at 417 px (``--edges guided``). ``test_predict_example_queries``: the bundled model end
to end (``Segmenter.predict`` on the three decoded example queries, 2 classes registered) at its
defaults, with the decision head, and as it was before #24 (321 px, plain head).
Run: ``pytest benches/bench_quality.py --benchmark-only``.
"""

from pathlib import Path

import pytest
import torch
from timing import synced

import fss
from fss.io.images import read_image
from fss.kernels.guided import guided_labels
from fss.models.decision_head import DecisionHead

C, FEAT, SIZE = 384, 53, 417
WAYS = pytest.mark.parametrize("ways", [1, 3])


@pytest.fixture(scope="module")
def model():
    head = {"width": 32, "threshold": 0.0}
    model = fss.PANet(encoder="efficientnet-lite0", meta={"input_size": SIZE, "decision_head": head})
    assert isinstance(model.decision_head, DecisionHead)
    return model.eval()


def inputs(ways):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 1, C, FEAT, FEAT, generator=gen), torch.randn(1, 1 + ways, C, generator=gen)


@WAYS
@pytest.mark.parametrize("refine", ["none", "ssp", "fusion", "learned"])
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


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
END_TO_END = {
    "321px-plain": {"size": 321, "refine": "none", "edges": "none", "min_score": 0.0},
    "417px-defaults": {},
    "417px-learned": {"refine": "learned"},
}


@pytest.mark.parametrize("setting", END_TO_END)
def test_predict_example_queries(benchmark, setting):
    benchmark.group = "bundled model end to end, 3 example queries (CPU)"
    segmenter = fss.Segmenter.from_folder(EXAMPLES / "support", **END_TO_END[setting])
    queries = [read_image(path) for path in sorted((EXAMPLES / "query").iterdir())]
    for query in queries:  # warm-up: the encoder's first calls
        segmenter.predict(query)
    results = benchmark(lambda: [segmenter.predict(query) for query in queries])
    assert [r.classes for r in results] == [["bus", "pizza"]] * 3
