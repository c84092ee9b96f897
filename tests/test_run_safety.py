"""fss-run never overwrites an input, resumes only what the same inputs and settings made, and keeps
its error promise (one line, exit 2, before the work)."""

import errno
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_queries, make_support, random_model, save_image, save_mask
from hostile import save_pixel_bomb, save_rotated_jpeg
from PIL import Image

import fss
from fss.io.outputs import LOCK_FILE
from fss.runtime.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    fss.save_checkpoint(random_model(input_size=65), path)
    return path


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "other.pt"
    fss.save_checkpoint(random_model(input_size=65, seed=1), path)
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("fss-run: error: ") and "Traceback" not in err, err
    assert all(n in lines[-1] for n in needles), err


def snapshot(folder, but=()):
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in but)
    return {p.relative_to(folder): p.read_bytes() for p in files}


def users_view(folder):
    """Every file but fss's lock and journal (a refused run may compact the journal)."""
    return snapshot(folder, but=(LOCK_FILE,))


def entries(out):
    return {q["file"]: q for q in json.loads((out / "results.json").read_text())["queries"]}


@pytest.fixture
def setup(tmp_path, ckpt):
    support, query = make_support(tmp_path / "s"), make_queries(tmp_path / "q")
    return support, query, tmp_path / "out"


def base(support, query, out, ckpt, *more):
    return ["--support", support, "--query", query, "--out", out, "--ckpt", ckpt, *more]


# -- 1. user data is sacred ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "where, message",
    [
        ("query", "would write into the input folder"),
        ("flat support", "would write into the input folder"),
        ("class folder", "would write into the input folder"),
        ("overlays is query", "would write into the input folder"),
        ("query inside overlays", "would write into the input folder"),
        ("in support", "a later run would read it as a class"),
    ],
)
def test_out_never_overwrites_or_mixes_with_inputs(tmp_path, ckpt, capsys, where, message):
    rng = np.random.default_rng(0)
    flat = tmp_path / "flat"
    save_image(flat / "q0.jpg", rng)  # a support pair named like a query's output
    save_mask(flat / "q0.png")
    support = flat if where == "flat support" else make_support(tmp_path / "s")
    query = make_queries(tmp_path / ("overlays" if where == "overlays is query" else "q"))
    if where == "query inside overlays":
        query = make_queries(tmp_path / "o" / "overlays" / "q")
    out = {
        "query": query,
        "flat support": flat,
        "class folder": support / "cat",
        "overlays is query": tmp_path,
        "query inside overlays": tmp_path / "o",
        "in support": support / "results",
    }[where]
    before = snapshot(tmp_path)
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2
    one_error_line(err, "--out", message)
    assert snapshot(tmp_path) == before  # not a byte written or changed


def test_out_deeper_inside_the_query_folder_is_fine(setup, ckpt, capsys):
    support, query, _ = setup
    before = snapshot(query)
    code, err = run(capsys, *base(support, query, query / "fss-out", ckpt))
    assert code == 0, err
    assert sorted(p.name for p in (query / "fss-out").glob("*.png")) == ["q0.png", "q1.png", "q2.png"]
    code, err = run(capsys, *base(support, query, query / "fss-out", ckpt))
    assert code == 0 and "3 already done" in err  # the output folder is not read as queries
    assert {k: v for k, v in snapshot(query).items() if k.parts[0] != "fss-out"} == before


def test_query_link_to_an_output_path_is_refused(setup, ckpt, capsys, tmp_path):
    support, query, out = setup
    out.mkdir()
    save_image(out / "elsewhere.png", np.random.default_rng(0))
    (query / "elsewhere.png").symlink_to(out / "elsewhere.png")
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2
    one_error_line(err, "would overwrite the input")


def test_out_that_is_a_file_is_refused_before_work(setup, ckpt, capsys):
    support, query, out = setup
    out.write_text("mine")
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2 and out.read_text() == "mine"
    one_error_line(err, "--out is a file, not a folder")
    code, err = run(capsys, *base(support, query, out / "sub", ckpt))
    assert code == 2
    one_error_line(err, "inside a file")
    (out.parent / "o2").mkdir()
    (out.parent / "o2" / "overlays").write_text("mine")
    code, err = run(capsys, *base(support, query, out.parent / "o2", ckpt))
    assert code == 2 and not (out.parent / "o2" / "q0.png").exists()
    one_error_line(err, "--out/overlays is a file")


