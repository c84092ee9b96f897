"""SST: the inner step against autograd and finite differences, IoU weighting by hand, ragged K-shot, the
cached support path against the uncached one, and fss-train / fss-eval / fss-run on SST checkpoints."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_train import SIZE, make_shapes

import fss
from fss.errors import FssError
from fss.models import sst
from fss.models.base import build_model, method_of, resolve_refine
from fss.models.encoders import encoder_names

TINY = {"channels": 4, "blocks": 1, "dropout": 0.0}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=5)


def tiny_sst(seed=0, encoder="vgg16-dilated", width=0.0625, **options) -> sst.SST:
    torch.manual_seed(seed)
    meta = {"input_size": SIZE, "sst": {**TINY, **options}}
    return build_model("sst", encoder, width, meta).eval()


def support_case(seed=0, K=2, C=3, h=5, H=20):
    """``K x C x h x w`` float64 feature maps, ``K x H x W`` fg / bg masks with some ignored pixels."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(K, C, h, h, generator=gen, dtype=torch.float64)
    fg = torch.zeros(K, H, H, dtype=torch.float64)
    fg[0, 3:12, 4:15] = 1
    fg[1:, 10:18, 2:9] = 1
    bg = 1 - fg
    bg[:, 0, :] = 0  # ignored row: neither fg nor bg
    return feats, fg, bg


def reference_shot_loss(head, feats, fg, labels):
    """One shot's self-segmentation loss written out: pool, tile, decode, upsample, cross-entropy."""
    mask = F.interpolate(fg[None, None], size=feats.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    desc = (feats * mask).sum(dim=(1, 2)) / (mask.sum() + 5e-4)
    tiled = desc[:, None, None].expand_as(feats)
    low = head.decode(feats[None], tiled[None])
    up = F.interpolate(low, size=fg.shape, mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels[None], ignore_index=255)


def tiny_head(seed=0, C=3):
    torch.manual_seed(seed)
    return sst.SSTHead(C, C, blocks=1, dropout=0.0).double().eval()


def test_inner_step_equals_autograd_per_shot_and_leaves_weights_alone():
    head = tiny_head()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    feats, fg, bg = support_case()
    labels = sst.support_labels(fg, bg)
    tuned, losses, _ = sst.inner_step(head, feats, fg, labels, step=0.7)
    for k in range(len(feats)):
        leaf = feats[k].clone().requires_grad_(True)
        loss = reference_shot_loss(head, leaf, fg[k], labels[k])
        (grad,) = torch.autograd.grad(loss, leaf)
        assert losses[k].item() == pytest.approx(loss.item(), rel=1e-12)
        torch.testing.assert_close(tuned[k], feats[k] - 0.7 * grad, rtol=1e-12, atol=1e-15)
    for key, value in head.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.grad is None for p in head.parameters())
    assert not tuned.requires_grad  # inference: constants out


def test_inner_step_gradient_against_finite_differences():
    head = tiny_head(seed=1)
    feats, fg, bg = support_case(seed=1, K=1)
    labels = sst.support_labels(fg, bg)
    tuned, _, _ = sst.inner_step(head, feats, fg, labels, step=1.0)
    grad = feats - tuned
    eps = 1e-6
    for index in [(0, 0, 0, 0), (0, 1, 2, 3), (0, 2, 4, 1), (0, 0, 3, 3)]:
        plus, minus = feats.clone(), feats.clone()
        plus[index] += eps
        minus[index] -= eps
        numeric = (
            reference_shot_loss(head, plus[0], fg[0], labels[0])
            - reference_shot_loss(head, minus[0], fg[0], labels[0])
        ) / (2 * eps)
        assert grad[index].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-10)


def test_second_order_differentiates_through_the_step_first_order_does_not():
    head = tiny_head(seed=2)
    feats, fg, bg = support_case(seed=2, K=1)
    labels = sst.support_labels(fg, bg)
    weight = head.classifier.weight

    def outcome(create_graph):
        tuned, _, _ = sst.inner_step(head, feats.clone().requires_grad_(True), fg, labels, 1.0, create_graph)
        return (tuned**2).sum()

    def numeric():  # d outcome / d weight[0, 0] with the step recomputed: the exact (second-order) answer
        eps, values = 1e-6, []
        for sign in (1, -1):
            with torch.no_grad():
                weight[0, 0] += sign * eps
            values.append(outcome(False).item())
            with torch.no_grad():
                weight[0, 0] -= sign * eps
        return (values[0] - values[1]) / (2 * eps)

    second = torch.autograd.grad(outcome(True), weight, allow_unused=True)[0]
    assert second is not None and second[0, 0].item() == pytest.approx(numeric(), rel=1e-5)
    first = outcome(False)
    assert not first.requires_grad or torch.autograd.grad(first, weight, allow_unused=True)[0] is None


