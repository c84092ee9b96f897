"""OSLSM through the method seam: the network's geometry, checkpoints, Segmenter, fss-train / eval / run."""

import json

import numpy as np
import pytest
import torch
from helpers import make_queries, make_support
from test_train import SIZE, make_shapes

import fss
from fss.errors import FssError
from fss.kernels import logistic
from fss.models.base import build_model
from fss.models.encoders import encoder_names
from fss.models.oslsm import SUPPORT_SIZE, oslsm_meta
from fss.runtime.cli import main as run_main
from fss.runtime.segmenter import Segmenter
from fss.train.cli import main as train_main
from fss.train.eval_cli import main as eval_main


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=5)


def tiny_oslsm(encoder="vgg16-dilated", width=0.125, seed=0, input_size=SIZE):
    """A random narrow OSLSM whose logits are not all of one sign (fc8 starts at zero in training)."""
    torch.manual_seed(seed)
    model = build_model("oslsm", encoder, width, {"input_size": input_size})
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    torch.nn.init.normal_(model.cond_fc8.weight, std=0.05)
    torch.nn.init.normal_(model.cond_fc8.bias, std=0.05)
    return model.eval()


def test_official_geometry_vgg16():
    model = tiny_oslsm()
    assert model.meta["oslsm"]["geometry"] == "fcn32s"
    assert model.meta["support_size"] == SUPPORT_SIZE
    with torch.no_grad():
        assert model.encode(torch.zeros(1, 3, 500, 500)).shape[-2:] == (18, 18)  # the paper's test query
        assert model.condition(torch.zeros(2, 3, 224, 224), torch.ones(2, 224, 224)).shape == (2, 513)
    assert model.fc6.kernel_size == (7, 7)
    assert model.geometry(500) == (32.0, 8.5, 500, 500)
    official = oslsm_meta("vgg16-dilated", 1.0, None)  # the official widths
    assert (official["channels"], official["cond_channels"], official["hash_inputs"]) == (4096, 4096, 1000)
    assert official["logit_scale"] == 1.0
    assert (model.fc6.out_channels, model.cond_fc6.in_features) == (512, 64 * 7 * 7)  # x width 0.125
    assert model.hashing.kappa.shape == (513,)


def test_conditioning_sees_only_the_masked_support():
    model = tiny_oslsm()
    rng = torch.Generator().manual_seed(0)
    img = torch.randn(1, 3, SUPPORT_SIZE, SUPPORT_SIZE, generator=rng)
    fg = torch.zeros(1, SUPPORT_SIZE, SUPPORT_SIZE)
    fg[:, 40:150, 60:170] = 1
    other = img.clone()
    other[..., :30, :] = torch.randn(1, 3, 30, SUPPORT_SIZE, generator=rng)  # outside the mask only
    with torch.no_grad():
        a, b = model.condition(img, fg), model.condition(other, fg)
        assert torch.equal(a, b)
        assert not torch.equal(a, model.condition(img, torch.ones_like(fg)))


