"""fss.kernels.match and segment: every impl against the official per-prototype cosine + interpolate.

Triton runs on CUDA when there is one, else on CPU under TRITON_INTERPRET=1 (small shapes).
Tolerances: fp32 logits rtol 1e-5 / atol 1e-4 (logits are 20 * cos, |x| <= 20; observed ~4e-6),
max softmax probability atol 1e-5; labels equal the reference argmax except at float ties, counted:
at most 1e-4 of the pixels, each a near tie (reference top-2 gap <= 1e-4). fp16 / bf16 (GPU): logits
atol 0.1 / 0.3, labels may differ only where the fp32 top-2 gap is below that.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when fss.kernels.triton_* is first imported

from fss.kernels import match, segment  # noqa: E402
from fss.kernels.matching import match_torch  # noqa: E402

IMPLS = ("torch", "native", "triton")
LOGIT_TOL = {"rtol": 1e-5, "atol": 1e-4}
TIE_GAP = 1e-4
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def device_of(impl):
    return "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"


def reference_logits(qry_feats, protos, out_size, scale=20.0):
    """The official computation, one episode at a time: F.cosine_similarity per prototype, interpolate."""
    out = []
    for b in range(qry_feats.shape[0]):
        dist = [F.cosine_similarity(qry_feats[b], p[..., None, None], dim=1) * scale for p in protos[b]]
        out.append(
            F.interpolate(torch.stack(dist, dim=1), size=out_size, mode="bilinear", align_corners=False)
        )
    return torch.stack(out)


def make_inputs(B, Q, N, C, hw, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, Q, C, *hw, generator=gen), torch.randn(B, 1 + N, C, generator=gen)


def on(impl, *tensors):
    return [t.to(device_of(impl)) for t in tensors]


def top2_gap(logits):
    top = logits.topk(2, dim=2).values
    return top[:, :, 0] - top[:, :, 1]


def assert_labels_match(labels, logits, max_fraction=1e-4):
    """``labels`` equal ``logits.argmax(2)`` except at float ties: near ties only, counted.

    ``max_fraction=None`` for inputs built to tie (1 channel: every cosine is +-1).
    """
    assert labels.dtype == torch.uint8 and labels.shape == logits.shape[:2] + logits.shape[3:]
    differ = labels.long().cpu() != logits.argmax(dim=2)
    assert (top2_gap(logits)[differ] <= TIE_GAP).all(), "a label differs away from a tie"
    if max_fraction is not None:
        assert differ.sum() <= max_fraction * differ.numel(), (
            f"{int(differ.sum())} of {differ.numel()} labels differ"
        )


# (B, Q, N, C, (h, w), (H, W)): the paper's 53 -> 417, 13 -> 97, 1 x 1 features, non-square, h, w not
# dividing H, W; N in {1, 2, 5}, Q in {1, 4}, B in {1, 3}.
SHAPES = [
    (1, 1, 1, 16, (53, 53), (417, 417)),
    (1, 1, 5, 8, (53, 53), (417, 417)),
    (3, 4, 2, 8, (13, 13), (97, 97)),
    (1, 1, 2, 8, (13, 13), (97, 97)),
    (1, 4, 5, 4, (1, 1), (9, 9)),
    (3, 1, 1, 8, (7, 9), (30, 41)),
    (1, 1, 2, 8, (6, 5), (6, 5)),
]
INTERPRETED = not torch.cuda.is_available()
INTERPRETER_PIXELS = 20_000  # the interpreter runs each program in Python: larger outputs only on CUDA


def shape_cases():
    for shape in SHAPES:
        B, Q = shape[:2]
        big = B * Q * shape[5][0] * shape[5][1] > INTERPRETER_PIXELS
        for impl in IMPLS:
            marks = pytest.mark.skipif(
                impl == "triton" and big and INTERPRETED, reason="small shapes in the interpreter"
            )
            yield pytest.param(
                impl,
                shape,
                marks=marks,
                id=f"{impl}-" + "x".join(map(str, shape[:4])) + f"-{shape[4]}to{shape[5]}",
            )


@pytest.mark.parametrize("impl, shape", list(shape_cases()))
def test_match_and_segment(impl, shape):
    qry, protos = make_inputs(*shape[:5])
    size = shape[5]
    expected = reference_logits(qry, protos, size)
    logits = match(*on(impl, qry, protos), size, impl=impl)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.cpu(), expected, **LOGIT_TOL)
    labels, prob = segment(*on(impl, qry, protos), size, return_prob=True, impl=impl)
    assert_labels_match(labels.cpu(), expected)
    assert_labels_match(labels.cpu(), logits.cpu())  # parity with the same impl's match
    torch.testing.assert_close(prob.cpu(), expected.softmax(dim=2).amax(dim=2), rtol=0, atol=1e-5)
    assert torch.equal(segment(*on(impl, qry, protos), size, impl=impl).cpu(), labels.cpu())


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_ties_pick_the_first_class(impl):
    qry, protos = make_inputs(1, 2, 3, 8, (4, 5))
    protos[:, 1:] = protos[:, :1]  # identical prototypes: every class ties with background
    qry[:, 1] = 0  # zero features: cosine 0 against everything
    labels, prob = segment(*on(impl, qry, protos), (11, 13), return_prob=True, impl=impl)
    assert (labels == 0).all()
    torch.testing.assert_close(prob[:, 1].cpu(), torch.full((1, 11, 13), 0.25))


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_and_int_size(impl):
    qry, protos = make_inputs(2, 1, 2, 8, (5, 5), seed=1)
    expected = reference_logits(qry, protos, (12, 12), scale=7.5)
    torch.testing.assert_close(
        match(*on(impl, qry, protos), 12, scale=7.5, impl=impl).cpu(), expected, **LOGIT_TOL
    )


@pytest.mark.parametrize("impl", ["native", "triton"])
def test_gradient_matches_torch(impl):
    qry, protos = make_inputs(2, 3, 2, 8, (5, 6), seed=2)
    weight = torch.randn(2, 3, 3, 17, 23)

    def grads(impl):
        q, p = (t.requires_grad_() for t in on(impl, qry, protos))
        (match(q, p, (17, 23), impl=impl) * weight.to(q.device)).sum().backward()
        return q.grad.cpu(), p.grad.cpu()

    for got, want in zip(grads(impl), grads("torch"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_torch_gradcheck():
    qry, protos = make_inputs(1, 2, 2, 3, (2, 3), seed=3)
    inputs = (qry.double().requires_grad_(), protos.double().requires_grad_())
    assert torch.autograd.gradcheck(lambda q, p: match_torch(q, p, (5, 7)), inputs)


def test_rejects_bad_inputs():
    qry, protos = make_inputs(1, 1, 2, 4, (3, 3))
    with pytest.raises(ValueError, match="qry_feats"):
        match(qry[0], protos, (7, 7))
    with pytest.raises(ValueError, match="protos"):
        segment(qry, protos[:, :, :2], (7, 7))
    with pytest.raises(ValueError, match="impl"):
        segment(qry, protos, (7, 7), impl="numpy")


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    Q=st.integers(1, 3),
    N=st.integers(1, 5),
    C=st.integers(1, 9),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    H=st.integers(1, 40),
    W=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_property_native_and_torch(B, Q, N, C, h, w, H, W, seed):
    qry, protos = make_inputs(B, Q, N, C, (h, w), seed=seed)
    expected = reference_logits(qry, protos, (H, W))
    for impl in ("torch", "native"):
        torch.testing.assert_close(match(qry, protos, (H, W), impl=impl), expected, **LOGIT_TOL)
        assert_labels_match(segment(qry, protos, (H, W), impl=impl), expected, max_fraction=None)


@settings(max_examples=6, deadline=None)
@given(
    N=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6), H=st.integers(1, 30), W=st.integers(1, 30),
    seed=st.integers(0, 99),
)  # fmt: skip
def test_property_triton(N, h, w, H, W, seed):
    qry, protos = make_inputs(1, 2, N, 5, (h, w), seed=seed)
    expected = reference_logits(qry, protos, (H, W))
    torch.testing.assert_close(
        match(*on("triton", qry, protos), (H, W), impl="triton").cpu(), expected, **LOGIT_TOL
    )
    assert_labels_match(
        segment(*on("triton", qry, protos), (H, W), impl="triton").cpu(), expected, max_fraction=None
    )


# Compiled for an H100 (sm_90) without a device: catches what the interpreter cannot (types, layouts).
COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fss.kernels.triton_matching import head_kernel

scalars = dict.fromkeys(["Q", "C", "h", "w", "H", "W"], "i32")
scalars |= dict.fromkeys(["scale_h", "scale_w", "logit_scale", "eps"], "fp32")
for feat, (logits, labels, prob) in (("*fp32", (True, False, False)), ("*fp16", (False, True, True))):
    signature = {"qry_ptr": feat, "proto_ptr": feat, "scratch_ptr": "*fp32", "logits_ptr": feat,
                 "labels_ptr": "*u8", "prob_ptr": feat, **scalars}
    constants = {"P": 6, "BLOCK_P": 16, "BLOCK_C": 32, "BLOCK_R": 4, "BLOCK_W": 64, "BLOCK_Y": 16,
                 "BLOCK_X": 64, "WRITE_LOGITS": logits, "WRITE_LABELS": labels, "WRITE_PROB": prob}
    src = ASTSource(head_kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True})
"""


def test_triton_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, check=True, timeout=600)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.float16, 0.1), (torch.bfloat16, 0.3)])
def test_cuda_dtypes(impl, dtype, atol):
    qry, protos = make_inputs(2, 4, 5, 512, (53, 53), seed=4)
    expected = reference_logits(qry.to(dtype).float(), protos.to(dtype).float(), (417, 417))
    q, p = qry.to("cuda", dtype), protos.to("cuda", dtype)
    logits = match(q, p, (417, 417), impl=impl)
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float().cpu(), expected, rtol=0, atol=atol)
    labels, prob = segment(q, p, (417, 417), return_prob=True, impl=impl)
    assert prob.dtype == dtype
    differ = labels.long().cpu() != expected.argmax(dim=2)
    assert (top2_gap(expected)[differ] <= 2 * atol).all()