def test_iou_and_weights_by_hand():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 1  # 4 foreground pixels
    labels[0, 3, 3] = 255
    pred = torch.zeros(1, 4, 4, dtype=torch.bool)
    pred[0, :2, :1] = True  # 2 of them
    pred[0, 2, 0] = True  # 1 false positive
    pred[0, 3, 3] = True  # on an ignored pixel: not counted
    logits = torch.stack([~pred, pred], dim=1).float()
    assert sst.foreground_iou(logits, labels).item() == pytest.approx(2 / 5)

    iou = torch.tensor([[0.6, 0.2, 0.9], [0.0, 0.0, 0.0]])
    shot_mask = torch.tensor([[True, True, False], [True, True, False]])
    weights = sst.shot_weights(iou, shot_mask)
    torch.testing.assert_close(weights, torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.5, 0.0]]))


class ConstantHead:
    """A head whose foreground logit is the descriptor's first entry, everywhere (background logit 0)."""

    def relate(self, qry, desc):
        logit = desc[:, 0, None, None].expand(-1, *qry.shape[-2:])
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


def test_k_shot_prediction_is_the_iou_weighted_sum_eq14():
    desc = torch.tensor([[[0.0, 9.0], [float(np.log(3.0)), 9.0], [5.0, 9.0]]])  # 1 way, 3 shots (C = 2)
    iou = torch.tensor([[0.3, 0.1, 0.7]])
    shot_mask = torch.tensor([[True, True, False]])  # the third is padding
    state = sst.support_state(desc, sst.shot_weights(iou, shot_mask))[None]  # B x N x K x (C + 1)
    qry = torch.zeros(1, 1, 2, 3, 3)
    prob = sst.way_probabilities(ConstantHead(), qry, state, (6, 6))
    # sigmoid(0) = 1/2 and sigmoid(log 3) = 3/4, weighted 0.75 / 0.25: 0.75 * 0.5 + 0.25 * 0.75 = 0.5625
    torch.testing.assert_close(prob[0, 0, 0, 1], torch.full((6, 6), 0.5625))
    torch.testing.assert_close(prob[0, 0, 0, 0], torch.full((6, 6), 0.4375))
    logp = sst.combined_log_probs(prob)
    torch.testing.assert_close(logp.exp()[0, 0, :, 0, 0], torch.tensor([0.4375, 0.5625]))


