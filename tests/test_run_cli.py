"""``fss-run`` end to end on synthetic folders: outputs, resume, and every user error."""

import json

import numpy as np
import pytest
import torch
from helpers import make_queries, make_support, random_model, save_image, save_mask
from PIL import Image

import fss
from fss.constants import voc_palette
from fss.runtime.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    fss.save_checkpoint(random_model(input_size=65), path)
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_outputs_and_resume(tmp_path, ckpt, capsys):
    support, query, out = make_support(tmp_path / "s"), make_queries(tmp_path / "q"), tmp_path / "out"
    (query / "readme.txt").write_text("not an image")
    code, err = run(
        capsys, "--support", support, "--query", query, "--out", out, "--ckpt", ckpt, "--batch", 2
    )
    assert code == 0, err
    assert "skipping non-image file" in err and "readme.txt" in err
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == {"0": "background", "1": "cat", "2": "dog"}
    assert [q["file"] for q in results["queries"]] == ["q0.jpg", "q1.jpg", "q2.jpg"]
    for i, entry in enumerate(results["queries"]):
        label = Image.open(out / f"q{i}.png")
        assert label.mode == "P" and label.size == tuple(entry["size"]) == (40 + 3 * i, 36 + i)
        values = np.asarray(label)
        assert values.max() <= 2
        assert abs(sum(entry["fractions"].values()) - 1) < 1e-4
        assert entry["fractions"]["cat"] == pytest.approx((values == 1).mean(), abs=1e-6)
        assert Image.open(out / "overlays" / f"q{i}.jpg").size == label.size
    # A re-run skips finished queries; a deleted output is recomputed.
    (out / "q1.png").unlink()
    code, err = run(capsys, "--support", support, "--query", query, "--out", out, "--ckpt", ckpt)
    assert code == 0 and "1 segmented, 2 already done" in err
    code, err = run(
        capsys, "--support", support, "--query", query, "--out", out, "--ckpt", ckpt, "--overwrite"
    )
    assert code == 0 and "3 segmented, 0 already done" in err


def test_cli_labels_equal_model_argmax(tmp_path, ckpt, capsys):
    """At query size == input size the CLI's masks are exactly the official pipeline's argmax."""
    rng = np.random.default_rng(3)
    support = tmp_path / "s"
    save_image(support / "thing" / "a.png", rng, size=(65, 65))
    save_mask(support / "thing" / "a_mask.png", size=(65, 65), box=(10, 10, 40, 50))
    query = tmp_path / "q"
    save_image(query / "x.png", rng, size=(65, 65))
    code, err = run(capsys, "--support", support, "--query", query, "--out", tmp_path / "o", "--ckpt", ckpt)
    assert code == 0, err
    from fss.constants import PAPER_NORMALISATION
    from fss.io.images import read_image
    from fss.io.masks import read_mask
    from fss.io.tensors import image_tensor, mask_tensor

    model = fss.load_model(ckpt)
    mask = mask_tensor(read_mask(support / "thing" / "a_mask.png"), 65)
    supp = image_tensor(read_image(support / "thing" / "a.png"), 65, PAPER_NORMALISATION)[None, None, None]
    qry = image_tensor(read_image(query / "x.png"), 65, PAPER_NORMALISATION)[None, None]
    with torch.no_grad():
        logits = model(
            supp, (mask == 1)[None, None, None].float(), (mask == 0)[None, None, None].float(), qry
        )
    expected = logits.argmax(2)[0, 0].numpy()
    got = np.asarray(Image.open(tmp_path / "o" / "x.png"))
    assert (got == expected).mean() > 0.9999


