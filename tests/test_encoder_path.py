"""The default encoder path: ONNX Runtime from a verified, cached export on the CPU; torch where not."""

import json
import logging

import numpy as np
import pytest
import torch
from helpers import make_queries, make_support, random_model
from PIL import Image

import fss
from fss.errors import FssError
from fss.runtime import encoder_path
from fss.runtime.cli import main as fss_run
from fss.runtime.encoder_path import choose_encoder_path
from fss.runtime.segmenter import Segmenter
from fss.train.eval_cli import main as fss_eval

SIZE = 65
CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FSS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def count_exports(monkeypatch) -> list:
    calls = []
    from fss.export import build  # imported by cached_bundle when it runs

    original = build.export_model_bundle

    def counted(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(build, "export_model_bundle", counted)
    return calls


def test_auto_exports_once_per_checkpoint_and_size(cache, monkeypatch):
    exports = count_exports(monkeypatch)
    model = random_model(input_size=SIZE)
    first = choose_encoder_path(model, CPU, SIZE)
    assert first.backend == "onnxruntime" and str(cache) in first.reason
    assert first.model.meta == {**model.meta, "input_size": SIZE}
    again = choose_encoder_path(random_model(input_size=SIZE), CPU, SIZE)  # same weights: the cache
    assert again.backend == "onnxruntime" and len(exports) == 1
    choose_encoder_path(random_model(input_size=SIZE, seed=1), CPU, SIZE)  # other weights
    choose_encoder_path(model, CPU, 49)  # another size
    assert len(exports) == 3 and len(set(exports)) == 3
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model.encode(images)
    error = (first.model.encode(images) - reference).abs().max() / reference.abs().max()
    assert error < 1e-4


def test_damaged_cache_is_rebuilt(cache, monkeypatch, caplog):
    model = random_model(input_size=SIZE)
    choose_encoder_path(model, CPU, SIZE)
    (folder,) = (cache / "encoders").iterdir()
    data = folder / "encoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    exports = count_exports(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fss.runtime"):
        path = choose_encoder_path(model, CPU, SIZE)
    assert path.backend == "onnxruntime" and len(exports) == 1
    assert "damaged" in caplog.text and "encoder.onnx.data" in caplog.text


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("no-tools", "onnxscript not installed"),
        ("cache-is-a-file", "no verified ONNX graph"),
        ("adapting", "adaptation"),
        ("refused", "no verified ONNX graph: ONNX Runtime features differ"),
    ],
)
def test_auto_falls_back_to_torch_and_says_why(cache, monkeypatch, setup, reason):
    model = random_model(input_size=SIZE)
    if setup == "no-tools":
        monkeypatch.setattr(encoder_path, "missing_onnx_tools", lambda: ["onnxscript"])
    if setup == "cache-is-a-file":
        cache.parent.mkdir(exist_ok=True)
        cache.write_text("not a folder")
    if setup == "refused":
        from fss.export import verify

        monkeypatch.setitem(verify.TOLERANCE, "float32", 0.0)
    path = choose_encoder_path(model, CPU, SIZE, adapting=setup == "adapting")
    assert path.backend == "torch" and path.model is model and reason in path.reason
    with pytest.raises((FssError, OSError)):
        choose_encoder_path(model, CPU, SIZE, backend="onnxruntime", adapting=setup == "adapting")
    assert choose_encoder_path(model, CPU, SIZE, backend="torch").reason == "torch"
    if setup == "refused":  # remembered: not exported again
        monkeypatch.setitem(verify.TOLERANCE, "float32", 1e-4)
        assert choose_encoder_path(model, CPU, SIZE).backend == "torch"


def test_segmenter_default_path_masks_equal_torch(cache):
    rng = np.random.default_rng(0)
    model = random_model(input_size=SIZE)
    shots = [[(rng.random((50, 60, 3)) * 255).astype(np.uint8) for _ in range(2)]]
    masks = [[(rng.random((50, 60)) > 0.5).astype(np.uint8) for _ in range(2)]]
    queries = [(rng.random((41, 70, 3)) * 255).astype(np.uint8) for _ in range(5)]
    labels = {}
    for backend in ("auto", "torch"):
        seg = Segmenter(model, size=SIZE, batch=2, backend=backend)
        seg.set_support(shots, masks, ["thing"])
        labels[seg.backend] = seg.segment(queries)
    assert set(labels) == {"onnxruntime", "torch"}
    for ours, reference in zip(labels["onnxruntime"], labels["torch"], strict=True):
        assert (ours == reference).mean() >= 0.999


