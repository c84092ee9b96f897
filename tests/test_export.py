"""fss-export: ONNX bundles verified against eager PyTorch, refused above tolerance, clean user errors.

Narrow encoders (width 0.125) at 65 x 65 keep each export + verification to a few seconds.
"""

import json
import shutil
import sys
import types

import onnx
import pytest
import torch
from helpers import official_snapshot, random_model

import fss
from fss.backends.bundle_format import MANIFEST_FILE, ONNX_FILE, sha256_file
from fss.backends.bundle_model import load_bundle
from fss.backends.sessions import OnnxRuntimeEncoder, tensorrt_missing
from fss.export import verify
from fss.export.build import export_bundle
from fss.export.cli import main
from fss.export.onnx import check_graph, export_onnx
from fss.export.tensorrt import build_engine
from fss.models.encoders import get_encoder

SIZE = 65


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "narrow.pt"
    fss.save_checkpoint(random_model(input_size=SIZE), path, classes=["cat", "dog"])
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "narrow-bundle"
    assert main(["--ckpt", str(checkpoint), "--out", str(out)]) == 0
    return out


def test_manifest_describes_the_bundle(bundle, checkpoint):
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["format"] == "fss-bundle" and manifest["format_version"] == 1
    assert manifest["meta"] == fss.load_model(checkpoint).meta
    assert manifest["meta"]["classes"] == ["cat", "dog"] and manifest["meta"]["input_size"] == SIZE
    assert manifest["onnx"] == {
        "file": ONNX_FILE,
        "dtype": "float32",
        "opset": 18,
        "ops": ["Conv", "MaxPool", "Relu"],
        "shapes": {"images": ["batch", 3, SIZE, SIZE], "features": ["batch", 64, 9, 9]},
        "dynamic_axes": {"images": {"0": "batch"}, "features": {"0": "batch"}},
    }
    assert manifest["tensorrt"] is None
    on_disk = {p.name for p in bundle.iterdir()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk == {ONNX_FILE, ONNX_FILE + ".data"}
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    report = manifest["verification"]["onnxruntime"]
    assert report["precision"] == "float32" and report["tolerance"] == verify.TOLERANCE["float32"]
    assert {name: r["batch"] for name, r in report["inputs"].items()} == {"random": 2, "smooth": 1}
    assert 0 <= report["max_relative_error"] <= report["tolerance"]
    assert manifest["verification"]["reference"] == verify.REFERENCE
    assert set(manifest["tools"]) >= {"torch", "onnx", "onnxscript", "onnxruntime", "fss"}
    assert manifest["source_checkpoint"] == {"file": checkpoint.name, "sha256": sha256_file(checkpoint)}


def test_onnx_graph_is_what_tensorrt_consumes(bundle):
    graph = check_graph(bundle / ONNX_FILE, get_encoder("vgg16-dilated").onnx_ops)
    assert graph["opset"] == 18 and set(graph["ops"]) <= {"Conv", "MaxPool", "Relu"}
    assert graph["dynamic_axes"]["images"] == {"0": "batch"}
    model = onnx.load(str(bundle / ONNX_FILE))
    assert all(node.domain == "" for node in model.graph.node)  # standard operators only
    assert len(model.graph.initializer) == 26  # 13 convs, weights in encoder.onnx.data
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_float16_graph_for_tensorrt_runs_within_tolerance(tmp_path):
    """The graph ``--trt --fp16`` hands TensorRT: float32 in and out, float16 weights and convs."""
    model = random_model(input_size=SIZE)
    graph = export_onnx(
        model.encoder, tmp_path / "fp16.onnx", SIZE, get_encoder("vgg16-dilated").onnx_ops, float16=True
    )
    assert set(graph["ops"]) == {"Cast", "Conv", "MaxPool", "Relu"}
    proto = onnx.load(str(tmp_path / "fp16.onnx"))
    assert {init.data_type for init in proto.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    inputs = verify.verification_inputs(SIZE, model.meta["normalisation"])
    with torch.inference_mode():
        references = {name: model.encode(x) for name, x in inputs.items()}
    encoder = OnnxRuntimeEncoder(tmp_path / "fp16.onnx")
    verify.verify_encoder("ONNX Runtime", encoder.encode, inputs, references, precision="float16")


def test_official_snapshot_exports_and_replaces_an_existing_bundle(bundle, tmp_path):
    model = random_model(seed=1)
    torch.save(official_snapshot(model), tmp_path / "30000.pth")
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    notes = []
    path, manifest = export_bundle(tmp_path / "30000.pth", out, size=SIZE, fp16=True, log=notes.append)
    assert path == out and json.loads((out / MANIFEST_FILE).read_text()) == manifest
    assert any("--fp16 applies to TensorRT engines" in note for note in notes)
    assert manifest["meta"]["width"] == 0.125 and manifest["meta"]["input_size"] == SIZE
    assert manifest["source_checkpoint"]["sha256"] == sha256_file(tmp_path / "30000.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["30000.pth", "bundle"]  # no staging left
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected = model.encode(images)
    torch.testing.assert_close(load_bundle(out).encode(images), expected, rtol=1e-4, atol=1e-4)


def test_refused_above_tolerance_writes_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    exact = OnnxRuntimeEncoder.encode
    monkeypatch.setattr(OnnxRuntimeEncoder, "encode", lambda self, images: exact(self, images) * 1.01)
    assert main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "bundle")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        "fss-export: error: ONNX Runtime features differ from eager PyTorch: relative error"
    )
    assert "bundle refused" in error
    assert list(tmp_path.iterdir()) == []


def test_trt_without_tensorrt_exits_2_with_one_line(checkpoint, tmp_path, capsys):
    if tensorrt_missing("--trt") is None:
        pytest.skip("TensorRT and CUDA are present: --trt builds an engine here")
    assert main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "bundle"), "--trt", "--fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fss-export: error: --trt needs ")
    assert "pip install 'fss[gpu]'" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing-checkpoint", "checkpoint not found"),
        ("foreign-output", "output directory exists and is not an fss bundle"),
        ("opset-the-exporter-cannot-write", "the ONNX exporter cannot write opset 13"),
    ],
)
def test_user_errors_exit_2_with_one_line(checkpoint, tmp_path, capsys, case, message):
    args = ["--ckpt", str(checkpoint), "--out", str(tmp_path / "out")]
    if case == "missing-checkpoint":
        args[1] = str(tmp_path / "absent.pth")
    elif case == "foreign-output":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("mine")
    else:
        args += ["--opset", "13"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fss-export: error: ") and message in err[-1]
    assert not (tmp_path / "out").exists() or [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def fake_tensorrt(parses: bool):
    """Just the TensorRT 10/11 builder API that ``build_engine`` uses, recording the calls made."""
    calls = []

    class Recorder:
        def __init__(self, name, **returns):
            self.name, self.returns = name, returns

        def __getattr__(self, method):
            def call(*args):
                calls.append((f"{self.name}.{method}", args))
                return self.returns.get(method)

            return call

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    parser = Recorder("parser", parse_from_file=parses, get_error="Conv: unsupported")
    parser.num_errors = 1
    builder = Recorder(
        "builder",
        create_network="network",
        create_builder_config=Recorder("config"),
        create_optimization_profile=Recorder("profile"),
        build_serialized_network=b"serialised engine",
    )
    module = types.SimpleNamespace(
        __version__="10.99",
        Logger=Logger,
        Builder=lambda logger: builder,
        OnnxParser=lambda network, logger: parser,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
        BuilderFlag=types.SimpleNamespace(TF32="TF32"),
    )
    return module, calls


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_engine_building_with_a_fake_tensorrt(bundle, tmp_path, monkeypatch, precision):
    """The builder calls ``--trt`` makes, against a stand-in for TensorRT's API (the real one is not
    installable here): strongly typed network, TF32 off for float32, one profile 1..max_batch."""
    module, calls = fake_tensorrt(parses=True)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    entry = build_engine(bundle / ONNX_FILE, tmp_path / "encoder.engine", SIZE, 4, precision)
    assert (tmp_path / "encoder.engine").read_bytes() == b"serialised engine"
    profile = {"min": [1, 3, SIZE, SIZE], "opt": [4, 3, SIZE, SIZE], "max": [4, 3, SIZE, SIZE]}
    assert entry == {
        "engine": "encoder.engine",
        "precision": precision,
        "profile": profile,
        "tensorrt_version": "10.99",
        "device": "NVIDIA H100",
        "compute_capability": "9.0",
    }
    assert ("builder.create_network", (1 << 1,)) in calls
    assert ("parser.parse_from_file", (str(bundle / ONNX_FILE),)) in calls
    assert (("config.clear_flag", ("TF32",)) in calls) == (precision == "float32")
    assert ("profile.set_shape", ("images", *map(tuple, profile.values()))) in calls

    module, _ = fake_tensorrt(parses=False)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    with pytest.raises(verify.VerificationError, match="ONNX parser rejects the graph: Conv: unsupported"):
        build_engine(bundle / ONNX_FILE, tmp_path / "other.engine", SIZE, 4, precision)


@pytest.mark.gpu
def test_tensorrt_engine_matches_eager(checkpoint, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out, manifest = export_bundle(checkpoint, tmp_path / "bundle", trt=True, fp16=True, max_batch=4)
    engine = manifest["tensorrt"]
    assert engine["precision"] == "float16" and engine["profile"]["max"] == [4, 3, SIZE, SIZE]
    assert manifest["verification"]["tensorrt"]["max_relative_error"] <= verify.TOLERANCE["float16"]
    loaded = load_bundle(out, backend="tensorrt")
    images = torch.randn(6, 3, SIZE, SIZE)  # above max_batch: split into two engine calls
    with torch.inference_mode():
        expected = fss.load_model(checkpoint).encode(images)
    features = loaded.encode(images).cpu()
    assert verify.feature_errors(features, expected)["relative_error"] <= verify.TOLERANCE["float16"]