def test_corrupt_query_is_reported_and_others_written(tmp_path, ckpt, capsys):
    support, query, out = make_support(tmp_path / "s"), make_queries(tmp_path / "q"), tmp_path / "out"
    (query / "q1.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    code, err = run(capsys, "--support", support, "--query", query, "--out", out, "--ckpt", ckpt)
    assert code == 1
    assert "unreadable or corrupt image" in err and "q1.jpg" in err and "Traceback" not in err
    assert (out / "q0.png").exists() and (out / "q2.png").exists() and not (out / "q1.png").exists()
    failed = [q for q in json.loads((out / "results.json").read_text())["queries"] if q.get("error")]
    assert [q["file"] for q in failed] == ["q1.jpg"]


def flat_support(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "flat"
    save_image(root / "a.jpg", rng)
    save_mask(root / "a.png")
    return root, rng


def test_flat_folder_is_one_class_and_palette_ignore(tmp_path, ckpt, capsys):
    root, rng = flat_support(tmp_path)
    save_image(root / "b.png", rng)
    mask = save_mask(root / "b_mask.png", value=3, palette=True)
    assert mask.max() == 3
    from fss.io.folders import find_support_pairs
    from fss.io.masks import read_mask

    pairs = find_support_pairs(root)
    assert list(pairs) == ["flat"] and [p[0].name for p in pairs["flat"]] == ["a.jpg", "b.png"]
    palette = np.zeros((4, 4), np.uint8)
    palette[0, :2] = [255, 7]
    img = Image.fromarray(palette, mode="P")
    img.putpalette(voc_palette())
    img.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png")[0, :3].tolist() == [255, 1, 0]
    code, err = run(
        capsys,
        "--support",
        root,
        "--query",
        make_queries(tmp_path / "q", 1),
        "--out",
        tmp_path / "o",
        "--ckpt",
        ckpt,
    )
    assert code == 0, err


def corrupt(path):
    path.write_bytes(b"garbage")


ERROR_CASES = {
    "support folder not found": lambda root: root / "nope",
    "support folder is empty": lambda root: (root / "empty").mkdir() or root / "empty",
    "image without mask": lambda root: (root / "s" / "cat" / "cat0.png").unlink() or root / "s",
    "mask without image": lambda root: (root / "s" / "cat" / "extra_mask.png").write_bytes(b"") or root / "s",
    "differs from image size": lambda root: (
        save_mask(root / "s" / "dog" / "dog0.png", size=(20, 20)) is None or root / "s"
    ),
    "mask has no foreground pixel": lambda root: (
        save_mask(root / "s" / "dog" / "dog0.png", value=0) is None or root / "s"
    ),
    "unreadable or corrupt image": lambda root: corrupt(root / "s" / "cat" / "cat1.jpg") or root / "s",
}


@pytest.mark.parametrize("message", list(ERROR_CASES))
def test_support_errors_exit_2_with_one_line(tmp_path, ckpt, capsys, message):
    make_support(tmp_path / "s")
    support = ERROR_CASES[message](tmp_path)
    code, err = run(
        capsys,
        "--support",
        support,
        "--query",
        make_queries(tmp_path / "q", 1),
        "--out",
        tmp_path / "o",
        "--ckpt",
        ckpt,
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fss-run: error: ") and message in lines[0], err
    assert lines[0].endswith(")")  # names the file or folder


def test_unreadable_checkpoint_and_empty_query_exit_2(tmp_path, capsys):
    support = make_support(tmp_path / "s")
    (tmp_path / "bad.pt").write_bytes(b"nope")
    code, err = run(
        capsys,
        "--support",
        support,
        "--query",
        make_queries(tmp_path / "q", 1),
        "--ckpt",
        tmp_path / "bad.pt",
    )
    assert code == 2 and "fss-run: error: unreadable checkpoint" in err and "bad.pt" in err
    (tmp_path / "empty").mkdir()
    code, err = run(
        capsys, "--support", support, "--query", tmp_path / "empty", "--ckpt", tmp_path / "bad.pt"
    )
    assert code == 2 and "error:" in err


def test_resume_refuses_another_support_set(tmp_path, ckpt, capsys):
    query, out = make_queries(tmp_path / "q", 1), tmp_path / "out"
    assert (
        run(
            capsys, "--support", make_support(tmp_path / "s1"), "--query", query, "--out", out, "--ckpt", ckpt
        )[0]
        == 0
    )
    support2 = make_support(tmp_path / "s2", classes=("bird",), shots=(1,))
    code, err = run(capsys, "--support", support2, "--query", query, "--out", out, "--ckpt", ckpt)
    assert code == 2 and "another support set" in err


def test_bundle_runs_like_the_checkpoint(tmp_path, ckpt, capsys):
    """fss-run --bundle (ONNX Runtime) writes the masks of fss-run --ckpt (torch) on >= 99.9 % of pixels."""
    from fss.export.build import export_bundle

    bundle, _ = export_bundle(ckpt, tmp_path / "bundle", size=65, log=lambda _: None)
    assert fss.load_model(bundle).meta == fss.load_model(ckpt).meta
    support, query = make_support(tmp_path / "s"), make_queries(tmp_path / "q", 4)
    common = ["--support", support, "--query", query]
    assert run(capsys, *common, "--ckpt", ckpt, "--out", tmp_path / "torch")[0] == 0
    code, err = run(
        capsys, *common, "--bundle", bundle, "--backend", "onnxruntime", "--out", tmp_path / "ort"
    )
    assert code == 0, err
    for i in range(4):
        ours = np.asarray(Image.open(tmp_path / "ort" / f"q{i}.png"))
        assert (ours == np.asarray(Image.open(tmp_path / "torch" / f"q{i}.png"))).mean() >= 0.999
    manifest = bundle / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 1', '"format_version": 99'))
    code, err = run(capsys, *common, "--bundle", bundle, "--out", tmp_path / "bad")
    assert code == 2 and err.count("\n") == 1 and "fss-run: error:" in err
    with pytest.raises(SystemExit):
        main(["--support", str(support), "--query", str(query), "--backend", "tensorrt"])
