"""fss.kernels.prototypes: every impl against the official upsample-then-pool loops.

Triton runs on CUDA when there is one, else on CPU under TRITON_INTERPRET=1 (small shapes).
Tolerances: fp32 rtol 1e-4 / atol 1e-5 (observed ~1e-7: only the summation order differs);
fp16 / bf16 (GPU) rtol = atol = 2e-2 against the fp32 reference.
"""

import importlib
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

from fss.kernels import prototypes  # noqa: E402
from fss.kernels.prototypes import prototypes_torch  # noqa: E402

IMPLS = ("torch", "native", "triton")
FP32_TOL = {"rtol": 1e-4, "atol": 1e-5}
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def device_of(impl):
    return "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"


def reference_prototypes(supp_feats, supp_fg, supp_bg, shot_mask=None):
    """The official computation, one episode, way and shot at a time: upsample, pool, average."""
    B, N, K = supp_feats.shape[:3]
    out = []
    for b in range(B):
        fg_protos, bg_sum = [], 0
        for n in range(N):
            shots = [k for k in range(K) if shot_mask is None or shot_mask[b, n, k]]
            fg_pool, bg_pool = 0, 0
            for k in shots:
                up = F.interpolate(
                    supp_feats[b, n, [k]], size=supp_fg.shape[-2:], mode="bilinear", align_corners=False
                )
                fg, bg = supp_fg[b, n, k].float(), supp_bg[b, n, k].float()
                fg_pool = fg_pool + (up * fg).sum(dim=(2, 3)) / (fg.sum() + 1e-5)
                bg_pool = bg_pool + (up * bg).sum(dim=(2, 3)) / (bg.sum() + 1e-5)
            fg_protos.append(fg_pool / len(shots))
            bg_sum = bg_sum + bg_pool / len(shots)
        out.append(torch.cat([bg_sum / N, *fg_protos]))
    return torch.stack(out)


def make_masks(kind, shape, gen):
    """fg / bg of ``shape`` (B x N x K x H x W): random bool, soft float, all-zero, all-one, single pixel."""
    if kind == "random":
        fg = torch.rand(shape, generator=gen) > 0.6
        return fg, ~fg
    if kind == "soft":
        fg = torch.rand(shape, generator=gen)
        return fg, 1 - fg
    if kind == "zero":  # no foreground pixel at all; background everywhere
        return torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)
    if kind == "one":
        return torch.ones(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)
    if kind == "pixel":  # one foreground pixel per shot, at a random place; ignore (0 in both) elsewhere
        fg = torch.zeros(shape, dtype=torch.bool)
        flat = fg.view(-1, shape[-2] * shape[-1])
        flat[torch.arange(flat.shape[0]), torch.randint(flat.shape[1], (flat.shape[0],), generator=gen)] = (
            True
        )
        bg = ~fg & (torch.rand(shape, generator=gen) > 0.5)
        return fg, bg
    raise ValueError(kind)


def random_shot_mask(B, N, K, gen):
    """Ragged shots: each way keeps a random number (>= 1) of leading shots."""
    counts = torch.randint(1, K + 1, (B, N, 1), generator=gen)
    return torch.arange(K) < counts


def make_inputs(B, N, K, C, hw, HW, masks="random", ragged=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, N, K, C, *hw, generator=gen)
    fg, bg = make_masks(masks, (B, N, K, *HW), gen)
    shot_mask = random_shot_mask(B, N, K, gen) if ragged else None
    return feats, fg, bg, shot_mask


def run(impl, feats, fg, bg, shot_mask, dtype=torch.float32):
    device = device_of(impl)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = prototypes(to(feats).to(dtype), to(fg), to(bg), to(shot_mask), impl=impl)
    assert out.dtype == dtype and out.device.type == device
    return out.float().cpu()


