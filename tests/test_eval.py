"""fss-eval: batched episodes equal one-at-a-time ones; runs, seeds; weak annotations; sampler statistics."""

import json

import numpy as np
import pytest
import torch
from test_train import SIZE, make_shapes

import fss
from fss.runtime.encoder_call import make_encoder
from fss.train.data import EpisodeSampler, FolderDataset, Item, episode_tensors
from fss.train.eval_cli import main
from fss.train.evaluate import FeatureCache, evaluate, evaluate_runs
from fss.train.weak import annotation_rng, box_masks, connected_components, scribble_masks


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=5)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = fss.PANet(width=0.0625, meta={"input_size": SIZE, "classes": ["bar", "square"]})
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    fss.save_checkpoint(model, path)
    return path


def test_batched_fast_path_equals_one_episode_at_a_time(shapes, tiny_ckpt):
    dataset = FolderDataset(shapes, SIZE)
    plain, fast = fss.load_model(tiny_ckpt, impl="torch"), fss.load_model(tiny_ckpt)
    encode = make_encoder(fast, torch.device("cpu"), 24, SIZE, "fp32", True, False)
    for ways, shots in ((1, 1), (2, 3)):
        common = (dataset, dataset.classes, ways, shots, 10)
        one = evaluate(plain, *common, batch_episodes=1, impl="torch")
        batched = evaluate(fast, *common, batch_episodes=4, encode=encode)
        encoded = []

        def counted(images, encoded=encoded):
            encoded.append(len(images))
            return encode(images)

        features = FeatureCache(counted, 64)
        cached = evaluate(fast, *common, batch_episodes=4, encode=encode, features=features)
        for result in (batched, cached):
            assert result["class_iou"] == pytest.approx(one["class_iou"], abs=1e-3)
            assert result["binary_iou"] == pytest.approx(one["binary_iou"], abs=1e-3)
        assert len(features.features) <= 20 and sum(encoded) < 10 * ways * (shots + 1)  # 20 photos


def test_runs_are_seeded_and_summarised(shapes, tiny_ckpt):
    dataset = FolderDataset(shapes, SIZE)
    model = fss.load_model(tiny_ckpt)
    result = evaluate_runs(model, dataset, ["circle", "triangle"], runs=3, seed=7, episodes=6)
    per_run = result["per_run"]
    assert [r["seed"] for r in per_run] == [7, 8, 9]
    assert (
        per_run[1]["mean_iou"]
        == evaluate(model, dataset, ["circle", "triangle"], seed=8, episodes=6)["mean_iou"]
    )
    ious = [r["mean_iou"] for r in per_run]
    assert result["mean_iou"] == pytest.approx(np.mean(ious)) and result["mean_iou_std"] == pytest.approx(
        np.std(ious)
    )
    assert result["class_iou"]["circle"] == pytest.approx(
        np.mean([r["class_iou"]["circle"] for r in per_run])
    )


