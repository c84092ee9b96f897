"""The method registry: PANet and PRNet behind one seam; checkpoints, fss-train, fss-eval, fss-run."""

import json

import numpy as np
import pytest
import torch
from helpers import make_queries, make_support, random_model
from PIL import Image
from test_train import SIZE, make_shapes

import fss
from fss.errors import CheckpointError, FssError
from fss.models.base import get_method, method_names, resolve_refine
from fss.runtime.cli import main as run_main
from fss.runtime.segmenter import Segmenter
from fss.train.cli import main as train_main
from fss.train.eval_cli import main as eval_main


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=5)


def prnet_ckpt(tmp_path, model=None):
    model = model or random_model(input_size=SIZE)
    model.meta["method"] = "prnet"
    path = tmp_path / "prnet.pt"
    fss.save_checkpoint(model, path)
    return path


def test_registry_names_and_defaults():
    assert {"oslsm", "panet", "prnet", "sst"} <= set(method_names())  # other methods register beside them
    assert get_method("panet").default_refine == "none"
    assert get_method("prnet").default_refine == "fusion"
    assert get_method("prnet").train_defaults["lr"] == 7e-3
    with pytest.raises(FssError, match=r"unknown method 'nosuch' \(known: oslsm, panet, prnet, sst"):
        get_method("nosuch")


def test_checkpoints_load_through_their_method(tmp_path):
    model = random_model(input_size=SIZE)
    loaded = fss.load_model(prnet_ckpt(tmp_path, model))
    assert loaded.meta["method"] == "prnet"
    assert resolve_refine(None, loaded) == "fusion"
    for ours, theirs in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs)
    obj = torch.load(tmp_path / "prnet.pt", weights_only=True)
    obj["meta"]["method"] = "nosuch"
    torch.save(obj, tmp_path / "nosuch.pt")
    with pytest.raises(CheckpointError, match=r"unknown method 'nosuch' \(known: oslsm, panet, prnet, sst"):
        fss.load_model(tmp_path / "nosuch.pt")


