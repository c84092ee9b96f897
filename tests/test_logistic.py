"""OSLSM's head (fss.kernels.logistic) and weight hashing against independent references.

References written here, not imported: the official upsampling as Caffe's fixed bilinear deconvolution
(kernel 64, stride 32) and crop; torch's F.interpolate for the stride-8 variants; the hashing layer as
the dense fully connected matrix of the paper's supplementary (W[i, j] = zeta_i if j = kappa_i); the
K-shot OR as the OR of K one-shot masks; the N-way rule written out per pixel. Triton runs on CUDA when
there is one, else on CPU under TRITON_INTERPRET=1 (small shapes).
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when fss.kernels.triton_* is first imported

from fss.kernels import logistic  # noqa: E402
from fss.models.oslsm import FCN_STRIDE, QUERY_PAD, WeightHashing, hashing_map  # noqa: E402

IMPLS = ("torch", "separable", "triton")
OFFICIAL = (32.0, 8.5)  # what the official net's geometry gives: asserted against the deconvolution below


def device_of(impl):
    return "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"


def fcn_feature_side(size: int) -> int:
    """fc7 side of the official query net: conv1_1 padded by 121, five 2 x 2 ceil pools, fc6 7 x 7."""
    side = size + 2 * QUERY_PAD - 2
    for _ in range(5):
        side = -(-side // 2)
    return side - 6


def official_upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    """``M x h x w`` -> ``M x size x size``: Caffe's Deconvolution (bilinear filler, kernel 64, stride 32,
    no bias) then Crop, with the crop offset Caffe derives for conv1_1's padding of 121 (40)."""
    k = 2 * FCN_STRIDE
    centre = (k - 1) / 2
    og = torch.arange(k, dtype=torch.float64)
    filt = 1 - (og - centre).abs() / (k // 2)
    kernel = (filt[:, None] * filt[None, :])[None, None]
    up = F.conv_transpose2d(low[:, None].double(), kernel, stride=FCN_STRIDE)[:, 0]
    offset = 40  # fc7 f -> input 32 f - 8.5; the deconvolution puts f at 32 f + 31.5
    return up[:, offset : offset + size, offset : offset + size].float()


def random_head(B, Q, N, K, D, h, w, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, Q, D, h, w, generator=g)
    weights = torch.randn(B, N, K, D + 1, generator=g) / D**0.5
    return feats.to(device), weights.to(device)


def reference_way_logits(feats, weights, size, upsample):
    """Per episode, query, way and shot: the 1x1 product written as a sum, upsampled alone; max over shots."""
    B, Q = feats.shape[:2]
    N, K = weights.shape[1:3]
    out = torch.empty(B, Q, N, *size)
    for b in range(B):
        for q in range(Q):
            for n in range(N):
                maps = []
                for k in range(K):
                    w, bias = weights[b, n, k, :-1], weights[b, n, k, -1]
                    low = (feats[b, q] * w[:, None, None]).sum(0) + bias
                    maps.append(upsample(low[None])[0])
                out[b, q, n] = torch.stack(maps).max(0).values
    return out


def reference_labels(way_logits):
    """The N-way rule per pixel: the way with the largest logit if that logit is positive (first on ties)."""
    logits = way_logits.numpy()
    labels = np.zeros(logits.shape[:2] + logits.shape[3:], np.uint8)
    for idx in np.ndindex(labels.shape):
        b, q, y, x = idx
        values = logits[b, q, :, y, x]
        n = int(np.argmax(values))
        labels[idx] = n + 1 if values[n] > 0 else 0
    return torch.from_numpy(labels)


def near_tie(feats, weights, size, gap=1e-5):
    """Pixels whose label rounding may decide: best way logit near 0, or the two best ways near equal."""
    way = logistic.logits(feats, weights, size)
    near = way.amax(dim=2).abs() < gap
    if way.shape[2] > 1:
        top2 = way.topk(2, dim=2).values
        near |= (top2[:, :, 0] - top2[:, :, 1]) < gap
    return near


def torch_interp(size):
    return lambda low: F.interpolate(low[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def test_official_geometry_matches_the_deconvolution_and_crop():
    for size in (64, 100, 224, 500):
        h = fcn_feature_side(size)
        low = torch.randn(3, h, h)
        geometry = (*OFFICIAL, size, size)
        ours = logistic.upsample_separable(low, (size, size), geometry)
        torch.testing.assert_close(ours, official_upsample(low, size), rtol=1e-5, atol=1e-5)
    assert fcn_feature_side(500) == 18  # the paper's 500 x 500 test query


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("official", [False, True])
def test_head_equals_the_reference(impl, official):
    B, Q, N, K, D = 2, 2, 3, 2, 6
    size = (40, 40) if official else (29, 37)
    h = fcn_feature_side(40) if official else 5
    w = h if official else 7
    feats, weights = random_head(B, Q, N, K, D, h, w, seed=3)
    upsample = (lambda low: official_upsample(low, 40)) if official else torch_interp(size)
    expected = reference_way_logits(feats, weights, size, upsample)
    geometry = (*OFFICIAL, 40, 40) if official else None
    torch.testing.assert_close(
        logistic.logits(feats, weights, size, geometry), expected, rtol=1e-5, atol=1e-5
    )
    dev = device_of(impl)
    labels, prob = logistic.segment(feats.to(dev), weights.to(dev), size, geometry, True, impl=impl)
    ref = reference_labels(expected)
    near_zero = expected.abs().amin(dim=2) < 1e-5  # a sign decided by rounding
    assert ((labels.cpu() != ref) & ~near_zero).sum() == 0
    torch.testing.assert_close(prob.cpu(), torch.sigmoid(expected.amax(dim=2).abs()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_k_shot_is_the_or_of_the_one_shot_masks(impl):
    feats, weights = random_head(1, 3, 1, 4, 8, 6, 6, seed=5)
    dev = device_of(impl)
    size = (45, 50)
    k_shot = logistic.segment(feats.to(dev), weights.to(dev), size, impl=impl).cpu()
    one_shot = [logistic.segment(feats.to(dev), weights[:, :, k : k + 1].to(dev), size, impl=impl).cpu()
                for k in range(4)]  # fmt: skip
    union = torch.stack(one_shot).amax(dim=0)
    assert torch.equal(k_shot, union)
    assert (k_shot > 0).any() and (k_shot == 0).any()  # a real OR, not all one value
    assert (union > one_shot[0]).any()  # some pixel comes from another shot than the first


@settings(max_examples=12, deadline=None)
@given(
    N=st.integers(1, 3),
    K=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    H=st.integers(1, 40),
    W=st.integers(1, 40),
    seed=st.integers(0, 1000),
)
def test_property_fast_paths_equal_the_reference(N, K, h, w, H, W, seed):
    feats, weights = random_head(1, 2, N, K, 5, h, w, seed)
    expected = logistic.segment(feats, weights, (H, W), impl="torch", return_prob=True)
    for impl in ("separable", "native", "triton"):  # native: the C++ choice elsewhere, separable here
        dev = device_of(impl)
        got = logistic.segment(feats.to(dev), weights.to(dev), (H, W), impl=impl, return_prob=True)
        assert ((got[0].cpu() != expected[0]) & ~near_tie(feats, weights, (H, W))).sum() == 0
        torch.testing.assert_close(got[1].cpu(), expected[1], rtol=1e-5, atol=1e-5)


def test_head_refuses_bad_shapes():
    feats, weights = random_head(1, 1, 1, 1, 4, 3, 3)
    with pytest.raises(ValueError, match="weights must be B x N x K x"):
        logistic.segment(feats, weights[..., :-1], (8, 8))
    with pytest.raises(ValueError, match="qry_feats must be"):
        logistic.segment(feats[0], weights, (8, 8))


# -- weight hashing ----------------------------------------------------------------------------------------
def dense_hashing(kappa, zeta, inputs):
    """The paper's fully connected layer with fixed weights, built entry by entry."""
    m = np.zeros((len(kappa), inputs), np.float32)
    for i, (j, sign) in enumerate(zip(kappa.tolist(), zeta.tolist(), strict=True)):
        m[i, j] = sign
    return torch.from_numpy(m)


def test_hashing_is_the_fixed_fully_connected_layer():
    layer = WeightHashing(seed=7, outputs=4097)
    m = dense_hashing(layer.kappa, layer.zeta, 1000)
    assert ((m != 0).sum(dim=1) == 1).all()  # every output takes exactly one input
    assert set(m[m != 0].unique().tolist()) == {-1.0, 1.0}
    assert len(layer.kappa.unique()) > 900  # spread over the 1000 inputs, not a constant
    x = torch.randn(3, 1000)
    torch.testing.assert_close(layer(x), x @ m.t(), rtol=0, atol=0)
    assert torch.equal(layer.matrix(), m)
    assert not list(layer.parameters())  # never trained


def test_hashing_regenerates_from_its_seed():
    a, b = hashing_map(1385, 4097), hashing_map(1385, 4097)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = hashing_map(1386, 4097)
    assert not torch.equal(a[0], c[0])
    # Pinned values: numpy's PCG64 stream is stable across platforms and versions.
    assert a[0][:5].tolist() == hashing_map(1385, 5)[0].tolist()
    assert WeightHashing(1385, 4097).regenerated()
