"""Presence (#24): negative episodes, pixels painted on photos without the class, presence scores and
their gate, the calibration learned from negatives, and self-support prototypes."""

import hashlib
import json

import numpy as np
import pytest
import torch
from test_train import SIZE, make_shapes

import fss
from fss.errors import CheckpointError, FssError
from fss.kernels.matching import cosine_logits
from fss.models.base import build_model, resolve_refine
from fss.models.presence import gate_logits, presence_features, presence_scores
from fss.models.self_support import self_support_prototypes
from fss.train.data import EpisodeSampler, FolderDataset
from fss.train.eval_cli import main as eval_main
from fss.train.evaluate import absent_shares
from fss.train.presence import main as presence_main


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=5)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = fss.PANet(width=0.0625, meta={"input_size": SIZE, "classes": ["bar", "square", "circle"]})
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    fss.save_checkpoint(model, path)
    return path


# -- negative episodes ----------------------------------------------------------------------------------
def test_negative_queries_show_none_of_the_episode_classes(shapes):
    dataset = FolderDataset(shapes, SIZE)
    sampler = EpisodeSampler(dataset, dataset.classes, 2, 1, 2, rng=np.random.default_rng(0), negatives=1.0)
    for _ in range(10):
        episode, _ = sampler.draw()
        classes = {way.cls for way in episode}
        photos = [item.photo for way in episode for item in way.supports + way.queries]
        assert len(set(photos)) == len(photos)
        for way in episode:
            for query in way.queries:
                assert not any(query in dataset.items[cls] for cls in classes)
    batch = sampler.batch(4)
    assert (batch.qry_labels == 0).all()


def test_no_negatives_leaves_the_episodes_of_a_seed_unchanged(shapes):
    dataset = FolderDataset(shapes, SIZE)

    def drawn(**options):
        sampler = EpisodeSampler(dataset, dataset.classes, 1, 1, rng=np.random.default_rng(5), **options)
        return [sampler.draw()[0] for _ in range(8)]

    assert drawn() == drawn(negatives=0.0)
    half = [w.queries[0] in dataset.items[w.cls] for e in drawn(negatives=0.5) for w in e]
    assert 0 < sum(half) < len(half)


def test_absent_shares_count_only_ways_missing_from_a_query():
    labels = torch.zeros(1, 2, 4, 5, dtype=torch.long)
    labels[0, 0, :2] = 1  # query 0 shows way 1, not way 2; query 1 shows neither
    labels[0, 1, 0, 0] = 255
    pred = torch.zeros(1, 2, 4, 5, dtype=torch.uint8)
    pred[0, 0, 3, :2] = 2  # 2 of 20 pixels of query 0 painted as way 2
    pred[0, 1, 1:, :] = 1  # 15 of 19 counted pixels of query 1 painted as way 1
    pred[0, 1, 0, 0] = 2  # an ignored pixel does not count
    shares = sorted(absent_shares(pred, labels, ways=2).tolist())
    assert shares == pytest.approx(sorted([2 / 20, 15 / 19, 0.0]))


