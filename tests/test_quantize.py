"""The opt-in int8 encoder: fss-export --int8 PHOTOS, fss-run / fss-eval --int8, and their refusals."""

import json

import numpy as np
import pytest
import torch
from helpers import make_queries, make_support, random_model
from PIL import Image

import fss
from fss.backends.sessions import OnnxRuntimeEncoder, needs_exact_int8_entry
from fss.errors import FssError
from fss.export.build import export_bundle
from fss.export.cli import main as fss_export
from fss.export.onnx import INPUT_NAME, OUTPUT_NAME
from fss.export.quantize import QUANTISATION, calibration_photos, quantize_encoder
from fss.runtime.cli import main as fss_run

SIZE = 65


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    ckpt = root / "model.pt"
    fss.save_checkpoint(random_model(input_size=SIZE), ckpt)
    photos = make_queries(root / "photos", n=6, seed=7)
    assert fss_export(["--ckpt", str(ckpt), "--out", str(root / "bundle"), "--int8", str(photos)]) == 0
    return root / "bundle"


def test_bundle_carries_a_verified_int8_encoder(int8_bundle):
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    entry = manifest["int8"]
    assert entry["file"] in manifest["files"] and entry["calibration_photos"] == 6
    assert {key: entry[key] for key in QUANTISATION} == QUANTISATION  # how it was quantised and is run
    report = manifest["verification"]["onnxruntime_int8"]
    assert report["precision"] == "int8" and set(report["inputs"]) == {"smooth"}
    assert 0 < report["max_relative_error"] <= report["tolerance"]  # quantised: close, not equal
    assert fss.load_model(int8_bundle).backend == "onnxruntime"  # float32 unless asked


def test_fss_run_int8_masks_close_to_float32(int8_bundle, tmp_path, capsys):
    support, query = make_support(tmp_path / "s"), make_queries(tmp_path / "q", n=4, seed=3)
    common = ["--support", support, "--query", query, "--bundle", int8_bundle, "--no-overlays"]
    for name, extra in (("fp32", []), ("int8", ["--int8"])):
        assert fss_run([str(a) for a in [*common, *extra, "--out", tmp_path / name]]) == 0
    assert (
        "onnxruntime-int8"
        in json.loads((tmp_path / "int8" / "results.json").read_text())["settings"]["backend"]
    )
    agreement = [
        (
            np.asarray(Image.open(tmp_path / "int8" / f"q{i}.png"))
            == np.asarray(Image.open(tmp_path / "fp32" / f"q{i}.png"))
        ).mean()
        for i in range(4)
    ]
    # Seeded (model, photos): 0.984 here with exact int8 products, which every x86-64 CPU now computes
    # (0.891 with AVX2's saturating u8s8 kernels); real photos: docs/performance.md.
    assert min(agreement) >= 0.95
    # a resumed run never takes float32 masks for int8 ones
    assert fss_run([str(a) for a in [*common, "--out", tmp_path / "int8"]]) == 2
    assert "another --backend" in capsys.readouterr().err


def test_int8_refusals_are_one_line(int8_bundle, tmp_path, capsys):
    support, query = make_support(tmp_path / "s"), make_queries(tmp_path / "q", n=1)
    common = ["--support", str(support), "--query", str(query), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:  # argparse: --int8 needs a bundle
        fss_run([*common, "--int8"])
    assert exit_info.value.code == 2
    ckpt = tmp_path / "model.pt"
    fss.save_checkpoint(random_model(input_size=SIZE), ckpt)
    plain, _ = export_bundle(ckpt, tmp_path / "plain")
    capsys.readouterr()
    assert fss_run([*common, "--bundle", str(plain), "--int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no int8 encoder" in err and "fss-export --int8" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fss_export(["--ckpt", str(ckpt), "--out", str(tmp_path / "b2"), "--int8", str(empty)]) == 2
    assert "calibration folder has no images" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()


def test_calibration_photos_leave_out_support_masks(tmp_path):
    support = make_support(tmp_path / "s", shots=(3, 2))
    photos = calibration_photos(support)
    assert len(photos) == 5 and all(p.suffix == ".jpg" for p in photos)
    with pytest.raises(FssError, match="not found"):
        calibration_photos(tmp_path / "missing")


def test_int8_products_are_exact_on_every_cpu(tmp_path):
    """The pattern that saturates u8s8 kernels without VNNI (uint8 255 x int8 127, twice, > 2^15 - 1)
    comes out exact: a 1 x 1 convolution of ones over 64 channels, quantised as fss-export does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    channels = 64
    weights = numpy_helper.from_array(np.ones((8, channels, 1, 1), np.float32), "weights")
    graph = helper.make_graph(
        [helper.make_node("Conv", [INPUT_NAME, "weights"], [OUTPUT_NAME])],
        "ones",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", channels, 4, 4])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 8, 4, 4])],
        [weights],
    )
    fp32 = tmp_path / "ones.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    ones = torch.ones(1, channels, 4, 4)
    quantize_encoder(fp32, tmp_path / "ones-int8.onnx", [ones])  # calibrated: 1.0 -> 255, weights -> 127
    features = OnnxRuntimeEncoder(tmp_path / "ones-int8.onnx", "cpu").encode(ones)
    # exact: 64 up to the output's 8-bit step; saturated pairs give about half (32767 / 64770)
    assert torch.allclose(features, torch.full_like(features, channels), rtol=0.01)


def test_exact_kernels_are_asked_for_unless_the_cpu_has_vnni():
    avx2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
    assert needs_exact_int8_entry(avx2) and needs_exact_int8_entry(avx2 | {"avx512f", "avx512bw"})
    assert not needs_exact_int8_entry(avx2 | {"avx512f", "avx512bw", "avx512_vnni"})
    assert not needs_exact_int8_entry(avx2 | {"avx_vnni"})
    assert needs_exact_int8_entry(None)  # flags unknown: the safe kernels
