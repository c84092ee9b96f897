"""The default encoder path: ONNX Runtime from a verified, cached export on the CPU; torch where not."""

import json
import logging
import subprocess

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
    choose_encoder_path(fss.load_model(ckpt), CPU, SIZE)  # warm: a small job takes a cached graph
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
    # results made by another backend are not reused; auto continues a folder with its path
    assert fss_run([str(a) for a in [*common, "--backend", "onnxruntime", "--out", outs["torch"]]]) == 2
    assert "another --backend" in capsys.readouterr().err
    assert fss_run([str(a) for a in [*common, "--out", outs["torch"]]]) == 0
    assert "continuing results made with torch" in capsys.readouterr().err


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


# -- the first run of a new checkpoint --------------------------------------------------------------------
SMALL_JOB = 5  # images: far below any encoder's break-even


@pytest.fixture
def launched(monkeypatch):
    """Background exporters recorded, not started."""
    commands = []
    monkeypatch.setattr(encoder_path, "launch_exporter", commands.append)
    return commands


@pytest.fixture
def in_process_exporter(monkeypatch):
    """Background exporters run at once in this process (the real process is tested once, below)."""
    from fss.runtime import background_export

    commands = []
    monkeypatch.setattr(background_export, "idle_priority", lambda: None)

    def run_now(command):
        commands.append(command)
        threads = torch.get_num_threads()
        try:
            assert command[1:3] == ["-c", encoder_path.EXPORTER_BOOT]
            assert background_export.main(command[3:]) == 0
        finally:
            torch.set_num_threads(threads)

    monkeypatch.setattr(encoder_path, "launch_exporter", run_now)
    return commands


def test_export_first_only_where_the_job_repays_it():
    model = random_model(input_size=SIZE)
    assert encoder_path.export_pays(model, None)  # a long-lived caller: always
    for prefix, gain in encoder_path.EXPORT_GAINS.items():
        model.meta["encoder"] = f"{prefix}-variant"
        images = gain.break_even_images()
        # at the break-even, export + images ORT passes cost no more than images torch passes
        assert gain.export_passes + images / gain.speedup <= images
        assert gain.export_passes + (images - 1) / gain.speedup > images - 1
        assert encoder_path.export_pays(model, images) and not encoder_path.export_pays(model, images - 1)
    model.meta["encoder"] = "unmeasured-encoder"
    assert not encoder_path.export_pays(model, 10**9) and encoder_path.export_pays(model, None)


def test_small_job_runs_torch_and_exports_in_background(cache, monkeypatch, in_process_exporter):
    exports = count_exports(monkeypatch)
    model = random_model(input_size=SIZE)
    cold = choose_encoder_path(model, CPU, SIZE, images=SMALL_JOB)
    assert cold.backend == "torch" and cold.model is model and "background" in cold.reason
    assert len(in_process_exporter) == 1 and len(exports) == 1
    assert not any((cache / "jobs").iterdir())  # the job's checkpoint is removed once read
    warm = choose_encoder_path(random_model(input_size=SIZE), CPU, SIZE, images=SMALL_JOB)
    assert warm.backend == "onnxruntime" and len(exports) == 1 and len(in_process_exporter) == 1
    continued = choose_encoder_path(model, CPU, SIZE, images=SMALL_JOB, continuing="torch")
    assert continued.backend == "torch" and "continuing" in continued.reason


def test_background_exporter_refuses_a_model_of_another_key(cache, monkeypatch, launched):
    from fss.runtime import background_export

    model = random_model(input_size=SIZE)
    choose_encoder_path(model, CPU, SIZE, images=SMALL_JOB)
    (command,) = launched
    job, folder, size = command[3:]
    fss.save_checkpoint(random_model(input_size=SIZE, seed=1), job)  # not the model the key names
    monkeypatch.setattr(background_export, "idle_priority", lambda: None)
    exports = count_exports(monkeypatch)
    threads = torch.get_num_threads()
    try:
        assert background_export.main([job, folder, size]) == 1
    finally:
        torch.set_num_threads(threads)
    assert exports == [] and not (cache / "encoders").exists()
    assert not any((cache / "jobs").iterdir())