def test_segmenter_uses_the_models_scale_and_method_default(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [[(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)]]
    masks = [[(rng.random((SIZE, SIZE)) > 0.5).astype(np.uint8)]]
    query = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    model = random_model(input_size=SIZE)
    seg = Segmenter(model, device="cpu", impl="torch")
    seg.set_support(imgs, masks)
    _, prob20 = seg.segment([query], return_prob=True)
    model.scale = 5.0  # a method with another scale: the Segmenter follows the model
    seg5 = Segmenter(model, device="cpu", impl="torch")
    seg5.set_support(imgs, masks)
    _, prob5 = seg5.segment([query], return_prob=True)
    assert not np.allclose(prob20[0], prob5[0])
    assert Segmenter(prnet_ckpt(tmp_path), device="cpu").refine == "fusion"
    with pytest.raises(FssError, match="unknown refinement 'adapt'"):
        Segmenter(model, device="cpu", refine="adapt")


def test_fss_train_method_prnet_uses_the_paper_recipe(shapes, tmp_path, capsys):
    argv = ["--data", str(shapes), "--size", str(SIZE), "--width", "0.125", "--val-classes", "bar,circle"]
    argv += ["--eval-episodes", "2", "--out", str(tmp_path), "--no-progress", "--iters", "2"]
    assert train_main([*argv, "--method", "prnet", "--recipe", "paper"]) == 0
    model = fss.load_model(tmp_path / "final.pt")
    assert model.meta["method"] == "prnet"
    assert model.meta["train_config"]["lr"] == 7e-3
    assert model.meta["train_config"]["method"] == "prnet"


def test_fss_eval_refine(shapes, tmp_path, capsys):
    torch.manual_seed(0)
    model = fss.PANet(width=0.0625, meta={"input_size": SIZE, "classes": ["bar", "square"]})
    ckpt = tmp_path / "panet.pt"
    fss.save_checkpoint(model, ckpt)
    common = ["--data", str(shapes), "--runs", "1", "--episodes", "6", "--ways", "2", "--no-progress"]
    results = {}
    for refine in (None, "none", "fusion", "adapt+fusion"):
        out = tmp_path / f"{refine}.json"
        extra = [] if refine is None else ["--refine", refine]
        assert eval_main(["--ckpt", str(ckpt), *common, *extra, "--json", str(out)]) == 0
        results[refine] = json.loads(out.read_text())
    assert results[None]["refine"] == "none"
    assert results[None]["mean_iou"] == results["none"]["mean_iou"]
    assert results[None]["class_iou"] == results["none"]["class_iou"]
    assert results["fusion"]["refine"] == "fusion"
    assert results["adapt+fusion"]["refine"] == "adapt+fusion"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--ckpt", str(ckpt), *common, "--refine", "adapt"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'adapt'" in capsys.readouterr().err


def test_fss_run_refine_follows_the_method_and_is_a_setting(tmp_path, capsys):
    model = random_model(input_size=65)
    ckpt = prnet_ckpt(tmp_path, model)
    support, query = make_support(tmp_path / "s"), make_queries(tmp_path / "q")
    argv = ["--support", str(support), "--query", str(query), "--ckpt", str(ckpt), "--no-overlays"]
    assert run_main([*argv, "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["refine"] == "fusion" and results["settings"]["method"] == "prnet"
    # The labels are the Segmenter's with fusion, each query on its own.
    seg = Segmenter(ckpt, device="cpu")
    paths = sorted(query.glob("*.jpg"))
    classes = ["cat", "dog"]
    images = [sorted((support / c).glob("*.jpg")) for c in classes]
    masks = [[p.with_suffix(".png") for p in shots] for shots in images]
    seg.set_support(images, masks, classes)
    for path, labels in zip(paths, seg.segment(paths), strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{path.stem}.png")), labels)
    capsys.readouterr()
    assert run_main([*argv, "--out", str(tmp_path / "out"), "--refine", "none"]) == 2
    assert "another --refine" in capsys.readouterr().err


def test_a_prnet_checkpoint_exports_and_its_bundle_runs_with_fusion(tmp_path):
    from fss.export.cli import main as export_main

    ckpt = prnet_ckpt(tmp_path, random_model(input_size=65))
    out = tmp_path / "bundle"
    assert export_main(["--ckpt", str(ckpt), "--out", str(out)]) == 0
    bundle = fss.load_model(out)
    assert bundle.meta["method"] == "prnet"
    rng = np.random.default_rng(3)
    imgs = [[(rng.random((65, 65, 3)) * 255).astype(np.uint8)] for _ in range(2)]
    masks = [[(rng.random((65, 65)) > 0.5).astype(np.uint8)] for _ in range(2)]
    queries = [(rng.random((60, 70, 3)) * 255).astype(np.uint8) for _ in range(2)]
    segs = [Segmenter(m, device="cpu", impl="torch") for m in (bundle, fss.load_model(ckpt))]
    for seg in segs:
        assert seg.refine == "fusion"
        seg.set_support(imgs, masks, ["a", "b"])
    ours, eager = (seg.segment(queries) for seg in segs)
    agree = np.mean([np.mean(x == y) for x, y in zip(ours, eager, strict=True)])
    assert agree > 0.99  # ONNX Runtime's features differ from eager ones by float rounding only
    with pytest.raises(FssError, match="adaptation fine-tunes a checkpoint's encoder"):
        Segmenter(bundle, device="cpu", refine="adapt+fusion")


def test_refine_none_on_a_prnet_checkpoint_is_panet_bit_for_bit(tmp_path):
    model = random_model(input_size=SIZE)
    panet_path = tmp_path / "panet.pt"
    fss.save_checkpoint(model, panet_path)
    rng = np.random.default_rng(5)
    imgs = [[(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(2)] for _ in range(2)]
    masks = [[(rng.random((SIZE, SIZE)) > 0.5).astype(np.uint8) for _ in range(2)] for _ in range(2)]
    queries = [(rng.random((SIZE + 5, SIZE, 3)) * 255).astype(np.uint8) for _ in range(3)]
    panet = Segmenter(panet_path, device="cpu")
    prnet = Segmenter(prnet_ckpt(tmp_path, model), device="cpu", refine="none")
    for seg in (panet, prnet):
        seg.set_support(imgs, masks, ["a", "b"])
    (labels, prob), (labels_none, prob_none) = (
        seg.segment(queries, return_prob=True) for seg in (panet, prnet)
    )
    assert all(np.array_equal(x, y) for x, y in zip(labels, labels_none, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(prob, prob_none, strict=True))


def test_fss_train_prnet_refuses_to_drop_its_second_term(shapes, tmp_path, capsys):
    argv = ["--data", str(shapes), "--out", str(tmp_path), "--method", "prnet", "--no-align"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("fss-train: error: --method prnet trains with its second term")
        and "Traceback" not in err
    )