def test_second_query_folder_merges_and_a_clashing_name_is_refused(setup, ckpt, capsys, tmp_path):
    support, query, out = setup
    assert run(capsys, *base(support, query, out, ckpt))[0] == 0
    other = tmp_path / "q2"
    save_image(other / "z.jpg", np.random.default_rng(5))
    code, err = run(capsys, *base(support, other, out, ckpt))
    assert code == 0, err
    assert sorted(entries(out)) == ["q0.jpg", "q1.jpg", "q2.jpg", "z.jpg"]  # nothing dropped
    save_image(other / "q0.jpg", np.random.default_rng(9))  # another photo with a name already written
    before = (out / "q0.png").read_bytes()
    code, err = run(capsys, *base(support, other, out, ckpt))
    assert code == 2 and (out / "q0.png").read_bytes() == before
    one_error_line(err, "q0.png in --out was written for another query")
    # the same bytes under another folder are the same query: already done
    shutil.copy(query / "q0.jpg", other / "q0.jpg")
    code, err = run(capsys, *base(support, other, out, ckpt))
    assert code == 0 and "0 segmented, 2 already done" in err


# -- 2. resume is keyed on content ------------------------------------------------------------------------
def test_replaced_query_is_recomputed(setup, ckpt, capsys):
    support, query, out = setup
    assert run(capsys, *base(support, query, out, ckpt))[0] == 0
    save_image(query / "q1.jpg", np.random.default_rng(42), size=(30, 20))
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 0 and "1 segmented, 2 already done" in err
    assert Image.open(out / "q1.png").size == (30, 20) and entries(out)["q1.jpg"]["size"] == [30, 20]


@pytest.mark.parametrize("change", ["mask", "size", "ckpt"])
def test_other_settings_are_refused_then_replaced_with_overwrite(setup, ckpt, other_ckpt, capsys, change):
    support, query, out = setup
    assert run(capsys, *base(support, query, out, ckpt))[0] == 0
    args = base(support, query, out, ckpt)
    if change == "mask":
        save_mask(support / "cat" / "cat0.png", box=(1, 1, 12, 12))
        needle = "another support set"
    elif change == "size":
        args += ["--size", "49"]
        needle = "another --size"
    else:
        args = base(support, query, out, other_ckpt)
        needle = "another model"
    code, err = run(capsys, *args)
    assert code == 2
    one_error_line(err, needle, "--overwrite")
    code, err = run(capsys, *args, "--overwrite")
    assert code == 0 and "3 segmented" in err
    results = json.loads((out / "results.json").read_text())
    assert results["input_size"] == (49 if change == "size" else 65)
    assert run(capsys, *args)[1].count("3 already done") == 1


def test_pixel_limit_is_a_resume_setting(setup, ckpt, capsys, monkeypatch):
    support, query, out = setup
    args = base(support, query, out, ckpt, "--backend", "torch")  # auto may verify on larger photos
    assert run(capsys, *args, "--max-pixels", "5000")[0] == 0
    assert json.loads((out / "results.json").read_text())["settings"]["max_pixels"] == 5000
    for other in (["--max-pixels", "6000"], []):  # another limit; the default one
        code, err = run(capsys, *args, *other)
        assert code == 2
        one_error_line(err, "another pixel limit (--max-pixels or $FSS_MAX_PIXELS)", "--overwrite")
    monkeypatch.setenv("FSS_MAX_PIXELS", "5000")  # the same limit, given by the environment
    assert run(capsys, *args)[1].count("3 already done") == 1
    results = json.loads((out / "results.json").read_text())
    del results["settings"]["max_pixels"]  # a results.json of the fss-run before it was recorded
    (out / "results.json").write_text(json.dumps(results))
    code, err = run(capsys, *args)
    assert code == 2
    one_error_line(err, "settings an older fss-run did not record (max_pixels)")


