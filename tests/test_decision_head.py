"""The learned decision head (``--refine learned``): its maps against a plain reference, a fresh head
deciding as self-support matching, checkpoints and bundles carrying it, and its training command."""

import hashlib

import pytest
import torch
from helpers import random_model
from test_train import SIZE, make_shapes

import fss
from fss.backends.bundle_model import load_bundle
from fss.errors import CheckpointError, FssError
from fss.export.build import export_bundle
from fss.models.base import resolve_refine
from fss.models.decision_head import MAP_CHANNELS, DecisionHead, decision_logits, matching_maps
from fss.models.self_support import self_support_prototypes
from fss.train.decision import main as decision_main

WIDTH = 8


def cos(feats, proto):
    """``C x h x w`` features, ``C`` prototype -> ``h x w`` cosines, one position at a time."""
    C, h, w = feats.shape
    out = torch.empty(h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            out[y, x] = torch.nn.functional.cosine_similarity(feats[:, y, x], proto, dim=0)
    return out


def maps_reference(qry_feats, protos, scale):
    """:func:`matching_maps` spelled out per episode, query, class and position, in float64."""
    qry_feats, protos = qry_feats.double(), protos.double()
    refined = self_support_prototypes(qry_feats, protos, scale)
    B, Q, _, h, w = qry_feats.shape
    N = protos.shape[1] - 1
    out = torch.empty(B, Q, N, MAP_CHANNELS, h, w, dtype=torch.float64)
    for b in range(B):
        for q in range(Q):
            f = qry_feats[b, q]
            for n in range(N):
                bg, fg = cos(f, protos[b, 0]), cos(f, protos[b, n + 1])
                lead = (fg - bg).flatten().sort(descending=True).values
                stats = (lead[0], lead[: min(10, lead.numel())].mean(), (lead > 0).double().mean())
                local = (bg, fg, cos(f, refined[b, 0]), cos(f, refined[b, n + 1]))
                out[b, q, n] = torch.stack([*local, *(torch.full((h, w), float(v)) for v in stats)])
    return out


@pytest.mark.parametrize("B, Q, N, h, w", [(1, 1, 1, 5, 5), (2, 3, 2, 7, 4), (1, 2, 3, 3, 9)])
def test_matching_maps_equal_the_reference(B, Q, N, h, w):
    torch.manual_seed(B * 100 + Q * 10 + N)
    qry, protos = torch.randn(B, Q, 6, h, w), torch.randn(B, 1 + N, 6)
    got = matching_maps(qry, protos, 20.0)
    assert got.shape == (B, Q, N, MAP_CHANNELS, h, w)
    torch.testing.assert_close(got.double(), maps_reference(qry, protos, 20.0), atol=1e-5, rtol=1e-5)


def test_a_fresh_head_decides_as_self_support_matching_for_one_class():
    torch.manual_seed(0)
    model = random_model(input_size=SIZE, seed=3)
    model.meta["decision_head"] = {"width": WIDTH, "threshold": 0.0}
    model.decision_head = DecisionHead(WIDTH, model.scale)
    qry, protos = torch.randn(2, 3, 64, 9, 11), torch.randn(2, 2, 64)
    with torch.inference_mode():
        learned = model.segment(qry, protos, (37, 41), refine="learned")
        ssp = model.segment(qry, protos, (37, 41), refine="ssp")
    assert learned.shape == ssp.shape == (2, 3, 37, 41) and learned.dtype == torch.uint8
    assert (learned != ssp).double().mean() < 1e-3  # ties of float rounding only


def test_the_threshold_is_the_logit_a_class_must_exceed():
    torch.manual_seed(1)
    head = DecisionHead(WIDTH)
    qry, protos = torch.randn(1, 2, 16, 6, 6), torch.randn(1, 4, 16)
    with torch.inference_mode():
        plain, strict = (
            decision_logits(head, qry, protos, 20.0),
            decision_logits(head, qry, protos, 20.0, 2.5),
        )
    assert plain.shape == (1, 2, 4, 6, 6) and (plain[:, :, 0] == 0).all() and (strict[:, :, 0] == 0).all()
    torch.testing.assert_close(strict[:, :, 1:], plain[:, :, 1:] - 2.5)
    with pytest.raises(ValueError, match="maps must be"):
        head(torch.randn(2, 5, 4, 4))


def learned_model(seed=4, threshold=-0.5) -> fss.PANet:
    model = random_model(input_size=SIZE, seed=seed)
    model.meta.update(refine="learned", decision_head={"width": WIDTH, "threshold": threshold})
    torch.manual_seed(seed)
    model.decision_head = DecisionHead(WIDTH, model.scale)
    torch.nn.init.normal_(model.decision_head.out[-1].weight, std=0.5)  # not the fresh head's identity
    return model.eval()


def test_a_checkpoint_carries_its_head_and_refuses_a_bad_one(tmp_path):
    model = learned_model()
    fss.save_checkpoint(model, tmp_path / "learned.pt")
    loaded = fss.load_model(tmp_path / "learned.pt")
    assert resolve_refine(None, loaded) == "learned"
    qry, protos = torch.randn(1, 2, 64, 5, 5), torch.randn(1, 3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded.logits(qry, protos, (21, 21), "learned"), model.logits(qry, protos, (21, 21), "learned")
        )
    for bad, problem in (
        ({"width": 0, "threshold": 0.0}, "width"),
        ({"width": 8, "threshold": "x"}, "threshold"),
    ):
        model.meta["decision_head"] = bad
        fss.save_checkpoint(model, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=f"decision_head.*{problem}"):
            fss.load_model(tmp_path / "bad.pt")
    with pytest.raises(FssError, match="needs a checkpoint with a decision head"):
        resolve_refine("learned", random_model(input_size=SIZE))


def test_a_bundle_runs_the_head_as_the_checkpoint_does(tmp_path):
    model = learned_model(seed=5)
    fss.save_checkpoint(model, tmp_path / "learned.pt")
    out, manifest = export_bundle(tmp_path / "learned.pt", tmp_path / "bundle")
    assert (
        manifest["decision_head"] == {"weights": "decision_head.pt"}
        and "decision_head.pt" in manifest["files"]
    )
    bundle = load_bundle(out)
    images = torch.rand(2, 3, SIZE, SIZE)
    fg = torch.zeros(1, 1, 1, SIZE, SIZE)
    fg[..., 10:40, 12:50] = 1
    with torch.inference_mode():
        feats = model.encode(images)
        protos = model.episode_state(feats[:1][None, None], fg, 1 - fg)
        want = model.logits(feats[1:][None], protos, (SIZE, SIZE), "learned")
        got = bundle.logits(bundle.encode(images[1:])[None], protos, (SIZE, SIZE), "learned")
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)  # ONNX Runtime's encoder: float32 rounding


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=5)