def random_episode(seed, N, K, S=SIZE, Q=2):
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(1, N, K, 3, S, S, generator=gen)
    fg = torch.zeros(1, N, K, S, S)
    for n in range(N):
        for k in range(K):
            y, x = (int(v) for v in torch.randint(0, S // 2, (2,), generator=gen))
            fg[0, n, k, y : y + S // 3 + n * 3, x : x + S // 3 + k * 2] = 1
    return imgs, fg, 1 - fg, torch.randn(1, Q, 3, S, S, generator=gen)


@pytest.mark.parametrize("refine", ["tune", "none"])
def test_ragged_ways_equal_each_way_on_its_own(refine):
    model = tiny_sst(seed=3)
    imgs, fg, bg, qry = random_episode(3, N=2, K=3)
    shot_mask = torch.tensor([[[True, True, True], [True, False, False]]])
    with torch.no_grad():
        both = model(imgs, fg, bg, qry, shot_mask, refine=refine)
        alone = [model(imgs[:, :1], fg[:, :1], bg[:, :1], qry, refine=refine)]
        alone.append(model(imgs[:, 1:, :1], fg[:, 1:, :1], bg[:, 1:, :1], qry, refine=refine))
    expected_bg = (alone[0][:, :, 0] + alone[1][:, :, 0]) / 2
    torch.testing.assert_close(both[:, :, 0], expected_bg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[:, :, 1], alone[0][:, :, 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[:, :, 2], alone[1][:, :, 1], rtol=1e-5, atol=1e-6)
    # the padded shots' contents do not matter
    noisy = imgs.clone()
    noisy[0, 1, 1:] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(model(noisy, fg, bg, qry, shot_mask, refine=refine), both)


def as_uint8_image(t):
    return (t.clamp(-2, 2) * 60 + 128).round().byte().permute(1, 2, 0).numpy()


def test_cached_support_equals_the_uncached_path(tmp_path):
    model = tiny_sst(seed=4)
    path = tmp_path / "sst.pt"
    fss.save_checkpoint(model, path)
    imgs, fg, bg, qry = random_episode(4, N=2, K=2)
    images = [[as_uint8_image(imgs[0, n, k]) for k in range(2)] for n in range(2)]
    images[1] = images[1][:1]  # ragged: class b has one shot
    masks = [[fg[0, n, k].numpy().astype(np.uint8) for k in range(2)] for n in range(2)]
    masks[1] = masks[1][:1]
    queries = [as_uint8_image(q) for q in qry[0]]
    seg = fss.Segmenter(path, impl="torch")
    assert seg.refine == "tune"
    seg.set_support(images, masks, ["a", "b"])
    cached = seg.segment(queries)

    loaded = fss.load_model(path)
    norm = loaded.meta["normalisation"]
    mean, std = torch.tensor(norm["mean"])[:, None, None], torch.tensor(norm["std"])[:, None, None]

    def tensor(image):
        return (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std

    supp = torch.stack(
        [torch.stack([tensor(images[n][k % len(images[n])]) for k in range(2)]) for n in range(2)]
    )
    sfg = torch.stack(
        [
            torch.stack([torch.from_numpy(masks[n][k % len(masks[n])]).float() for k in range(2)])
            for n in range(2)
        ]
    )
    shot_mask = torch.tensor([[[True, True], [True, False]]])
    q = torch.stack([tensor(image) for image in queries])[None]
    with torch.no_grad():
        uncached = loaded(supp[None], sfg[None], 1 - sfg[None], q, shot_mask).argmax(dim=2)[0]
    for labels, reference in zip(cached, uncached, strict=True):
        assert np.array_equal(labels, reference.numpy())
    # adding and removing a shot changes only that shot's cached state
    seg.add_shot("b", images[0][1], masks[0][1])
    seg.remove_shot("b", 1)
    for labels, again in zip(cached, seg.segment(queries), strict=True):
        assert np.array_equal(labels, again)


def test_refinements_belong_to_their_method(tmp_path):
    model = tiny_sst()
    assert resolve_refine(None, model) == "tune" and resolve_refine("none", model) == "none"
    with pytest.raises(FssError, match="sst has no refinement 'fusion'"):
        resolve_refine("fusion", model)
    panet = fss.PANet(width=0.0625)
    with pytest.raises(FssError, match="panet has no refinement 'tune'"):
        resolve_refine("tune", panet)
    assert method_of(panet).name == "panet"


def test_checkpoint_round_trip_keeps_options(tmp_path):
    model = tiny_sst(inner_lr=0.5, second_order=False)
    fss.save_checkpoint(model, tmp_path / "m.pt")
    loaded = fss.load_model(tmp_path / "m.pt")
    assert isinstance(loaded, sst.SST) and loaded.options == model.options
    for ours, theirs in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs)
    with pytest.raises(FssError, match="unknown SST option"):
        build_model("sst", "vgg16-dilated", 0.0625, {"sst": {"nosuch": 1}})


@pytest.mark.parametrize("encoder", encoder_names())
def test_fss_train_sst_on_every_encoder_then_eval_and_run(encoder, shapes, tmp_path, capsys):
    from fss.runtime.cli import main as run_main
    from fss.train.cli import main as train_main
    from fss.train.eval_cli import main as eval_main

    width = "0.0625" if encoder.startswith("vgg") else "1"
    out = tmp_path / "run"
    args = ["--method", "sst", "--data", str(shapes), "--encoder", encoder, "--width", width, "--size", "33"]
    args += ["--iters", "2", "--eval-episodes", "2", "--eval-every", "0", "--out", str(out), "--no-progress"]
    args += ["--sst-channels", "8", "--sst-blocks", "1", "--val-classes", "circle,bar", "--recipe", "paper"]
    assert train_main(args) == 0
    ckpt = out / "final.pt"
    model = fss.load_model(ckpt)
    assert model.meta["method"] == "sst" and model.meta["encoder"] == encoder
    assert model.meta["sst"]["channels"] == 8 and model.meta["train_config"]["method_options"]["blocks"] == 1
    if encoder != "efficientnet-lite0":
        return  # the commands below are the same on every encoder
    capsys.readouterr()
    evals = ["--ckpt", str(ckpt), "--data", str(shapes), "--runs", "1", "--episodes", "3", "--no-progress"]
    assert eval_main([*evals, "--shots", "2", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["refine"] == "tune"
    assert eval_main([*evals, "--refine", "none"]) == 0
    support = tmp_path / "support"
    for cls in ("circle", "bar"):
        (support / cls).mkdir(parents=True)
        for suffix in (".jpg", ".png"):
            (support / cls / f"{cls}0{suffix}").write_bytes((shapes / cls / f"{cls}0{suffix}").read_bytes())
    query = tmp_path / "query"
    query.mkdir()
    (query / "q.jpg").write_bytes((shapes / "circle" / "circle1.jpg").read_bytes())
    assert (
        run_main(
            [
                "--support",
                str(support),
                "--query",
                str(query),
                "--out",
                str(tmp_path / "o"),
                "--ckpt",
                str(ckpt),
            ]
        )
        == 0
    )
    assert (tmp_path / "o" / "q.png").exists()


def test_sst_options_are_refused_for_other_methods(shapes, tmp_path, capsys):
    from fss.train.cli import main as train_main

    args = ["--data", str(shapes), "--out", str(tmp_path / "r"), "--size", str(SIZE), "--sst-channels", "8"]
    assert train_main(args) == 2
    assert "--sst-* options apply to --method sst" in capsys.readouterr().err


def test_bundle_exports_encoder_and_head_and_runs_like_the_checkpoint(tmp_path, capsys):
    from fss.backends.bundle_model import load_bundle
    from fss.export.build import export_bundle
    from fss.export.head import HEAD_ONNX, HEAD_WEIGHTS
    from fss.runtime.cli import main as run_main

    model = tiny_sst(seed=5, encoder="efficientnet-lite0", width=1.0)
    ckpt = tmp_path / "sst.pt"
    fss.save_checkpoint(model, ckpt)
    out, manifest = export_bundle(ckpt, tmp_path / "bundle")
    assert {HEAD_ONNX, HEAD_WEIGHTS} <= set(manifest["files"]) and manifest["head"]["file"] == HEAD_ONNX
    assert manifest["verification"]["head"]["onnxruntime"]["max_relative_error"] <= 1e-4
    bundle = load_bundle(out)
    imgs, fg, bg, qry = random_episode(5, N=2, K=2)
    with torch.no_grad():
        expected = model(imgs, fg, bg, qry)
    torch.testing.assert_close(bundle(imgs, fg, bg, qry, refine="tune"), expected, rtol=1e-3, atol=1e-3)

    support = tmp_path / "support" / "thing"
    support.mkdir(parents=True)
    query = tmp_path / "query"
    query.mkdir()
    for i, image in enumerate(imgs[0, 0]):
        Image.fromarray(as_uint8_image(image)).save(support / f"s{i}.png")
        Image.fromarray(fg[0, 0, i].numpy().astype(np.uint8) * 255).save(support / f"s{i}_mask.png")
    Image.fromarray(as_uint8_image(qry[0, 0])).save(query / "q.png")
    masks = {}
    for name, source in (("ckpt", ["--ckpt", str(ckpt)]), ("bundle", ["--bundle", str(out)])):
        argv = ["--support", str(tmp_path / "support"), "--query", str(query), "--out", str(tmp_path / name)]
        assert run_main([*argv, *source, "--no-overlays"]) == 0
        masks[name] = np.asarray(Image.open(tmp_path / name / "q.png"))
    assert (masks["ckpt"] == masks["bundle"]).mean() > 0.99


def test_tune_refinement_moves_the_support_features_and_none_does_not():
    imgs, fg, bg, qry = random_episode(6, N=1, K=2)
    with torch.no_grad():
        big = tiny_sst(seed=1, inner_lr=1e4)  # (seed 6: dead ReLUs, dL/dR = 0)
        assert not torch.allclose(
            big(imgs, fg, bg, qry, refine="tune"), big(imgs, fg, bg, qry, refine="none")
        )
        still = tiny_sst(seed=1, inner_lr=0.0)
        torch.testing.assert_close(
            still(imgs, fg, bg, qry, refine="tune"), big(imgs, fg, bg, qry, refine="none")
        )


def test_fss_export_prints_the_head(tmp_path, capsys):
    from fss.export.cli import main as export_main

    ckpt = tmp_path / "sst.pt"
    fss.save_checkpoint(tiny_sst(seed=1), ckpt)
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "bundle")]) == 0
    assert "head (head.onnx) vs eager PyTorch: relative error" in capsys.readouterr().out