@pytest.mark.parametrize("library", ["pillow", "numpy", "torch", "onnxruntime"])
def test_library_versions_are_a_resume_setting(setup, ckpt, capsys, library):
    import onnxruntime
    import PIL
    import torch

    support, query, out = setup
    backend = "onnxruntime" if library == "onnxruntime" else "torch"
    args = base(support, query, out, ckpt, "--backend", backend)
    assert run(capsys, *args)[0] == 0
    results = json.loads((out / "results.json").read_text())
    expected = {"pillow": PIL.__version__, "numpy": np.__version__, "torch": torch.__version__}
    if backend == "onnxruntime":
        expected["onnxruntime"] = onnxruntime.__version__
    assert results["settings"]["libraries"] == expected
    results["settings"]["libraries"][library] = "0.0.1"  # as a run with another decoder would record
    (out / "results.json").write_text(json.dumps(results))
    code, err = run(capsys, *args)
    assert code == 2
    one_error_line(err, "other versions of the libraries", f"{library} 0.0.1 -> {expected[library]}")
    code, err = run(capsys, *args, "--overwrite")
    assert code == 0 and "3 segmented" in err


def test_byte_identical_support_elsewhere_resumes(setup, ckpt, capsys, tmp_path):
    support, query, out = setup
    assert run(capsys, *base(support, query, out, ckpt))[0] == 0
    shutil.copytree(support, tmp_path / "copy")
    code, err = run(capsys, *base(tmp_path / "copy", query, out, ckpt))
    assert code == 0 and "0 segmented, 3 already done" in err


