"""Checkpoints that cannot work are refused up front; training stops at the first non-finite value;
every command keeps the error promise through one runner."""

import errno
import math
import os
import zipfile

import pytest
import torch
from helpers import make_queries, make_support, official_snapshot, random_model
from test_train import SIZE, make_shapes

import fss
from fss.checkpoint import checkpoint_dict
from fss.command import run_command
from fss.errors import CheckpointError, FssError, summary
from fss.validation import INFLATION_SLACK, MAX_INFLATION, check_meta


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=4)


def saved(tmp_path, obj, name="m.pt"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def fss_ckpt(**meta):
    return checkpoint_dict(random_model(), **meta)


# -- 4. checkpoints ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(tmp_path, value):
    ckpt = fss_ckpt()
    ckpt["state_dict"]["encoder.features.4.2.weight"][0, 0, 0, 0] = value
    with pytest.raises(CheckpointError, match=r"not finite: encoder.features.4.2.weight holds NaN or Inf"):
        fss.load_model(saved(tmp_path, ckpt))
    snapshot = official_snapshot(random_model())
    snapshot["module.encoder.backbone.features.0.0.bias"][3] = value
    with pytest.raises(CheckpointError, match="not finite: module.encoder.backbone.features.0.0.bias"):
        fss.load_model(saved(tmp_path, snapshot, "30000.pth"))


BAD_META = [
    ({"input_size": 0}, "'input_size' must be an integer from 8 to 4096, got 0"),
    ({"input_size": "417"}, "'input_size' must be an integer"),
    ({"input_size": 65.0}, "'input_size' must be an integer"),
    ({"input_size": True}, "'input_size' must be an integer"),
    ({"input_size": 10**6}, "'input_size' must be an integer from 8 to 4096"),
    ({"width": "wide"}, "'width' must be a finite number"),
    ({"width": math.nan}, "'width' must be a finite number"),
    ({"width": -0.125}, "'width' must be a finite number"),
    ({"width": 1e9}, "'width' must be a finite number in (0, 16]"),
    ({"method": ""}, "'method' must be a non-empty string"),
    ({"encoder": 3}, "'encoder' must be a non-empty string"),
    ({"encoder": "  "}, "'encoder' must be a non-empty string"),
    ({"normalisation": [0.5, 0.5]}, "'normalisation' must be a dict"),
    ({"normalisation": {"mean": [0, 0], "std": [1, 1, 1]}}, "mean must be a list of 3 numbers"),
    ({"normalisation": {"mean": [0, 0, 0], "std": [1, 0, 1]}}, "std must hold 3 finite positive numbers"),
    ({"normalisation": {"mean": [0, math.inf, 0], "std": [1, 1, 1]}}, "mean must hold 3 finite numbers"),
    ({"classes": "cat"}, "'classes' must be a list of strings"),
    ({"classes": ["cat", 3]}, "'classes' must be a list of strings"),
    ({"train_config": []}, "'train_config' must be a dict"),
    ({"iterations": -1}, "'iterations' must be a non-negative integer"),
]


@pytest.mark.parametrize("meta, message", BAD_META)
def test_nonsense_metadata_is_one_clear_line(tmp_path, meta, message):
    ckpt = fss_ckpt()
    ckpt["meta"].update(meta)
    with pytest.raises(CheckpointError) as err:
        fss.load_model(saved(tmp_path, ckpt))
    assert message in str(err.value) and str(err.value).endswith("m.pt)")


@pytest.mark.parametrize("meta", [None, [], "panet", 7])
def test_meta_that_is_not_a_dict_is_refused(tmp_path, meta):
    ckpt = fss_ckpt()
    ckpt["meta"] = meta
    with pytest.raises(CheckpointError, match="checkpoint metadata is a .*, not a dict"):
        fss.load_model(saved(tmp_path, ckpt))


def test_state_dict_of_non_tensors_is_refused(tmp_path):
    ckpt = fss_ckpt()
    ckpt["state_dict"]["encoder.features.0.0.bias"] = [1.0, 2.0]
    with pytest.raises(CheckpointError, match="'encoder.features.0.0.bias' is a list, not a named tensor"):
        fss.load_model(saved(tmp_path, ckpt))


def test_valid_metadata_passes_and_missing_fields_take_defaults(tmp_path):
    ckpt = fss_ckpt(classes=["a"], iterations=3, val=None)
    del ckpt["meta"]["normalisation"]
    model = fss.load_model(saved(tmp_path, ckpt))
    assert model.meta["normalisation"]["std"] and model.meta["classes"] == ["a"]
    assert check_meta({"input_size": 65, "width": 1}, "x")["width"] == 1


def inflating_checkpoint(tmp_path, inflated_bytes):
    """A real checkpoint whose first weight storage is a deflated record of ``inflated_bytes`` zeros
    (``torch.load`` would inflate all of it)."""
    plain = saved(tmp_path, fss_ckpt(), "plain.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w") as dst:
        storage = next(i.filename for i in src.infolist() if i.filename.endswith("/data/0"))
        for info in src.infolist():
            if info.filename != storage:
                dst.writestr(info, src.read(info))
        record = zipfile.ZipInfo(storage)
        record.compress_type = zipfile.ZIP_DEFLATED
        with dst.open(record, "w", force_zip64=True) as f:
            chunk = bytes(2**20)
            for _ in range(inflated_bytes // 2**20):
                f.write(chunk)
    return bomb


def test_zip_record_inflating_far_beyond_the_file_is_refused_before_loading(tmp_path, monkeypatch):
    bomb = inflating_checkpoint(tmp_path, 96 * 2**20)
    assert bomb.stat().st_size < 2 * 2**20
    assert MAX_INFLATION * bomb.stat().st_size + INFLATION_SLACK < 96 * 2**20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a zip bomb"))
    with pytest.raises(CheckpointError, match=r"refused: checkpoint archive inflates to 9[67] MiB from"):
        fss.load_model(bomb)


def test_bomb_refusal_needs_no_memory(tmp_path):
    """Under an address-space bound far below the record's size, the refusal still comes (subprocess)."""
    import subprocess
    import sys

    bomb = inflating_checkpoint(tmp_path, 160 * 2**20)
    code = (
        "import resource, sys, fss, fss.checkpoint\n"
        "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))\n"
        "try:\n    fss.load_model(sys.argv[1])\nexcept fss.FssError as exc:\n    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0 and "refused: refused: checkpoint archive inflates" in done.stdout, (
        done.stderr
    )


# -- training stops at the first non-finite value ------------------------------------------------------
def test_training_stops_at_a_non_finite_loss_keeping_the_last_good_checkpoint(shapes, tmp_path, monkeypatch):
    from test_train import config

    from fss.train import trainer

    real, calls = trainer.episode_losses, []

    def diverging(*args, **kwargs):
        query, align = real(*args, **kwargs)
        calls.append(1)
        return (query * math.nan, align) if len(calls) >= 3 else (query, align)

    monkeypatch.setattr(trainer, "episode_losses", diverging)
    out = tmp_path / "run"
    with pytest.raises(FssError, match=r"diverged at step 3: the loss is nan .*last.pt keeps step 2"):
        trainer.train(config(shapes, out, val_classes=[], iters=5, save_every=1))
    assert not (out / "final.pt").exists()
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["train_state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_training_stops_at_a_non_finite_weight(shapes, tmp_path, monkeypatch):
    from test_train import config

    from fss.train import trainer

    real_step = torch.optim.SGD.step

    def poisoned(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = math.inf
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", poisoned)
    with pytest.raises(
        FssError, match="diverged at step 1: a weight is not finite .*no checkpoint was written"
    ):
        trainer.train(config(shapes, tmp_path / "run", val_classes=[], iters=3))
    assert not (tmp_path / "run" / "last.pt").exists()


# -- 5. the error promise in every command ------------------------------------------------------------
def train_args(shapes, out):
    paper = ["--recipe", "paper", "--size", str(SIZE), "--width", "0.125"]
    return ["--data", str(shapes), *paper, "--iters", "1", "--out", str(out)]


@pytest.mark.parametrize("option", ["--lr", "--width", "--momentum", "--weight-decay", "--align-weight"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_train_refuses_non_finite_numbers(shapes, tmp_path, capsys, option, value):
    from fss.train.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*train_args(shapes, tmp_path / "run"), option, value])
    assert exit_.value.code == 2 and "must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_out_that_is_a_file_is_refused_before_training(shapes, tmp_path, capsys, monkeypatch):
    from fss.train import cli

    monkeypatch.setattr(cli, "train", lambda config: pytest.fail("trained before checking --out"))
    (tmp_path / "run").write_text("mine")
    assert cli.main(train_args(shapes, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("fss-train: error: --out is a file, not a folder") and err.count("\n") == 1
    assert (tmp_path / "run").read_text() == "mine"


def test_train_size_beyond_memory_is_refused_before_training(shapes, tmp_path, capsys, monkeypatch):
    import fss.memory
    from fss.train import cli

    monkeypatch.setattr(cli, "train", lambda config: pytest.fail("trained before checking memory"))
    monkeypatch.setattr(fss.memory, "available_bytes", lambda device: 1000)
    assert cli.main(train_args(shapes, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "--size 32 needs about" in err and "--batch-episodes" in err and err.count("\n") == 1


def test_train_removes_stale_temporaries_and_resume_rejects_a_damaged_state(shapes, tmp_path, capsys):
    from fss.io.outputs import folder_lock, journal
    from fss.train.cli import main

    out = tmp_path / "run"
    stale = out / ".fss-partial.last.pt.k1l2m3n4.tmp"
    with folder_lock(out):  # what a killed checkpoint write leaves: a temporary its journal records
        journal("temporary", stale)
        stale.write_bytes(b"half a checkpoint")
    (out / ".notes.tmp").write_text("the user's")
    assert main([*train_args(shapes, out), "--val-classes", "none", "--no-progress"]) == 0
    assert not stale.exists() and (out / ".notes.tmp").read_text() == "the user's"
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["train_state"]["optimizer"] = {"state": 3}
    torch.save(ckpt, out / "last.pt")
    capsys.readouterr()
    assert main([*train_args(shapes, out), "--val-classes", "none", "--resume", "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fss-train: error: damaged training state") and err.count("\n") == 1


def test_eval_json_into_a_folder_is_refused_before_the_work(shapes, tmp_path, capsys, monkeypatch):
    from fss.train import eval_cli

    ckpt = tmp_path / "tiny.pt"
    fss.save_checkpoint(random_model(width=0.0625, input_size=SIZE), ckpt)
    monkeypatch.setattr(eval_cli, "run_eval", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    (tmp_path / "results").mkdir()
    args = [
        "--ckpt",
        str(ckpt),
        "--data",
        str(shapes),
        "--classes",
        "bar",
        "--json",
        str(tmp_path / "results"),
    ]
    assert eval_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fss-eval: error: --json is a folder, not a file") and err.count("\n") == 1


def test_eval_refuses_a_checkpoint_with_nonsense_metadata(shapes, tmp_path, capsys):
    from fss.train.eval_cli import main

    ckpt = fss_ckpt()
    ckpt["meta"]["input_size"] = "big"
    path = saved(tmp_path, ckpt)
    assert main(["--ckpt", str(path), "--data", str(shapes), "--classes", "bar"]) == 2
    err = capsys.readouterr().err
    assert "'input_size' must be an integer" in err and err.count("\n") == 1


def test_run_refuses_nan_weights_and_nonsense_meta_with_one_line(tmp_path, capsys):
    from fss.runtime.cli import main

    support, query = make_support(tmp_path / "s"), make_queries(tmp_path / "q", 1)
    ckpt = fss_ckpt()
    ckpt["state_dict"]["encoder.features.0.0.weight"].fill_(math.nan)
    for name, obj in (("nan.pt", ckpt), ("meta.pt", {**fss_ckpt(), "meta": "x"})):
        args = [
            "--support",
            support,
            "--query",
            query,
            "--out",
            tmp_path / f"out-{name}",
            "--ckpt",
            saved(tmp_path, obj, name),
        ]
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith("fss-run: error: checkpoint") and err.count("\n") == 1 and "Traceback" not in err
        )


def test_export_and_coco_commands_keep_the_promise(tmp_path, capsys):
    from fss.export.cli import main as export_main
    from fss.train.coco import main as coco_main

    ckpt = fss_ckpt()
    ckpt["meta"]["width"] = "narrow"
    assert export_main(["--ckpt", str(saved(tmp_path, ckpt)), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fss-export: error: checkpoint metadata 'width'") and err.count("\n") == 1
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_x.json").write_text("{")
    (tmp_path / "coco" / "x").mkdir()
    assert coco_main(["--coco", str(tmp_path / "coco"), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fss.train.coco: error: not a COCO instances file") or "error:" in err
    assert err.count("\n") == 1


def test_runner_maps_every_user_failure_to_one_line(capsys):
    def raising(exc):
        def body():
            raise exc

        return body

    cases = [
        (FssError("bad input", "f.png"), 2, "p: error: bad input (f.png)"),
        (
            OSError(errno.ENOSPC, "No space left on device", "/o/x.png"),
            2,
            "p: error: No space left on device (/o/x.png)",
        ),
        (PermissionError(errno.EACCES, "Permission denied", "/o"), 2, "p: error: Permission denied (/o)"),
        (MemoryError(), 2, "p: error: out of memory"),
        (FssError("two\nlines"), 2, "p: error: two lines"),
    ]
    for exc, status, line in cases:
        assert run_command("p", raising(exc)) == status
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1
    assert run_command("p", raising(KeyboardInterrupt()), "stopped; kept") == 130
    assert capsys.readouterr().err == "p: stopped; kept\n"
    assert run_command("p", raising(ValueError("x")), exit_codes={ValueError: 1}) == 1
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_command("p", lambda: 1 / 0)
    assert run_command("p", lambda: None) == 0


def test_long_messages_are_shortened_at_a_sentence_or_word():
    text = "First sentence is here. " * 10 + "and then a very long tail without any stop " * 10
    short = summary(Exception(text), limit=120)
    assert short.endswith("here. ...") and len(short) <= 124
    words = summary(Exception("word " * 100), limit=50)
    assert words.endswith("word ...") and "wor " not in words
    assert summary(Exception("one\n  line")) == "one line"


def test_export_out_that_is_a_file_is_one_line(tmp_path, capsys):
    from fss.export.cli import main as export_main

    (tmp_path / "bundle").write_text("mine")
    args = ["--ckpt", str(saved(tmp_path, fss_ckpt())), "--out", str(tmp_path / "bundle")]
    assert export_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fss-export: error:") and err.count("\n") == 1
    assert (tmp_path / "bundle").read_text() == "mine"


def test_train_out_in_the_data_folder_is_refused(shapes, tmp_path, capsys):
    from fss.train.cli import main

    assert main(train_args(shapes, shapes / "run")) == 2
    err = capsys.readouterr().err
    assert "--out lies in the --data folder" in err and err.count("\n") == 1
    assert not (shapes / "run").exists()