def test_eval_reports_pixels_painted_on_photos_without_the_class(shapes, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "eval.json"
    common = ["--ckpt", str(tiny_ckpt), "--data", str(shapes), "--classes", "circle,triangle"]
    common += ["--runs", "1", "--episodes", "12", "--json", str(out), "--no-progress", "--backend", "torch"]
    assert eval_main([*common, "--negatives", "0.5"]) == 0
    result = json.loads(out.read_text())
    assert result["negatives"] == 0.5 and 0 < result["absent"]["queries"] < 12
    assert 0 <= result["absent"]["mean_share"] <= 1
    assert "photos without the class" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        eval_main([*common, "--negatives", "1.5"])
    assert exited.value.code == 2 and "--negatives" in capsys.readouterr().err


# -- presence scores and the gate -----------------------------------------------------------------------
def test_presence_features_of_a_known_map():
    logits = torch.zeros(1, 1, 3, 2, 2)  # background 0 everywhere
    logits[0, 0, 1] = torch.tensor([[2.0, -1.0], [-1.0, -1.0]])  # class 1 wins one location
    logits[0, 0, 2] = -5.0  # class 2 wins nowhere
    stats = presence_features(logits)[0, 0]  # N x F
    prob = logits.softmax(dim=2)[0, 0]
    assert stats[0, 0] == pytest.approx(0.25) and stats[1, 0] == 0
    assert stats[0, 1] == pytest.approx(float(prob[1].max()))
    assert stats[0, 2] == pytest.approx(float(prob[1].mean()))
    assert stats[0, 3] == pytest.approx(float(prob[1, 0, 0])) and stats[1, 3] == 0
    assert stats[0, 4] == pytest.approx(2.0) and stats[1, 4] == pytest.approx(-5.0)
    assert torch.equal(presence_scores(logits), stats[None, None, :, 1])


def test_gate_drops_absent_classes_never_the_background():
    logits = torch.randn(2, 1, 3, 5, 6)
    scores = torch.tensor([[[0.9, 0.1]], [[0.1, 0.1]]])
    labels = gate_logits(logits, scores, 0.5).argmax(dim=2)
    kept = logits[0, :, :2].argmax(dim=1)  # query 0 without class 2: the argmax of the other two
    assert torch.equal(labels[0], kept) and not (labels[0] == 2).any()
    assert (labels[1] == 0).all()
    assert gate_logits(logits, scores, 0.0) is logits


def test_segment_present_is_the_fused_path_when_nothing_is_absent(tiny_ckpt):
    model = fss.load_model(tiny_ckpt).eval()
    torch.manual_seed(1)
    qry, protos = torch.randn(2, 3, 8, 5, 7), torch.randn(2, 3, 8)  # 2 episodes of 3 queries, 2 ways
    with torch.inference_mode():
        fused = model.segment(qry, protos, (19, 23), return_prob=True)
        (labels, prob), scores = model.segment_present(qry, protos, (19, 23), 0.0, return_prob=True)
        assert torch.equal(labels, fused[0]) and torch.equal(prob, fused[1])
        assert scores.shape == (2, 3, 2) and ((scores >= 0) & (scores <= 1)).all()
        gated, _ = model.segment_present(qry, protos, (19, 23), 1.01)
        assert (gated == 0).all()  # every class absent: all background
        one = scores[0, 0].min().item() + 1e-6  # the weaker class of the first query absent
        part, _ = model.segment_present(qry, protos, (19, 23), one)
        weaker = int(scores[0, 0].argmin()) + 1
        assert not (part[0, 0] == weaker).any()


@pytest.mark.parametrize(
    "presence, problem",
    [
        ("no", "must be a dict"),
        ({"mean": [0] * 4, "std": [1] * 5, "weights": [0] * 5, "bias": 0, "min_score": 0.5}, "mean"),
        ({"mean": [0] * 5, "std": [1, 1, 0, 1, 1], "weights": [0] * 5, "bias": 0, "min_score": 0.5}, "std"),
        ({"mean": [0] * 5, "std": [1] * 5, "weights": [0] * 5, "bias": float("nan"), "min_score": 0}, "bias"),
        ({"mean": [0] * 5, "std": [1] * 5, "weights": [0] * 5, "bias": 0, "min_score": 2}, "min_score"),
    ],
)
def test_a_bad_calibration_is_refused_at_load(tmp_path, presence, problem):
    model = fss.PANet(width=0.0625, meta={"input_size": SIZE, "presence": presence})
    fss.save_checkpoint(model, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=f"presence.*{problem}"):
        fss.load_model(tmp_path / "bad.pt")


def test_calibration_is_learned_from_training_classes_and_written_beside(shapes, tiny_ckpt, tmp_path, capsys):
    before = hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    target = tmp_path / "calibrated.pt"
    args = [str(tiny_ckpt), str(target), "--data", str(shapes), "--episodes", "40"]
    assert presence_main(args) == 0
    assert hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest() == before
    calibrated = fss.load_model(target)
    presence = calibrated.meta["presence"]
    assert 0 <= presence["min_score"] <= 1 and len(presence["weights"]) == 5
    assert "keeps" in capsys.readouterr().out
    with torch.inference_mode():
        qry, protos = torch.randn(1, 2, 8, 5, 7), torch.randn(1, 3, 8)
        scores = calibrated.presence(qry, protos)
        assert scores.shape == (1, 2, 2) and ((scores >= 0) & (scores <= 1)).all()
    assert presence_main([str(tiny_ckpt), str(tiny_ckpt), "--data", str(shapes)]) == 2
    assert "must not replace its source" in capsys.readouterr().err
    assert presence_main([str(tiny_ckpt), str(target), "--data", str(shapes), "--classes", "hexagon"]) == 2
    assert "hexagon" in capsys.readouterr().err


# -- self-support prototypes ----------------------------------------------------------------------------
def self_support_reference(qry_feats, protos, scale, fg_t=0.7, bg_t=0.6, fallback=12):
    """One episode at a time, one class at a time, as the module docstring says."""
    out = protos.clone()
    for b in range(len(protos)):
        feats = qry_feats[b].permute(1, 0, 2, 3).flatten(1)  # C x (Q h w)
        prob = cosine_logits(qry_feats[b : b + 1], protos[b : b + 1], scale)[0].softmax(1)  # Q x P x h x w
        prob = prob.permute(1, 0, 2, 3).flatten(1)  # P x (Q h w)
        for p in range(len(protos[b])):
            chosen = prob[p] > (bg_t if p == 0 else fg_t)
            if p == 0 and not chosen.any():
                chosen = torch.zeros_like(chosen)
                chosen[prob[0].topk(min(fallback, len(chosen))).indices] = True
            if not chosen.any():
                continue
            own = feats[:, chosen].mean(dim=1)
            w = 0.7 if p == 0 else 0.5
            s = protos[b, p]
            out[b, p] = (1 - w) * s / s.norm().clamp_min(1e-8) + w * own / own.norm().clamp_min(1e-8)
    return out


@pytest.mark.parametrize("B, Q, N, h, w", [(1, 1, 1, 5, 7), (2, 3, 2, 4, 3), (3, 2, 3, 6, 5)])
def test_self_support_prototypes_equal_the_reference(B, Q, N, h, w):
    torch.manual_seed(B * 100 + Q * 10 + N)
    qry = torch.randn(B, Q, 16, h, w)
    protos = torch.randn(B, 1 + N, 16)
    protos[:, 1] = qry[:, 0, :, 0, 0]  # a class that surely finds confident locations
    got = self_support_prototypes(qry, protos, 20.0)
    torch.testing.assert_close(got, self_support_reference(qry, protos, 20.0), atol=1e-5, rtol=1e-5)


def test_an_absent_class_keeps_its_support_prototype():
    qry = torch.zeros(1, 1, 4, 3, 3)
    qry[..., 0, :, :] = 1.0  # every location is the background direction
    protos = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
    got = self_support_prototypes(qry, protos, 20.0)
    assert torch.equal(got[0, 1], protos[0, 1])


def test_ssp_is_a_refinement_of_prototype_methods_only(tiny_ckpt):
    model = fss.load_model(tiny_ckpt)
    assert resolve_refine("ssp", model) == "ssp"
    with torch.inference_mode():
        qry, protos = torch.randn(1, 1, 8, 5, 7), torch.randn(1, 2, 8)
        labels = model.segment(qry, protos, (10, 14), refine="ssp")
        logits = model.logits(qry, protos, (10, 14), refine="ssp")
    assert torch.equal(labels, logits.argmax(dim=2).to(torch.uint8))
    sst = build_model("sst", "vgg16-dilated", 0.0625, {"input_size": SIZE})
    with pytest.raises(FssError, match="no refinement 'ssp'"):
        resolve_refine("ssp", sst)


def test_a_checkpoint_names_its_own_default_refinement(tmp_path):
    model = fss.PANet(width=0.0625, meta={"input_size": SIZE, "refine": "ssp"})
    fss.save_checkpoint(model, tmp_path / "ssp.pt")
    loaded = fss.load_model(tmp_path / "ssp.pt")
    assert resolve_refine(None, loaded) == "ssp" and resolve_refine("none", loaded) == "none"
    model.meta["refine"] = "sharpen"
    fss.save_checkpoint(model, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="refine"):
        fss.load_model(tmp_path / "bad.pt")


def test_fine_tuning_keeps_how_a_checkpoint_is_used_not_its_calibration(shapes, tmp_path):
    from test_train import config

    from fss.train.trainer import train

    calibration = {"mean": [0] * 5, "std": [1] * 5, "weights": [1] * 5, "bias": 0.0, "min_score": 0.3}
    meta = {"input_size": SIZE, "refine": "ssp", "edges": "guided", "presence": calibration}
    fss.save_checkpoint(fss.PANet(width=0.125, meta=meta), tmp_path / "init.pt")
    train(config(shapes, tmp_path / "run", val_classes=["bar"], init=tmp_path / "init.pt", iters=1))
    tuned = fss.load_model(tmp_path / "run" / "final.pt").meta
    assert tuned["refine"] == "ssp" and tuned["edges"] == "guided" and "presence" not in tuned