# (B, N, K, C, (h, w), (H, W)): the paper's 53 -> 417, 13 -> 97, 1 x 1 features, non-square, h, w not
# dividing H, W; N in {1, 2, 5}, K in {1, 3, 5}, B in {1, 3}.
SHAPES = [
    (1, 1, 1, 8, (53, 53), (417, 417)),
    (3, 2, 3, 8, (13, 13), (97, 97)),
    (1, 5, 1, 4, (1, 1), (9, 9)),
    (1, 2, 5, 8, (7, 9), (30, 41)),
    (3, 1, 1, 6, (5, 4), (5, 4)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-{s[4]}to{s[5]}")
def test_matches_official_loops(impl, shape):
    feats, fg, bg, _ = make_inputs(*shape)
    torch.testing.assert_close(
        run(impl, feats, fg, bg, None), reference_prototypes(feats, fg, bg), **FP32_TOL
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("masks", ["soft", "zero", "one", "pixel"])
def test_mask_kinds(impl, masks):
    feats, fg, bg, _ = make_inputs(2, 2, 3, 8, (6, 7), (25, 31), masks=masks, seed=1)
    torch.testing.assert_close(
        run(impl, feats, fg, bg, None), reference_prototypes(feats, fg, bg), **FP32_TOL
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_shots(impl):
    feats, fg, bg, shot_mask = make_inputs(3, 5, 3, 8, (6, 6), (29, 29), ragged=True, seed=2)
    shot_mask[0, 0] = torch.tensor([True, False, True])  # not only leading shots
    expected = reference_prototypes(feats, fg, bg, shot_mask)
    torch.testing.assert_close(run(impl, feats, fg, bg, shot_mask), expected, **FP32_TOL)
    # Padding shots do not matter, whatever they hold.
    feats[~shot_mask] = 1e6
    torch.testing.assert_close(run(impl, feats, fg, bg, shot_mask), expected, **FP32_TOL)


@pytest.mark.parametrize("impl", ["native", "triton"])
def test_gradient_matches_torch(impl):
    feats, fg, bg, shot_mask = make_inputs(2, 2, 3, 8, (5, 6), (17, 23), masks="soft", ragged=True, seed=3)
    weight = torch.randn(2, 3, 8)

    def grad(impl):
        device = device_of(impl)
        x = feats.to(device).requires_grad_()
        out = prototypes(x, fg.to(device), bg.to(device), shot_mask.to(device), impl=impl)
        (out * weight.to(device)).sum().backward()
        return x.grad.cpu()

    torch.testing.assert_close(grad(impl), grad("torch"), rtol=1e-4, atol=1e-6)


def test_torch_gradcheck():
    feats, fg, bg, shot_mask = make_inputs(1, 2, 2, 2, (2, 3), (5, 7), ragged=True, seed=4)
    feats = feats.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: prototypes_torch(x, fg, bg, shot_mask), (feats,))


def test_auto_uses_native_on_cpu(monkeypatch):
    module = importlib.import_module("fss.kernels.prototypes")  # the package attribute is the function

    calls = []
    native = module.prototypes_native
    monkeypatch.setattr(module, "prototypes_native", lambda *a: calls.append(1) or native(*a))
    feats, fg, bg, _ = make_inputs(1, 1, 1, 4, (3, 3), (7, 7))
    prototypes(feats, fg, bg)
    prototypes(feats.requires_grad_(), fg, bg).sum().backward()
    assert len(calls) == 2 and feats.grad is not None


def test_import_does_not_load_triton():
    code = "import sys, fss.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rejects_bad_inputs():
    feats, fg, bg, _ = make_inputs(1, 2, 2, 4, (3, 3), (7, 7))
    with pytest.raises(ValueError, match="supp_feats"):
        prototypes(feats[0], fg, bg)
    with pytest.raises(ValueError, match="supp_fg"):
        prototypes(feats, fg[:, :1], bg)
    with pytest.raises(ValueError, match="at least one valid shot"):
        prototypes(feats, fg, bg, shot_mask=torch.tensor([[[True, True], [False, False]]]))
    with pytest.raises(ValueError, match="impl"):
        prototypes(feats, fg, bg, impl="cuda")
    with pytest.raises(ValueError, match="mask"):
        prototypes(feats, fg.float().requires_grad_(), bg, impl="native")


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    N=st.integers(1, 3),
    K=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    up=st.integers(1, 5),
    extra=st.integers(0, 4),
    masks=st.sampled_from(["random", "soft", "zero", "pixel"]),
    ragged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_native_and_torch(B, N, K, h, w, up, extra, masks, ragged, seed):
    HW = (h * up + extra, w * up + (extra + 1) % 5)
    feats, fg, bg, shot_mask = make_inputs(B, N, K, 3, (h, w), HW, masks=masks, ragged=ragged, seed=seed)
    expected = reference_prototypes(feats, fg, bg, shot_mask)
    for impl in ("torch", "native"):
        torch.testing.assert_close(run(impl, feats, fg, bg, shot_mask), expected, **FP32_TOL)


@settings(max_examples=6, deadline=None)
@given(
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    H=st.integers(1, 20),
    W=st.integers(1, 20),
    seed=st.integers(0, 99),
)
def test_property_triton(h, w, H, W, seed):
    feats, fg, bg, shot_mask = make_inputs(1, 2, 2, 3, (h, w), (H, W), ragged=True, seed=seed)
    expected = reference_prototypes(feats, fg, bg, shot_mask)
    torch.testing.assert_close(run("triton", feats, fg, bg, shot_mask), expected, **FP32_TOL)


# Compiled for an H100 (sm_90) without a device: catches what the interpreter cannot (types, layouts).
COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fss.kernels.triton_prototypes import pool_masks_kernel, prototype_sums_kernel

def compile(kernel, signature, constants):
    src = ASTSource(kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True})

scalars = dict.fromkeys(["H", "W", "h", "w"], "i32")
scalars |= dict.fromkeys(["scale_h", "scale_w", "inv_scale_h"], "fp32")
for mask in ("*i1", "*fp32"):
    compile(pool_masks_kernel, {"fg_ptr": mask, "bg_ptr": mask, "pooled_ptr": "*fp32", **scalars},
            {"BLOCK_I": 16, "BLOCK_J": 64, "BLOCK_Y": 32, "BLOCK_X": 64})
for feat, has_shot_mask in (("*fp32", False), ("*bf16", True)):
    signature = {"feat_ptr": feat, "pooled_ptr": "*fp32", "valid_ptr": "*i1", "protos_ptr": feat,
                 "counts_ptr": "*fp32", "N": "i32", "K": "i32", "C": "i32", "HW": "i32", "eps": "fp32"}
    compile(prototype_sums_kernel, signature,
            {"HAS_SHOT_MASK": has_shot_mask, "BLOCK_C": 16, "BLOCK_Q": 256, "BLOCK_K": 8})
"""


def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, check=True, timeout=600)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_dtypes(impl, dtype):
    feats, fg, bg, shot_mask = make_inputs(2, 2, 5, 64, (53, 53), (417, 417), ragged=True, seed=5)
    expected = reference_prototypes(feats, fg, bg, shot_mask)
    tol = FP32_TOL if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    out = prototypes(*(t.cuda() for t in (feats.to(dtype), fg, bg, shot_mask)), impl=impl)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), expected, **tol)