def test_fss_run_says_which_path_and_records_it(tmp_path, cache, capsys):
    ckpt = tmp_path / "model.pt"
    fss.save_checkpoint(random_model(input_size=SIZE), ckpt)
    support, query = make_support(tmp_path / "s"), make_queries(tmp_path / "q", 3)
    common = ["--support", support, "--query", query, "--ckpt", ckpt, "--no-overlays"]
    outs = {}
    for backend in ("auto", "torch"):
        outs[backend] = tmp_path / backend
        assert fss_run([str(a) for a in [*common, "--backend", backend, "--out", outs[backend]]]) == 0
        err = capsys.readouterr().err
        expected = "onnxruntime (verified graph cached in" if backend == "auto" else "encoder: torch"
        assert expected in err
        settings = json.loads((outs[backend] / "results.json").read_text())["settings"]
        assert settings["backend"] == ("onnxruntime" if backend == "auto" else "torch")
    for i in range(3):
        ours, reference = (np.asarray(Image.open(outs[b] / f"q{i}.png")) for b in ("auto", "torch"))
        assert (ours == reference).mean() >= 0.999
    # a resumed run with the other path recomputes: results made by another backend are not reused
    assert fss_run([str(a) for a in [*common, "--out", outs["torch"]]]) == 2
    assert "another --backend" in capsys.readouterr().err


def test_fss_eval_backend_in_settings(tmp_path, cache, capsys):
    from test_train import SIZE as SHAPES_SIZE
    from test_train import make_shapes

    ckpt = tmp_path / "model.pt"
    fss.save_checkpoint(random_model(input_size=SHAPES_SIZE), ckpt)
    data = make_shapes(tmp_path / "shapes", per_class=4)
    common = ["--ckpt", ckpt, "--data", data, "--runs", "1", "--episodes", "6"]
    scores = {}
    for backend in ("auto", "torch"):
        out = tmp_path / f"{backend}.json"
        assert (
            fss_eval([str(a) for a in [*common, "--backend", backend, "--json", out, "--no-progress"]]) == 0
        )
        result = json.loads(out.read_text())
        assert result["settings"]["backend"] == backend
        scores[backend] = result["mean_iou"]
    assert "encoder: onnxruntime (verified graph cached in" in capsys.readouterr().err
    assert scores["auto"] == pytest.approx(scores["torch"], abs=0.02)


def test_fss_run_bf16_is_opt_in_torch_and_a_setting(tmp_path, cache, capsys):
    ckpt = tmp_path / "model.pt"
    fss.save_checkpoint(random_model(input_size=SIZE), ckpt)
    support, query = make_support(tmp_path / "s"), make_queries(tmp_path / "q", 2)
    common = [
        "--support",
        support,
        "--query",
        query,
        "--ckpt",
        ckpt,
        "--no-overlays",
        "--out",
        tmp_path / "o",
    ]
    assert fss_run([str(a) for a in [*common, "--precision", "bf16"]]) == 0
    assert "encoder: torch (bf16)" in capsys.readouterr().err
    settings = json.loads((tmp_path / "o" / "results.json").read_text())["settings"]
    assert settings["precision"] == "bf16" and settings["backend"] == "torch"
    assert fss_run([str(a) for a in [*common, "--backend", "torch"]]) == 2  # fp32 masks are not bf16 ones
    assert "another --precision" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fss_run([str(a) for a in [*common, "--precision", "bf16", "--backend", "onnxruntime"]])


def test_same_weights_other_method_is_another_cache_entry(cache):
    """The bundle's manifest carries the model's meta (method, classes, ...): it is part of the key."""
    panet = random_model(input_size=SIZE)
    prnet = random_model(input_size=SIZE)
    prnet.meta["method"] = "prnet"
    assert choose_encoder_path(panet, CPU, SIZE).model.meta["method"] == "panet"
    assert choose_encoder_path(prnet, CPU, SIZE).model.meta["method"] == "prnet"
