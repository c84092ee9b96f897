"""Matching head: fss.kernels.segment / match against the official cosine + interpolate + argmax.

Issue #3 target (CPU, 1 query, C = 512, 53 x 53 features -> 417 x 417, N = 1 and 5): segment
impl="auto" (native) >= 5x faster than the official per-prototype F.cosine_similarity,
F.interpolate, argmax. GPU cases skip without CUDA.
Run: ``pytest benches/bench_match.py --benchmark-only``.
"""

import pytest
import torch
from official_reference import episode_logits
from timing import synced

from fss.kernels import match, segment

C, FEAT, SIZE = 512, 53, 417
has_cuda = torch.cuda.is_available()
WAYS = pytest.mark.parametrize("ways", [1, 5])


def head_inputs(ways, device, queries=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    qry = torch.randn(1, queries, C, FEAT, FEAT, generator=gen)
    protos = torch.randn(1, 1 + ways, C, generator=gen)
    return qry.to(device, dtype), protos.to(device, dtype)


def official_segment(qry, protos):
    return episode_logits(qry[0], list(protos[0, :, None]), (SIZE, SIZE))[1].argmax(dim=1)


def official_logits(qry, protos):
    return episode_logits(qry[0], list(protos[0, :, None]), (SIZE, SIZE))[1]


def group(ways, device):
    return f"segment {ways}-way 1 query C={C} {FEAT}->{SIZE} ({device.upper()})"


def bench(benchmark, ways, device, fn, dtype=torch.float32):
    benchmark.group = group(ways, device)
    with torch.no_grad():
        return benchmark(synced(fn), *head_inputs(ways, device, dtype=dtype))


@WAYS
def test_official_segment_cpu(benchmark, ways):
    bench(benchmark, ways, "cpu", official_segment)


@WAYS
@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_segment_cpu(benchmark, ways, impl):
    labels = bench(benchmark, ways, "cpu", lambda q, p: segment(q, p, SIZE, impl=impl))
    qry, protos = head_inputs(ways, "cpu")
    assert (labels[0].long() != official_segment(qry, protos)).float().mean() <= 1e-4


@WAYS
def test_segment_with_prob_cpu(benchmark, ways):
    bench(benchmark, ways, "cpu", lambda q, p: segment(q, p, SIZE, return_prob=True))


@WAYS
def test_official_logits_cpu(benchmark, ways):
    bench(benchmark, ways, "cpu", official_logits)


@WAYS
def test_match_cpu(benchmark, ways):
    bench(benchmark, ways, "cpu", lambda q, p: match(q, p, SIZE))


@WAYS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "name, fn",
    [
        ("official", official_segment),
        ("torch", lambda q, p: segment(q, p, SIZE, impl="torch")),
        ("auto", lambda q, p: segment(q, p, SIZE)),
        ("auto+prob", lambda q, p: segment(q, p, SIZE, return_prob=True)),
        ("match auto", lambda q, p: match(q, p, SIZE)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs CUDA")
def test_cuda(benchmark, ways, dtype, name, fn):
    bench(benchmark, ways, "cuda", fn, dtype)
