"""Bundles at run time: refused before any work when wrong; ONNX Runtime masks agree with torch's."""

import json
import shutil

import pytest
import torch
from helpers import random_model

import fss
from fss import kernels
from fss.backends.bundle_format import MANIFEST_FILE, ONNX_FILE
from fss.backends.bundle_model import load_bundle
from fss.backends.sessions import OnnxRuntimeEncoder, TorchEncoder, onnxruntime_has_cuda, tensorrt_missing
from fss.errors import FssError
from fss.export.build import export_bundle
from fss.export.verify import smooth_images

SIZE = 65


@pytest.fixture(scope="module")
def model():
    return random_model(input_size=SIZE, seed=2)


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    fss.save_checkpoint(model, root / "model.pt")
    out, _ = export_bundle(root / "model.pt", root / "bundle")
    return out


@pytest.fixture
def bundle_copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "bundle")


def edit_manifest(bundle_dir, edit) -> None:
    path = bundle_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def refusal(bundle_dir, **kwargs) -> str:
    with pytest.raises(FssError) as info:
        load_bundle(bundle_dir, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bundle_model_has_the_checkpoint_meta_and_features(bundle, model):
    loaded = load_bundle(bundle)
    assert (loaded.backend, loaded.device.type) == ("onnxruntime", "cpu")
    assert loaded.meta == model.meta and loaded.feature_channels == model.encoder.out_channels == 64
    assert loaded.scale == model.scale == 20.0 and loaded.impl == "auto"
    assert loaded.to("cpu").eval() is loaded
    images = torch.randn(5, 3, SIZE, SIZE)
    torch.testing.assert_close(
        loaded.encode(images), TorchEncoder(model).encode(images), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match=f"M x 3 x {SIZE} x {SIZE}"):
        loaded.encode(torch.randn(1, 3, 33, 33))


def test_changed_byte_is_refused(bundle_copy):
    weights = bundle_copy / (ONNX_FILE + ".data")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    message = refusal(bundle_copy)
    assert "does not match its sha256" in message and str(weights) in message


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / ONNX_FILE).unlink()
    assert refusal(bundle_copy) == f"bundle file missing ({bundle_copy / ONNX_FILE})"


def test_unknown_format_version_is_refused(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.update(format_version=99))
    assert "unknown bundle format version 99: this fss reads version 1" in refusal(bundle_copy)


def test_directory_without_manifest_is_refused(tmp_path):
    assert refusal(tmp_path) == f"not an fss bundle: no manifest.json ({tmp_path})"


def test_other_input_size_is_refused(bundle):
    assert "bundle was built for input size 65, not 97" in refusal(bundle, input_size=97)
    assert load_bundle(bundle, input_size=SIZE).meta["input_size"] == SIZE


def test_backend_choices(bundle):
    assert "backend torch runs checkpoints" in refusal(bundle, backend="torch")
    assert "no TensorRT engine" in refusal(bundle, backend="tensorrt")
    assert "unknown backend 'tvm'" in refusal(bundle, backend="tvm")


def test_engine_without_tensorrt(bundle_copy):
    if tensorrt_missing("tensorrt") is None:
        pytest.skip("TensorRT and CUDA are present")
    engine = {"engine": "encoder.engine", "tensorrt_version": "10.0", "compute_capability": "9.0"}
    edit_manifest(bundle_copy, lambda m: m.update(tensorrt=engine))
    assert load_bundle(bundle_copy).backend == "onnxruntime"  # auto falls back
    assert refusal(bundle_copy, backend="tensorrt").startswith("the tensorrt backend needs ")


def test_onnxruntime_on_cuda_needs_the_cuda_provider(bundle):
    if onnxruntime_has_cuda():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(FssError, match="pip install onnxruntime-gpu"):
        OnnxRuntimeEncoder(bundle / ONNX_FILE, "cuda")


def random_episode(generator, ways, shots, queries):
    """Smooth images (noise has no structure to segment) and box masks: one 1 x N x K episode."""
    supp = smooth_images(ways * shots, SIZE, generator).view(1, ways, shots, 3, SIZE, SIZE)
    qry = smooth_images(queries, SIZE, generator)[None]
    fg = torch.zeros(1, ways, shots, SIZE, SIZE)
    for n in range(ways):
        for k in range(shots):
            y, x = torch.randint(0, SIZE // 2, (2,), generator=generator).tolist()
            fg[0, n, k, y : y + SIZE // 3, x : x + SIZE // 3] = 1
    bg = 1 - fg.amax(dim=1, keepdim=True).expand_as(fg)  # background: no way's class
    return supp, fg, bg, qry


@pytest.mark.parametrize("seed", range(6))
def test_masks_agree_with_torch(bundle, model, seed):
    generator = torch.Generator().manual_seed(seed)
    ways, shots = 1 + seed % 2, 1 + seed % 3
    supp, fg, bg, qry = random_episode(generator, ways, shots, queries=2)
    masks = []
    for encoder in (TorchEncoder(model), load_bundle(bundle)):
        supp_feats = encoder.encode(supp.flatten(0, 2)).unflatten(0, (1, ways, shots))
        qry_feats = encoder.encode(qry.flatten(0, 1))[None]
        protos = kernels.prototypes(supp_feats, fg, bg)
        masks.append(kernels.segment(qry_feats, protos, (SIZE, SIZE)))
    agreement = (masks[0] == masks[1]).float().mean().item()
    assert agreement >= 0.999, agreement


def test_bundle_model_logits_match_panet(bundle, model):
    supp, fg, bg, qry = random_episode(torch.Generator().manual_seed(7), ways=2, shots=2, queries=3)
    shot_mask = torch.tensor([[[True, True], [True, False]]])
    with torch.inference_mode():
        expected = model(supp, fg, bg, qry, shot_mask)
    logits = load_bundle(bundle)(supp, fg, bg, qry, shot_mask)
    assert logits.shape == (1, 3, 3, SIZE, SIZE)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