def test_the_head_is_learned_from_training_classes_and_written_beside(shapes, tmp_path, capsys):
    meta = {"input_size": SIZE, "classes": ["bar", "square", "circle"]}
    fss.save_checkpoint(fss.PANet(width=0.0625, meta=meta), tmp_path / "tiny.pt")
    source, target = tmp_path / "tiny.pt", tmp_path / "learned.pt"
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    data = ["--data", str(shapes)]
    assert (
        decision_main([str(source), str(target), *data, "--episodes", "24", "--steps", "4", "--width", "4"])
        == 0
    )
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    learned = fss.load_model(target)
    assert learned.meta["refine"] == "learned" and learned.meta["decision_head"]["width"] == 4
    assert "threshold" in capsys.readouterr().out
    with torch.inference_mode():
        labels = learned.segment(torch.randn(1, 2, 32, 5, 5), torch.randn(1, 3, 32), (17, 17), "learned")
    assert labels.shape == (1, 2, 17, 17) and int(labels.max()) <= 2
    assert decision_main([str(source), str(source), *data]) == 2
    assert "must not replace its source" in capsys.readouterr().err
    assert decision_main([str(source), str(tmp_path / "x.pt"), *data, "--classes", "hexagon"]) == 2
    assert "hexagon" in capsys.readouterr().err


def test_fine_tuning_a_learned_checkpoint_leaves_its_head_behind(shapes, tmp_path):
    from test_train import config

    from fss.train.trainer import train

    fss.save_checkpoint(learned_model(), tmp_path / "init.pt")
    train(config(shapes, tmp_path / "run", val_classes=["bar"], init=tmp_path / "init.pt", iters=1))
    tuned = fss.load_model(tmp_path / "run" / "final.pt")
    assert tuned.meta["refine"] == "ssp" and "decision_head" not in tuned.meta
    assert not hasattr(tuned, "decision_head")
