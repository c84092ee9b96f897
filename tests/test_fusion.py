"""PRNet's two-stage prototype fusion against a loop-by-loop reference of the paper's equations (7-13)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_model

from fss import kernels
from fss.kernels import prototypes
from fss.models.fusion import confident_query_prototypes, fuse_prototypes
from fss.runtime.segmenter import Segmenter


# -- the reference: one episode, one class, one query, one location at a time ---------------------------
def ref_maps(feats, protos):
    """``Q x C x h x w``, ``P x C`` -> ``Q x P x h x w`` of ``F.cosine_similarity`` per location."""
    Q, _, h, w = feats.shape
    maps = torch.zeros(Q, len(protos), h, w, dtype=feats.dtype)
    for t in range(Q):
        for n in range(len(protos)):
            for y in range(h):
                for x in range(w):
                    maps[t, n, y, x] = F.cosine_similarity(feats[t, :, y, x], protos[n], dim=0, eps=1e-8)
    return maps


def ref_argmax(values):
    best = 0
    for j in range(1, len(values)):
        if values[j] > values[best]:  # ties: the first class
            best = j
    return best


def ref_query_prototypes(feats, maps, fallback):
    """Eq. 7, 8, 13, 14 with the documented fallback, one class and query at a time."""
    Q, P, h, w = maps.shape
    result = []
    for n in range(P):
        poolings = []
        for t in range(Q):
            locations = [(y, x) for y in range(h) for x in range(w) if ref_argmax(maps[t, :, y, x]) == n]
            if not locations:
                continue
            values = [maps[t, n, y, x].item() for y, x in locations]
            alpha = (max(values) + sum(values) / len(values)) / 2
            chosen = [(y, x) for y, x in locations if maps[t, n, y, x].item() > alpha]
            if chosen:
                total = sum(feats[t, :, y, x] for y, x in chosen)
                poolings.append(total / (len(chosen) + 1e-5))
        result.append(sum(poolings) / len(poolings) if poolings else fallback[n])
    return torch.stack(result)


def ref_fusion(feats, p_s):
    m1 = ref_maps(feats, p_s)
    p_f1 = 0.5 * p_s + 0.5 * ref_query_prototypes(feats, m1, p_s)
    m3 = (m1 + ref_maps(feats, p_f1)) / 2
    return 0.5 * p_f1 + 0.5 * ref_query_prototypes(feats, m3, p_f1)


# -- tests -----------------------------------------------------------------------------------------------
def episode(B, N, K, Q, C=6, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    supp = torch.randn(B, N, K, C, h, w, generator=g, dtype=torch.float64)
    fg = (torch.rand(B, N, K, 4 * h, 4 * w, generator=g) > 0.6).double()
    bg = 1 - fg
    qry = torch.randn(B, Q, C, h, w, generator=g, dtype=torch.float64)
    return prototypes(supp, fg, bg, impl="torch"), qry


@pytest.mark.parametrize("B,N,K,Q", [(1, 1, 1, 1), (2, 2, 3, 3), (3, 3, 5, 2)])
def test_fusion_equals_the_loop_reference(B, N, K, Q):
    protos, qry = episode(B, N, K, Q, seed=B + N + K + Q)
    ours = fuse_prototypes(qry, protos)
    for b in range(B):
        torch.testing.assert_close(ours[b], ref_fusion(qry[b], protos[b]), atol=1e-10, rtol=1e-10)
    assert not torch.allclose(ours, protos)  # the fusion did change something


def test_fusion_with_ties_and_a_class_never_predicted():
    protos, qry = episode(2, 3, 2, 2, seed=7)
    qry = qry.abs()  # all cosines with positive prototypes are > 0 ...
    protos = protos.abs()
    protos[:, 2] = protos[:, 1]  # ... way 2 ties way 1 everywhere: the argmax keeps way 1
    protos[:, 3] = 0  # ... and way 3 (cosine 0) is never predicted: it keeps its prototype
    ours = fuse_prototypes(qry, protos)
    for b in range(2):
        torch.testing.assert_close(ours[b], ref_fusion(qry[b], protos[b]), atol=1e-10, rtol=1e-10)
    assert torch.equal(ours[:, 3], protos[:, 3])
    assert torch.equal(ours[:, 2], protos[:, 2])  # never predicted either (tie -> first class)


def test_a_class_with_no_confident_location_keeps_its_fallback():
    feats = torch.randn(1, 2, 4, 3, 3, dtype=torch.float64)
    maps = torch.zeros(1, 2, 3, 3, 3, dtype=torch.float64)
    maps[:, :, 0] = 0.5  # background wins everywhere but one location per query ...
    maps[0, 0, 0, 1, 1] = 0.1
    maps[0, 1, 0, 2, 2] = 0.1
    maps[:, :, 1, 1, 1] = 0.9  # class 1: one location per query -> max == mean == alpha, none above
    maps[:, :, 1, 2, 2] = 0.9
    maps[:, :, 2] = 0.2  # class 2: never predicted
    fallback = torch.randn(1, 3, 4, dtype=torch.float64)
    ours = confident_query_prototypes(feats, maps, fallback)
    ref = ref_query_prototypes(feats[0], maps[0], fallback[0])
    torch.testing.assert_close(ours[0], ref, atol=1e-12, rtol=1e-12)
    assert torch.equal(ours[0, 1:], fallback[0, 1:])
    # the background is all equal (0.5) apart from one lower location: nothing is above alpha either.
    assert torch.equal(ours[0, 0], fallback[0, 0])


def segmenter_inputs(rng, size=49):
    imgs = [[(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(2)] for _ in range(2)]
    masks = [[(rng.random((size, size)) > 0.5).astype(np.uint8) for _ in range(2)] for _ in range(2)]
    queries = [(rng.random((size + 6, size, 3)) * 255).astype(np.uint8) for _ in range(3)]
    return imgs, masks, queries


def test_segmenter_refine_none_is_panet_and_fusion_is_per_query():
    imgs, masks, queries = segmenter_inputs(np.random.default_rng(0))
    model = random_model(input_size=49)
    plain = Segmenter(model, device="cpu", impl="torch")
    assert plain.refine == "none"  # PANet's default
    none = Segmenter(model, device="cpu", impl="torch", refine="none")
    fused = Segmenter(model, device="cpu", impl="torch", refine="fusion")
    for seg in (plain, none, fused):
        seg.set_support(imgs, masks, ["a", "b"])
    expected = plain.segment(queries)
    for ours, ref in zip(none.segment(queries), expected, strict=True):
        assert np.array_equal(ours, ref)  # bit for bit
    protos = fused.support(None).protos
    batch = torch.stack([fused.load_query(q)[1] for q in queries])
    feats = fused.encode(batch)
    refined = fused.segment(queries)
    alone = [fused.segment([q])[0] for q in queries]  # a query's labels do not depend on its batch
    for q, (query, labels) in enumerate(zip(queries, refined, strict=True)):
        assert np.array_equal(labels, alone[q])
        p_f2 = fuse_prototypes(feats[q][None, None], protos[None])  # checked against the reference above
        want = kernels.segment(feats[q][None, None], p_f2, query.shape[:2], model.scale, impl="torch")[0, 0]
        assert np.array_equal(labels, want.numpy())