def test_cli_defaults_to_unseen_classes_and_writes_json(shapes, tiny_ckpt, tmp_path, capsys):
    args = [
        "--ckpt",
        str(tiny_ckpt),
        "--data",
        str(shapes),
        "--runs",
        "2",
        "--episodes",
        "4",
        "--no-progress",
    ]
    assert main([*args, "--json", str(tmp_path / "out.json"), "--annotation", "scribble"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["classes"] == ["circle", "triangle"]  # the checkpoint was trained on bar and square
    assert result["annotation"] == "scribble" and result["settings"]["size"] == SIZE
    assert set(result) >= {"mean_iou", "mean_iou_std", "binary_iou", "binary_iou_std", "class_iou_std"}
    assert "run 2 (seed 1235)" in out and "binary-IoU" in out.splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing"], "support folder not found"),
        (["--ckpt", "{tmp}/none.pt"], "checkpoint not found"),
        (["--classes", "bar,dog"], "test class 'dog' is not a class folder"),
        (["--classes", "bar", "--fold", "1"], "give one"),
        (["--dataset", "coco"], "COCO annotations not found"),
        (["--dataset", "voc"], "VOC split list trainaug.txt not found"),
        (["--classes", "bar", "--ways", "2"], "test classes has 1 class(es) (bar), 2-way episodes need 2"),
        (["--classes", "bar", "--shots", "5"], "class 'bar' has 5 image(s), episodes need 6"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(shapes, tiny_ckpt, tmp_path, capsys, args, message):
    argv = ["--ckpt", str(tiny_ckpt), "--data", str(shapes), "--episodes", "2", "--no-progress"]
    assert main([*argv, *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fss-eval: error: ") and message in err and err.count("\n") == 1


# -- weak annotations -------------------------------------------------------------------------------


def test_box_is_one_instance_and_background_outside_all_boxes():
    mask = np.zeros((40, 40), bool)
    mask[2:10, 3:12] = True
    mask[20:35, 20:24] = True
    mask[22:26, 24:38] = True  # joined to the previous one: an L shape, one instance
    parts = connected_components(mask)
    assert [p.sum() for p in parts] == [15 * 4 + 4 * 14, 8 * 9]
    boxes = set()
    for seed in range(20):
        fg, bg = box_masks(parts, mask.shape, np.random.default_rng(seed))
        assert fg.any() and not (fg & bg).any()
        boxes.add(fg.sum())
        assert not bg[20:35, 20:38].any() and not bg[2:10, 3:12].any() and bg.sum() == 1600 - 15 * 18 - 8 * 9
    assert boxes == {15 * 18, 8 * 9}  # either instance's box, by chance
    fg, bg = box_masks([], (5, 5), np.random.default_rng(0))
    assert not fg.any() and bg.all()


def test_scribbles_lie_inside_the_masks_and_are_reproducible():
    fg = np.zeros((60, 60), bool)
    fg[10:40, 5:50] = True
    fg[45:58, 45:58] = True
    bg = ~fg
    a = scribble_masks(fg, bg, annotation_rng("photo", "cls"))
    b = scribble_masks(fg, bg, annotation_rng("photo", "cls"))
    c = scribble_masks(fg, bg, annotation_rng("photo", "other"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    fg_scribble, bg_scribble = a
    assert fg_scribble.any() and bg_scribble.any()
    assert not (fg_scribble & ~fg).any() and not (bg_scribble & ~bg).any()
    assert fg_scribble.sum() < 0.3 * fg.sum()  # a stroke, not the mask
    assert fg_scribble[10:40, 5:50].any() and fg_scribble[45:58, 45:58].any()  # both parts (>= 10%)


def test_weak_supports_in_episodes(shapes):
    dataset = FolderDataset(shapes, SIZE)
    episode, _ = EpisodeSampler(dataset, dataset.classes, 2, 2, rng=np.random.default_rng(0)).episode()
    _, dense_fg, dense_bg, _, qry = episode_tensors(dataset, episode)
    _, box_fg, box_bg, _, box_qry = episode_tensors(dataset, episode, annotation="box")
    _, scr_fg, scr_bg, _, _ = episode_tensors(dataset, episode, annotation="scribble")
    assert torch.equal(qry, box_qry)  # queries keep their dense labels
    assert ((box_fg >= dense_fg) | (box_fg == 0)).all() and (
        box_fg.flatten(2).sum(-1) >= dense_fg.flatten(2).sum(-1)
    ).all()
    assert not (box_bg * dense_fg).any()
    assert (scr_fg <= dense_fg).all() and (scr_bg <= dense_bg).all() and scr_fg.flatten(2).any(-1).all()


# -- sampler statistics -----------------------------------------------------------------------------


def test_sampler_statistics(tmp_path):
    """Classes and images uniform; N-way episodes of distinct classes and images; shared photos excluded."""
    root = make_shapes(tmp_path, per_class=4)
    dataset = FolderDataset(root, 8)
    # A fifth class whose photos are the circle photos (same stem and bytes): never twice in an episode.
    dataset.items["circle-too"] = [Item(i.photo, i.image) for i in dataset.items["circle"]]
    sampler = EpisodeSampler(dataset, dataset.classes, 2, 1, rng=np.random.default_rng(0))
    draws = [sampler.draw()[0] for _ in range(2000)]
    class_counts = {c: 0 for c in dataset.classes}
    image_counts = {}
    for episode in draws:
        assert len({way.cls for way in episode}) == 2
        photos = [item.photo for way in episode for item in way.supports + way.queries]
        assert len(set(photos)) == 4
        for way in episode:
            class_counts[way.cls] += 1
            for item in way.supports + way.queries:
                image_counts[item.image] = image_counts.get(item.image, 0) + 1
    expected = 2 * 2000 / 5  # each class in 2/5 of the episodes
    chi2 = sum((n - expected) ** 2 / expected for n in class_counts.values())
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001
    square = [image_counts[i.image] for i in dataset.items["square"]]
    assert max(square) / min(square) < 1.3  # each of a class's photos equally likely


def test_parts_of_a_batch_partition_it(shapes):
    dataset = FolderDataset(shapes, SIZE)

    def batch(part):
        return EpisodeSampler(dataset, dataset.classes, 1, 1, rng=np.random.default_rng(3)).batch(5, part)

    whole, first, second = batch((0, 1)), batch((0, 2)), batch((1, 2))
    assert first.classes == whole.classes[0::2] and second.classes == whole.classes[1::2]
    assert torch.equal(second.supp_imgs, whole.supp_imgs[1::2])
    assert EpisodeSampler(dataset, dataset.classes, 1, 1).batch(1, (1, 2)) is None
