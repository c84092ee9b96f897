"""Prototypes: fss.kernels.prototypes against the official upsample-then-pool loops.

Issue #3 target (CPU, 1-way 5-shot, C = 512, 53 x 53 features, 417 x 417 masks): impl="auto"
(native) >= 200x faster than the official computation. GPU cases skip without CUDA.
Run: ``pytest benches/bench_prototypes.py --benchmark-only``.
"""

import pytest
import torch
from official_reference import episode_prototypes
from timing import QUICK, synced

from fss.kernels import prototypes

WAYS, SHOTS = 1, 5
C, FEAT, SIZE = (64, 17, 129) if QUICK else (512, 53, 417)
GROUP = f"prototypes {WAYS}-way {SHOTS}-shot C={C} {FEAT}->{SIZE}"
has_cuda = torch.cuda.is_available()


def episode(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, WAYS, SHOTS, C, FEAT, FEAT, generator=gen)
    fg = torch.zeros(1, WAYS, SHOTS, SIZE, SIZE)
    for k in range(SHOTS):  # an object box per shot; the rest is background
        fg[0, :, k, 60 + 20 * k : 300, 90 : 330 - 15 * k] = 1
    return feats.to(device, dtype), fg.to(device), (1 - fg).to(device)


def official(feats, fg, bg):
    return torch.cat(episode_prototypes(feats[0], fg[0], bg[0], [SHOTS] * WAYS))


@pytest.mark.benchmark(group=f"{GROUP} (CPU)")
def test_official_cpu(benchmark):
    with torch.no_grad():  # seconds per call: three rounds suffice
        benchmark.pedantic(official, args=episode("cpu"), rounds=3, iterations=1)


@pytest.mark.benchmark(group=f"{GROUP} (CPU)")
@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_prototypes_cpu(benchmark, impl):
    feats, fg, bg = episode("cpu")
    with torch.no_grad():
        out = benchmark(lambda *a: prototypes(*a, impl=impl), feats, fg, bg)
        torch.testing.assert_close(out[0], official(feats, fg, bg), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs CUDA")
@pytest.mark.benchmark(group=f"{GROUP} (CUDA)")
def test_official_cuda(benchmark):
    with torch.no_grad():
        benchmark(synced(official), *episode("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs CUDA")
@pytest.mark.benchmark(group=f"{GROUP} (CUDA)")
@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_prototypes_cuda(benchmark, impl, dtype):
    with torch.no_grad():
        benchmark(synced(lambda *a: prototypes(*a, impl=impl)), *episode("cuda", dtype))