@pytest.fixture(scope="module")
def exported_entry(tmp_path_factory):
    """One verified cache entry of ``random_model(input_size=SIZE)``, copied by the tests that damage it."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FSS_CACHE_DIR", str(root))
        choose_encoder_path(random_model(input_size=SIZE), CPU, SIZE)
    (folder,) = (root / "encoders").iterdir()
    return folder


def edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage", ["staged-only", "missing-file", "unverified", "no-verification", "another-digest"]
)
def test_unverified_or_half_written_entry_is_never_used(cache, exported_entry, launched, damage):
    import shutil

    encoders = cache / "encoders"
    encoders.mkdir(parents=True)
    folder = encoders / exported_entry.name
    if damage == "staged-only":  # an exporter killed before its rename: complete, but not published
        shutil.copytree(exported_entry, encoders / f".{folder.name}.x1y2.tmp")
    else:
        shutil.copytree(exported_entry, folder)
    if damage == "missing-file":  # e.g. a copy of the cache cut short
        (folder / "encoder.onnx.data").unlink()
    if damage == "unverified":
        edit_manifest(folder, lambda m: m["verification"]["onnxruntime"].update(max_relative_error=1.0))
    if damage == "no-verification":
        edit_manifest(folder, lambda m: m.pop("verification"))
    if damage == "another-digest":  # another model's verified entry under this model's key
        edit_manifest(folder, lambda m: m["source_checkpoint"].update(encoder_digest="0" * 40))
    path = choose_encoder_path(random_model(input_size=SIZE), CPU, SIZE, images=SMALL_JOB)
    assert path.backend == "torch" and "background" in path.reason and len(launched) == 1


def test_exporter_replaces_damaged_and_staged_leftovers(cache, exported_entry, monkeypatch):
    import shutil

    encoders = cache / "encoders"
    encoders.mkdir(parents=True)
    staged = encoders / f".{exported_entry.name}.x1y2.tmp"
    shutil.copytree(exported_entry, staged)
    shutil.copytree(exported_entry, encoders / exported_entry.name)
    edit_manifest(encoders / exported_entry.name, lambda m: m.pop("verification"))
    exports = count_exports(monkeypatch)
    path = choose_encoder_path(random_model(input_size=SIZE), CPU, SIZE)  # exports in the foreground
    assert path.backend == "onnxruntime" and len(exports) == 1 and not staged.exists()
    encoder_path.check_verified_entry(encoders / exported_entry.name)


def test_one_exporter_at_a_time(cache, monkeypatch, launched):
    exports = count_exports(monkeypatch)
    model = random_model(input_size=SIZE)
    folder = encoder_path.cache_folder(model, SIZE)
    with encoder_path.export_lock(folder, wait=False) as held:  # as another process would hold it
        assert held
        for images, reason in [(SMALL_JOB, "running already"), (None, "another process is exporting")]:
            path = choose_encoder_path(model, CPU, SIZE, images=images)  # no second exporter, no wait
            assert path.backend == "torch" and reason in path.reason
    with encoder_path.export_lock(encoder_path.exporter_slot(folder), wait=False):  # exporting another
        path = choose_encoder_path(model, CPU, SIZE, images=SMALL_JOB)
        assert path.backend == "torch" and "export is running already" in path.reason
    assert exports == [] and launched == []


def test_background_exporter_process(cache, monkeypatch, no_background_exports):
    """The real thing: a separate process at idle priority which waits for the end of the job (here: its
    stdin closed, as when this process exits), then caches the graph."""
    monkeypatch.setattr(encoder_path, "launch_exporter", no_background_exports)
    model = random_model(input_size=SIZE)
    path = choose_encoder_path(model, CPU, SIZE, images=SMALL_JOB)
    assert path.backend == "torch" and "background" in path.reason
    exporter = encoder_path.BACKGROUND[-1]
    with pytest.raises(subprocess.TimeoutExpired):
        exporter.wait(timeout=1)  # waiting for the job
    assert not (cache / "encoders").exists()
    exporter.stdin.close()  # the job ends
    assert exporter.wait(timeout=120) == 0
    assert choose_encoder_path(model, CPU, SIZE, images=SMALL_JOB).backend == "onnxruntime"
    assert not any((cache / "jobs").iterdir())


def test_fss_run_first_run_of_a_checkpoint_and_its_resume(tmp_path, cache, capsys, in_process_exporter):
    ckpt = tmp_path / "model.pt"
    fss.save_checkpoint(random_model(input_size=SIZE), ckpt)
    support, query = make_support(tmp_path / "s"), make_queries(tmp_path / "q", 2)
    common = ["--support", support, "--query", query, "--ckpt", ckpt, "--no-overlays"]

    def run(out, *extra):
        code = fss_run([str(a) for a in [*common, "--out", out, *extra]])
        settings = json.loads((out / "results.json").read_text())["settings"]
        return code, settings["backend"], capsys.readouterr().err

    code, backend, err = run(tmp_path / "cold")
    assert (code, backend) == (0, "torch") and "exported in the background" in err
    make_queries(tmp_path / "q", 3)  # one more query: the folder is resumed on a warm cache
    code, backend, err = run(tmp_path / "cold")
    assert (code, backend) == (0, "torch") and "continuing results made with torch" in err
    assert "1 segmented, 2 already done" in err
    assert run(tmp_path / "cold", "--overwrite")[:2] == (0, "onnxruntime")
    assert run(tmp_path / "warm")[:2] == (0, "onnxruntime")
    assert len(in_process_exporter) == 1