def test_damaged_outputs_are_refused_then_recomputed_once_moved_away(setup, ckpt, capsys):
    support, query, out = setup
    assert run(capsys, *base(support, query, out, ckpt))[0] == 0
    good = (out / "q0.png").read_bytes()
    (out / "q0.png").write_bytes(good[: len(good) // 2])  # truncated, or edited by hand: not replaced
    (out / "overlays" / "q2.jpg").write_bytes(b"garbage")
    before = users_view(out)
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2 and users_view(out) == before
    one_error_line(err, "--out holds q0.png, which differs from the file fss-run wrote there", "--overwrite")
    (out / "q0.png").unlink()
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2
    one_error_line(err, "--out holds overlays/q2.jpg, which differs")
    (out / "overlays" / "q2.jpg").unlink()
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 0 and "2 segmented, 1 already done" in err
    assert (out / "q0.png").read_bytes() == good
    Image.open(out / "overlays" / "q2.jpg").load()


@pytest.mark.parametrize("content", ["{not json", '{"hello": "world"}', "[1, 2]", "\udcff"])
def test_foreign_or_garbled_results_json_is_refused_not_crashed(setup, ckpt, capsys, content):
    support, query, out = setup
    out.mkdir()
    (out / "results.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2 and not (out / "q0.png").exists()
    one_error_line(err, "results.json")
    code, err = run(capsys, *base(support, query, out, ckpt, "--overwrite"))
    assert code == 0 and "3 segmented" in err and len(entries(out)) == 3


def test_garbled_entries_and_older_results_are_recomputed(setup, ckpt, capsys):
    support, query, out = setup
    assert run(capsys, *base(support, query, out, ckpt))[0] == 0
    results = json.loads((out / "results.json").read_text())
    results["queries"] = [7, {"file": 3}, results["queries"][0]]
    (out / "results.json").write_text(json.dumps(results))
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 0 and "2 segmented, 1 already done" in err


@pytest.mark.parametrize("older", ["first fss-run", "settings removed"])
def test_results_without_settings_are_refused_not_trusted(setup, ckpt, capsys, older):
    support, query, out = setup
    assert run(capsys, *base(support, query, out, ckpt))[0] == 0
    results = json.loads((out / "results.json").read_text())
    if older == "first fss-run":
        results = {"support": {}, "queries": [{"file": "q0.jpg"}]}
    else:
        del results["settings"]  # not "no settings to check": nothing in it can be verified
    (out / "results.json").write_text(json.dumps(results))
    before = users_view(out)
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2 and users_view(out) == before
    one_error_line(err, "results.json that records no settings", "--overwrite")
    code, err = run(capsys, *base(support, query, out, ckpt, "--overwrite"))
    assert code == 0 and "3 segmented" in err
    assert run(capsys, *base(support, query, out, ckpt))[1].count("3 already done") == 1


def test_overlays_are_written_after_a_no_overlays_run(setup, ckpt, capsys):
    support, query, out = setup
    assert run(capsys, *base(support, query, out, ckpt, "--no-overlays"))[0] == 0
    assert not (out / "overlays").exists()
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 0 and "3 segmented" in err and len(list((out / "overlays").glob("*.jpg"))) == 3
    assert run(capsys, *base(support, query, out, ckpt, "--no-overlays"))[1].count("3 already done") == 1


def killed_mid_writes(out, names):
    """A process that dies (no clean-up, as under kill -9) while atomic_write writes every one of
    ``names`` in ``out``."""
    from fss.io.outputs import atomic_write, folder_lock

    def write_then_die(names):
        def write(f):
            f.write(b"half a file")
            f.flush()
            write_then_die(names[1:]) if names[1:] else os._exit(9)

        atomic_write(out / names[0], write)

    pid = os.fork()
    if pid == 0:
        with folder_lock(out):
            write_then_die(names)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 9


def test_temporaries_of_a_killed_run_are_removed_and_only_those(setup, ckpt, capsys):
    support, query, out = setup
    (out / "overlays").mkdir(parents=True)
    killed_mid_writes(out, ["q0.png", "overlays/q1.jpg"])
    killed = sorted(out.rglob(".fss-partial.*.tmp"))
    assert [p.parent.name for p in killed] == ["out", "overlays"]
    users = [out / ".notes.tmp", out / ".x.tmp", out / "keep.tmp", out / "overlays" / ".notes.tmp"]
    users += [out / ".q0.png.abc123xy.tmp", out / "overlays" / ".q2.jpg.zz9.tmp"]  # named as fss once did
    for path in users:
        path.write_text("the user's")
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 0, err
    assert not any(p.exists() for p in killed)
    assert all(p.read_text() == "the user's" for p in users)


@pytest.mark.parametrize("where", ["mask", "overlay", "overlay after a --no-overlays run"])
def test_a_users_file_at_an_output_path_is_refused_before_work(setup, ckpt, capsys, monkeypatch, where):
    import fss.runtime.cli

    support, query, out = setup
    if where.endswith("--no-overlays run"):
        assert run(capsys, *base(support, query, out, ckpt, "--no-overlays"))[0] == 0
    name = "q1.png" if where == "mask" else "overlays/q1.jpg"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    save_image(out / name, np.random.default_rng(7))  # the user's own picture
    before = users_view(out)
    real_load = fss.runtime.cli.load_runtime_model
    monkeypatch.setattr(fss.runtime.cli, "load_runtime_model", lambda a: pytest.fail("loaded the model"))
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2 and users_view(out) == before
    one_error_line(err, f"--out holds {name}, which fss-run did not write", "--overwrite", str(out / name))
    monkeypatch.setattr(fss.runtime.cli, "load_runtime_model", real_load)
    code, err = run(capsys, *base(support, query, out, ckpt, "--overwrite"))
    assert code == 0 and "3 segmented" in err
    assert Image.open(out / name).size == (43, 37)  # now fss-run's output for q1.jpg
    assert run(capsys, *base(support, query, out, ckpt))[1].count("3 already done") == 1


def test_outputs_written_but_not_yet_in_results_are_still_ours(setup, ckpt, capsys, monkeypatch):
    support, query, out = setup
    import fss.io.outputs

    real, calls = fss.io.outputs.write_label_png, []

    def interrupted(path, labels):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # q0's outputs are in place, results.json not yet saved
        return real(path, labels)

    monkeypatch.setattr(fss.io.outputs, "write_label_png", interrupted)
    assert run(capsys, *base(support, query, out, ckpt, "--batch", "4"))[0] == 130
    assert (out / "q0.png").exists() and entries(out) == {}
    monkeypatch.setattr(fss.io.outputs, "write_label_png", real)
    code, err = run(capsys, *base(support, query, out, ckpt))  # the journal knows fss wrote them
    assert code == 0 and "3 segmented" in err


def test_a_second_writer_into_the_same_out_is_refused(setup, ckpt, capsys):
    from fss.io.outputs import folder_lock

    support, query, out = setup
    with folder_lock(out):
        code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2
    one_error_line(err, "another fss command is writing into this folder")


# -- 3. images as a person sees them ------------------------------------------------------------------------
def test_exif_rotated_photos_get_masks_as_displayed(tmp_path, ckpt, capsys):
    rng = np.random.default_rng(3)
    support = tmp_path / "s" / "thing"
    support.mkdir(parents=True)
    save_rotated_jpeg(support / "a.jpg", (rng.random((30, 50, 3)) * 255).astype(np.uint8))
    save_mask(support / "a.png", size=(30, 50), box=(5, 5, 25, 40))  # drawn on the photo as displayed
    query = tmp_path / "q"
    query.mkdir()
    save_rotated_jpeg(query / "r.jpg", (rng.random((20, 44, 3)) * 255).astype(np.uint8))
    code, err = run(capsys, *base(tmp_path / "s", query, tmp_path / "out", ckpt))
    assert code == 0, err
    assert Image.open(tmp_path / "out" / "r.png").size == (20, 44)
    assert Image.open(tmp_path / "out" / "overlays" / "r.jpg").size == (20, 44)
    save_mask(support / "a.png", size=(50, 30))  # drawn on the stored pixels
    code, err = run(capsys, *base(tmp_path / "s", query, tmp_path / "out2", ckpt))
    assert code == 2
    one_error_line(err, "differs from image size 30x50", "as displayed")


def test_pixel_bomb_query_fails_alone(setup, ckpt, capsys):
    support, query, out = setup
    save_pixel_bomb(query / "bomb.png")
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 1 and "Warning" not in err and "DecompressionBomb" not in err
    assert "bomb.png" in err and "more than the limit of 64,000,000" in err
    assert entries(out)["bomb.png"]["error"].startswith("image has 12500 x 12500")
    assert all((out / f"q{i}.png").exists() for i in range(3))


def test_max_pixels_option_and_draft_decoded_jpeg_mask_at_full_size(setup, ckpt, capsys):
    support, query, out = setup
    Image.fromarray((np.random.default_rng(4).random((90, 120, 3)) * 255).astype(np.uint8)).save(
        query / "big.jpg"
    )
    code, err = run(capsys, *base(support, query, out, ckpt, "--max-pixels", "5000"))
    assert code == 0, err  # the supports (48 x 40) and small queries fit; big.jpg decodes at half side
    assert Image.open(out / "big.png").size == (120, 90) and entries(out)["big.jpg"]["size"] == [120, 90]
    code, err = run(capsys, *base(support, query, out, ckpt, "--max-pixels", "1000", "--overwrite"))
    assert code == 2
    one_error_line(err, "more than the limit of 1,000", "cat0.jpg")


# -- 5. the error promise ------------------------------------------------------------------------------------
def test_disk_full_before_and_during_the_run(setup, ckpt, capsys, monkeypatch):
    support, query, out = setup
    import fss.io.outputs

    real = fss.io.outputs.shutil.disk_usage
    monkeypatch.setattr(fss.io.outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2 and not (out / "results.json").exists()
    one_error_line(err, "not enough free space for --out")
    monkeypatch.setattr(fss.io.outputs.shutil, "disk_usage", real)

    def full(path, labels):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(fss.io.outputs, "write_label_png", full)
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 2
    one_error_line(err, "No space left on device", "q0.png")


def test_output_cut_by_a_file_size_limit_is_never_recorded_as_done(setup, ckpt, capsys):
    """Under RLIMIT_FSIZE a write stops at the limit: Python ignores SIGXFSZ, so write() fails with
    EFBIG, but Pillow's encoders write to the descriptor themselves and let that short write pass
    (the overlay JPEG was cut at the limit, exit 0, its hash recorded). Outputs are now encoded in
    memory and written verified."""
    support, query, out = setup
    noise = np.random.default_rng(0).random((300, 400, 3)) * 255
    Image.fromarray(noise.astype(np.uint8)).save(query / "z.jpg", quality=95)  # its overlay: ~100 KB
    limit = 80_000  # beyond Pillow's 64 KiB encoder buffer, below the overlay: a silent cut before

    def file_size_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [str(a) for a in base(support, query, out, ckpt, "--backend", "torch", "--batch", "1")]
    child = subprocess.run(
        [sys.executable, "-m", "fss.runtime.cli", *args],
        preexec_fn=file_size_limit,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 2
    one_error_line(child.stderr, "File too large", str(out / "overlays" / "z.jpg"))
    assert sorted(entries(out)) == ["q0.jpg", "q1.jpg", "q2.jpg"]  # z is not recorded
    assert not (out / "overlays" / "z.jpg").exists() and not list(out.rglob(".fss-partial.*"))
    code, err = run(capsys, *args)  # without the limit, the resume redoes z
    assert code == 0 and "1 segmented, 3 already done" in err
    overlay = out / "overlays" / "z.jpg"
    assert overlay.stat().st_size > limit and Image.open(overlay).load() is not None
    assert entries(out)["z.jpg"]["overlay_sha256"] == hashlib.sha256(overlay.read_bytes()).hexdigest()


def test_too_many_classes_says_the_limit_before_reading_images(tmp_path, ckpt, capsys):
    rng = np.random.default_rng(0)
    for k in range(255):
        save_image(tmp_path / "s" / f"c{k:03d}" / "a.jpg", rng, size=(4, 4))
        (tmp_path / "s" / f"c{k:03d}" / "a.png").write_bytes(b"not decoded before the check")
    code, err = run(capsys, *base(tmp_path / "s", make_queries(tmp_path / "q", 1), tmp_path / "o", ckpt))
    assert code == 2
    one_error_line(err, "255 classes, more than the 254")


def test_background_class_folder_is_refused(tmp_path, ckpt, capsys):
    support = make_support(tmp_path / "s", classes=("background", "cat"), shots=(1, 1))
    code, err = run(capsys, *base(support, make_queries(tmp_path / "q", 1), tmp_path / "o", ckpt))
    assert code == 2
    one_error_line(err, "'background' collides with label 0")


def test_size_beyond_memory_or_bounds_is_refused_before_work(setup, ckpt, capsys, monkeypatch):
    support, query, out = setup
    import fss.memory

    monkeypatch.setattr(fss.memory, "available_bytes", lambda device: 50 * 2**20)
    code, err = run(capsys, *base(support, query, out, ckpt, "--size", "2048"))
    assert code == 2 and not (out / "q0.png").exists()
    one_error_line(err, "--size 2048 needs about", "lower --size or --batch")
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in base(support, query, out, ckpt, "--size", "100000")])
    assert exit_.value.code == 2 and "--size must be from 8 to 4096" in capsys.readouterr().err


def test_ctrl_c_is_130_and_keeps_finished_work(setup, ckpt, capsys, monkeypatch):
    support, query, out = setup
    import fss.io.outputs

    real, calls = fss.io.outputs.write_label_png, []

    def interrupted(path, labels):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, labels)

    monkeypatch.setattr(fss.io.outputs, "write_label_png", interrupted)
    code, err = run(capsys, *base(support, query, out, ckpt, "--batch", "1"))
    assert code == 130 and "re-run to resume" in err and "Traceback" not in err
    monkeypatch.setattr(fss.io.outputs, "write_label_png", real)
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 0 and "2 segmented, 1 already done" in err


def test_errors_stay_one_line_with_hostile_names_and_environment(setup, ckpt, capsys, monkeypatch):
    support, query, out = setup
    (query / "new\nline.jpg").write_bytes(b"")
    code, err = run(capsys, *base(support, query, out, ckpt))
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("fss-run: error")] == [
        f"fss-run: error: unreadable or corrupt image ({query}/new line.jpg)"
    ]
    monkeypatch.setenv("FSS_MAX_PIXELS", "-3")
    code, err = run(capsys, *base(support, query, out / "other", ckpt))
    assert code == 2 and not (out / "other").exists()
    one_error_line(err, "FSS_MAX_PIXELS must be a positive integer")