def test_forward_is_the_head_and_shot_mask_repeats_shots():
    model = tiny_oslsm()
    g = torch.Generator().manual_seed(1)
    supp = torch.randn(1, 2, 3, 3, SIZE, SIZE, generator=g)
    fg = (torch.rand(1, 2, 3, SIZE, SIZE, generator=g) > 0.5).float()
    qry = torch.randn(1, 2, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        logits = model(supp, fg, 1 - fg, qry)
        assert logits.shape == (1, 2, 3, SIZE, SIZE) and (logits[:, :, 0] == 0).all()
        feats = model.encode(qry[0])[None]
        weights = model.episode_state(supp, fg, 1 - fg)
        labels = logistic.segment(feats, weights, (SIZE, SIZE), model.geometry(SIZE), impl="torch")
        assert torch.equal(labels, logits.argmax(dim=2).to(torch.uint8))
        # Way 1 has one real shot: absent shots repeat it, which the max over shots ignores.
        mask = torch.tensor([[[True, True, True], [True, False, False]]])
        padded = model(supp, fg, 1 - fg, qry, shot_mask=mask)
        alone = model(supp[:, 1:, :1], fg[:, 1:, :1], 1 - fg[:, 1:, :1], qry)
        # Batches of 6 and 1 supports take other BLAS blockings: float32 rounding, relative to the logits.
        scale = alone[:, :, 1].abs().max().item()
        torch.testing.assert_close(padded[:, :, 2], alone[:, :, 1], rtol=0, atol=1e-5 * scale)


def test_checkpoint_round_trip_keeps_the_hashing(tmp_path):
    model = tiny_oslsm(encoder="efficientnet-lite0", width=1.0)
    fss.save_checkpoint(model, tmp_path / "o.pt")
    loaded = fss.load_model(tmp_path / "o.pt")
    assert loaded.meta["method"] == "oslsm" and loaded.meta["oslsm"] == model.meta["oslsm"]
    assert loaded.meta["oslsm"]["geometry"] == "stride8"
    assert torch.equal(loaded.hashing.kappa, model.hashing.kappa)
    assert loaded.hashing.regenerated()  # the stored map is the one its stored seed gives
    obj = torch.load(tmp_path / "o.pt", weights_only=True)
    assert "hashing.kappa" in obj["state_dict"] and "hashing.zeta" in obj["state_dict"]
    obj["meta"]["oslsm"]["channels"] = "many"
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(FssError, match="oslsm.channels must be an integer"):
        fss.load_model(tmp_path / "bad.pt")


def test_segmenter_conditions_once_per_support_set(tmp_path, monkeypatch):
    model = tiny_oslsm()
    calls = []
    condition = model.condition_masked
    monkeypatch.setattr(
        model, "condition_masked", lambda masked: calls.append(len(masked)) or condition(masked)
    )
    seg = Segmenter(model, device="cpu", batch=2, backend="torch")  # counts torch calls
    support = make_support(tmp_path / "s", classes=("cat", "dog"), shots=(2, 1))
    images = [sorted((support / c).glob("*.jpg")) for c in ("cat", "dog")]
    masks = [[p.with_suffix(".png") for p in shots] for shots in images]
    seg.set_support(images, masks, ["cat", "dog"])
    assert sum(calls) == 3
    queries = sorted(make_queries(tmp_path / "q", n=3).glob("*.jpg"))
    labels = seg.segment(queries)
    labels_again, prob = seg.segment(queries, return_prob=True)
    assert sum(calls) == 3  # queries never run the conditioning branch
    assert all(np.array_equal(a, b) for a, b in zip(labels, labels_again, strict=True))
    assert all(lab.shape == (36 + i, 40 + 3 * i) for i, lab in enumerate(labels))
    assert all(((p >= 0.5) & (p <= 1)).all() for p in prob)
    # Incremental shots: only the new shot is conditioned; removing it restores the labels.
    seg.add_shot("dog", images[0][0], masks[0][0])
    assert sum(calls) == 4
    seg.remove_shot("dog", 1)
    assert all(np.array_equal(a, b) for a, b in zip(labels, seg.segment(queries), strict=True))


def test_segmenter_labels_equal_the_models_argmax(tmp_path):
    model = tiny_oslsm(input_size=SUPPORT_SIZE)  # queries at the support size: no resizing differs
    rng = np.random.default_rng(2)
    imgs = [[(rng.random((SUPPORT_SIZE, SUPPORT_SIZE, 3)) * 255).astype(np.uint8)] for _ in range(2)]
    masks = [[(rng.random((SUPPORT_SIZE, SUPPORT_SIZE)) > 0.6).astype(np.uint8)] for _ in range(2)]
    query = (rng.random((SUPPORT_SIZE, SUPPORT_SIZE, 3)) * 255).astype(np.uint8)
    seg = Segmenter(model, device="cpu")
    seg.set_support(imgs, masks)
    labels = seg.segment([query])[0]
    prepared = [seg.prepare_shots(i, m) for i, m in zip(imgs, masks, strict=True)]
    supp = torch.stack([p[0] for p in prepared])[None]
    fg = torch.stack([p[1] for p in prepared])[None]
    qry = seg.load_query(query)[1][None, None]
    with torch.no_grad():
        logits = model(supp, fg, 1 - fg, qry)[0, 0]
    expected = logits.argmax(dim=0).numpy()
    top2 = logits.topk(2, dim=0).values
    # Conditioning shots one class at a time (Segmenter) or together rounds differently: near ties may flip.
    decided = (top2[0] - top2[1] > 1e-5 * top2[0].abs() + 1e-4).numpy()
    assert decided.mean() > 0.99
    assert np.array_equal(labels[decided], expected[decided])
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_oslsm_refuses_prototype_refinements():
    model = tiny_oslsm()
    with pytest.raises(FssError, match="oslsm has no refinement 'fusion'"):
        Segmenter(model, device="cpu", refine="fusion")


@pytest.mark.parametrize("encoder", encoder_names())
def test_every_encoder_carries_oslsm(encoder):
    """One training step's losses and gradients on each registered encoder (fss-train below on two)."""
    width = 0.125 if encoder.startswith("vgg") else 1.0
    model = build_model("oslsm", encoder, width).train()
    g = torch.Generator().manual_seed(0)
    supp = torch.randn(1, 1, 1, 3, SIZE, SIZE, generator=g)
    fg = (torch.rand(1, 1, 1, SIZE, SIZE, generator=g) > 0.5).float()
    labels = (torch.rand(1, 1, SIZE, SIZE, generator=g) > 0.5).long()
    query_loss, second = model.losses(supp, fg, 1 - fg, supp[:, 0], labels)
    assert torch.isclose(query_loss, torch.tensor(np.log(2), dtype=query_loss.dtype))  # fc8 starts at zero
    assert second == 0
    query_loss.backward()
    assert model.cond_fc8.weight.grad.abs().sum() > 0
    assert model.meta["oslsm"]["geometry"] == ("fcn32s" if encoder == "vgg16-dilated" else "stride8")


@pytest.mark.parametrize("encoder", ["vgg16-dilated", "efficientnet-lite0"])
def test_fss_train_oslsm(encoder, shapes, tmp_path):
    width = "0.125" if encoder.startswith("vgg") else "1.0"
    argv = ["--data", str(shapes), "--size", str(SIZE), "--width", width, "--val-classes", "bar,circle"]
    argv += ["--eval-episodes", "2", "--out", str(tmp_path), "--no-progress", "--iters", "2", "--seed", "1"]
    argv += ["--recipe", "paper"]
    assert train_main([*argv, "--method", "oslsm", "--encoder", encoder, "--batch-episodes", "2"]) == 0
    model = fss.load_model(tmp_path / "final.pt")
    assert model.meta["method"] == "oslsm" and model.meta["encoder"] == encoder
    assert model.meta["train_config"]["method"] == "oslsm"
    assert model.hashing.regenerated()
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert len(log) == 3 and all(np.isfinite(float(row.split(",")[2])) for row in log[1:])
    trained = model.state_dict()
    torch.manual_seed(1)
    fresh = build_model("oslsm", encoder, float(width)).state_dict()
    for key in ("cond_fc8.weight", "fc7.weight", "cond_fc6.weight"):  # both branches learn
        assert not torch.equal(trained[key], fresh[key]), key
    assert torch.equal(trained["hashing.kappa"], fresh["hashing.kappa"])  # fixed, never trained


def test_fss_eval_and_fss_run_on_an_oslsm_checkpoint(shapes, tmp_path, capsys):
    ckpt = tmp_path / "oslsm.pt"
    fss.save_checkpoint(tiny_oslsm(), ckpt)
    out = tmp_path / "eval.json"
    common = ["--data", str(shapes), "--runs", "1", "--episodes", "4", "--no-progress"]
    assert eval_main(["--ckpt", str(ckpt), *common, "--ways", "2", "--shots", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["refine"] == "none" and 0 <= result["mean_iou"] <= 1
    support = make_support(tmp_path / "support")
    queries = make_queries(tmp_path / "queries")
    assert run_main(["--ckpt", str(ckpt), "--support", str(support), "--query", str(queries),
                     "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len([q for q in summary["queries"] if "error" not in q]) == 3
    capsys.readouterr()
    assert run_main(["--ckpt", str(ckpt), "--support", str(support), "--query", str(queries),
                     "--out", str(tmp_path / "out2"), "--refine", "fusion"]) == 2  # fmt: skip
    assert "oslsm has no refinement 'fusion'" in capsys.readouterr().err


def test_an_oslsm_checkpoint_exports_both_branches_and_its_bundle_segments_alike(tmp_path):
    pytest.importorskip("onnxruntime")
    from fss.export.build import export_bundle

    ckpt = tmp_path / "oslsm.pt"
    fss.save_checkpoint(tiny_oslsm(input_size=48), ckpt)
    bundle, manifest = export_bundle(ckpt, tmp_path / "bundle")
    assert manifest["conditioning"]["input_size"] == SUPPORT_SIZE
    assert manifest["conditioning"]["verification"]["max_relative_error"] < 1e-4
    assert "conditioning.onnx" in manifest["files"]
    support = make_support(tmp_path / "support")
    images = [sorted((support / c).glob("*.jpg")) for c in ("cat", "dog")]
    masks = [[p.with_suffix(".png") for p in shots] for shots in images]
    queries = sorted(make_queries(tmp_path / "queries").glob("*.jpg"))
    results = []
    for model in (ckpt, bundle):
        seg = Segmenter(model, device="cpu")
        seg.set_support(images, masks, ["cat", "dog"])
        results.append(seg.segment(queries, return_prob=True))
    (ours, prob), (theirs, _) = results
    for a, b, p in zip(ours, theirs, prob, strict=True):
        assert len(np.unique(a)) > 1
        assert ((a != b) & (p > 0.5 + 1e-4)).sum() == 0  # only near-threshold pixels may differ
    assert fss.load_model(bundle).conditioning is not None


def test_memory_check_counts_the_official_query_padding(monkeypatch):
    from fss import memory

    model = tiny_oslsm()
    assert model.encoder_input_side(417) == 417 + 2 * 121
    assert tiny_oslsm("efficientnet-lite0", width=1.0).encoder_input_side(417) == 417
    unpadded = 417 * 417 * memory.bytes_per_input_pixel(model)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * unpadded)  # fits unpadded only
    with pytest.raises(FssError, match="size 417 needs about"):
        memory.check_encoder_memory(model, 417, 1, "cpu")
