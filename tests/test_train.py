"""fss-train: episode sampling, the metric, training runs, checkpoints, bit-for-bit resume, CLI errors."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import fss
from fss.errors import FssError
from fss.models.base import get_method
from fss.train import evaluate as evaluation
from fss.train.cli import build_parser, config_from_args, main
from fss.train.data import EpisodeSampler, FolderDataset, Way, episode_tensors
from fss.train.evaluate import IouCounts, evaluate, query_counts
from fss.train.split import default_val_classes
from fss.train.trainer import TrainConfig, train

SIZE = 32
COLOURS = {"circle": (230, 40, 40), "square": (40, 200, 40), "triangle": (40, 40, 230), "bar": (230, 230, 40)}


def shape_photo(rng, kind: str, size=40) -> tuple[Image.Image, np.ndarray]:
    """A coloured shape of ``kind`` on noise, and its 0/255 mask."""
    img = Image.fromarray((rng.random((size, size, 3)) * 120).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    x0, y0 = (int(v) for v in rng.integers(2, size // 3, 2))
    x1, y1 = x0 + size // 2, y0 + size // 2
    for target, fill in ((ImageDraw.Draw(img), COLOURS[kind]), (ImageDraw.Draw(mask), 255)):
        if kind == "circle":
            target.ellipse([x0, y0, x1, y1], fill=fill)
        elif kind == "triangle":
            target.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
        elif kind == "bar":
            target.rectangle([x0, y0, x1, y0 + size // 6], fill=fill)
        else:
            target.rectangle([x0, y0, x1, y1], fill=fill)
    return img, np.asarray(mask)


def make_shapes(root: Path, per_class=4, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for kind in COLOURS:
        for i in range(per_class):
            img, mask = shape_photo(rng, kind)
            (root / kind).mkdir(parents=True, exist_ok=True)
            img.save(root / kind / f"{kind}{i}.jpg")
            Image.fromarray(mask).save(root / kind / f"{kind}{i}.png")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def config(data, out, **overrides) -> TrainConfig:
    base = dict(
        data=data, out=out, size=SIZE, width=0.125, iters=4, eval_episodes=4, eval_every=0, progress=False
    )
    return TrainConfig(**{**base, **overrides})


# -- sampling ---------------------------------------------------------------------------------------


def test_episodes_have_distinct_classes_and_images_and_valid_labels(shapes):
    dataset = FolderDataset(shapes, SIZE)
    sampler = EpisodeSampler(
        dataset, dataset.classes, ways=2, shots=2, queries=1, flip=True, rng=np.random.default_rng(0)
    )
    for _ in range(30):
        episode, _ = sampler.episode()
        assert len({way.cls for way in episode}) == 2
        photos = [item.photo for way in episode for item in way.supports + way.queries]
        assert len(set(photos)) == len(photos) == 6
        assert all(
            item.image.parent.name == way.cls for way in episode for item in way.supports + way.queries
        )
    batch = sampler.batch(3)
    assert batch.supp_imgs.shape == (3, 2, 2, 3, SIZE, SIZE)
    assert batch.supp_fg.shape == batch.supp_bg.shape == (3, 2, 2, SIZE, SIZE)
    assert batch.qry_imgs.shape == (3, 2, 3, SIZE, SIZE)
    assert batch.qry_labels.shape == (3, 2, SIZE, SIZE) and batch.qry_labels.dtype == torch.int64
    assert set(batch.qry_labels.unique().tolist()) <= {0, 1, 2}
    for way in (0, 1):  # way n's query holds class n
        assert (batch.qry_labels[:, way] == way + 1).flatten(1).any(1).all()
    assert not (batch.supp_fg * batch.supp_bg).any() and batch.supp_fg.any()


def test_same_seed_same_episodes(shapes):
    dataset = FolderDataset(shapes, SIZE)

    def draw(seed):
        sampler = EpisodeSampler(dataset, dataset.classes, 2, 1, flip=True, rng=np.random.default_rng(seed))
        return sampler.batch(2)

    a, b, c = draw(5), draw(5), draw(6)
    assert a.classes == b.classes and torch.equal(a.supp_imgs, b.supp_imgs)
    assert torch.equal(a.qry_labels, b.qry_labels)
    assert not torch.equal(a.supp_imgs, c.supp_imgs)


def test_shared_photo_labels_other_episode_classes_and_ignores(tmp_path):
    """A photo in two class folders (same stem, same bytes) is one photo with two labels."""
    rng = np.random.default_rng(1)
    img, _ = shape_photo(rng, "square")
    left = np.zeros((40, 40), np.uint8)
    left[:, :20] = 255
    right = np.zeros((40, 40), np.uint8)
    right[:, 30:] = 1
    right[:5, 30:] = 255  # ignored (palette index 255)
    for cls in ("left", "right"):
        (tmp_path / cls).mkdir()
        img.save(tmp_path / cls / "photo.jpg")
        other, _ = shape_photo(rng, "circle")
        other.save(tmp_path / cls / "other.jpg")
        Image.fromarray(left).save(tmp_path / cls / "other.png")
    Image.fromarray(left).save(tmp_path / "left" / "photo.png")
    palette = Image.fromarray(right, mode="P")
    palette.putpalette(fss.constants.voc_palette())
    palette.save(tmp_path / "right" / "photo.png")
    shutil.copyfile(tmp_path / "left" / "photo.jpg", tmp_path / "right" / "photo.jpg")

    dataset = FolderDataset(tmp_path, 40)
    by_name = {cls: {i.image.name: i for i in items} for cls, items in dataset.items.items()}
    assert by_name["left"]["photo.jpg"].photo == by_name["right"]["photo.jpg"].photo
    assert by_name["left"]["other.jpg"].photo != by_name["right"]["other.jpg"].photo  # same stem, other bytes

    episode = [
        Way("left", (by_name["left"]["photo.jpg"],), (by_name["left"]["other.jpg"],)),
        Way("right", (by_name["right"]["other.jpg"],), (by_name["right"]["photo.jpg"],)),
    ]
    _, supp_fg, supp_bg, _, qry_labels = episode_tensors(dataset, episode)
    # Way 1's support is the shared photo: the right class is neither its foreground nor background.
    assert supp_fg[0, 0, :, :20].all() and not supp_fg[0, 0, :, 20:].any()
    assert supp_bg[0, 0, :, 20:30].all() and not supp_bg[0, 0, :, 30:].any()
    # Way 2's query is the shared photo: left pixels are way 1, right pixels way 2 or ignored.
    query = qry_labels[1]
    assert (query[:, :20] == 1).all() and (query[:, 20:30] == 0).all()
    assert (query[5:, 30:] == 2).all() and (query[:5, 30:] == 255).all()


def test_flip_mirrors_images_and_labels_together(shapes):
    dataset = FolderDataset(shapes, SIZE)
    episode, plain = EpisodeSampler(dataset, dataset.classes, 2, 1, rng=np.random.default_rng(3)).episode()
    flipped = episode_tensors(dataset, episode, flip=np.ones(4, bool))
    for a, b in zip(plain, flipped, strict=True):
        torch.testing.assert_close(a.flip(-1), b, rtol=0, atol=0)


# -- metric -----------------------------------------------------------------------------------------


def test_query_counts_skip_ignored_pixels_and_absent_classes():
    """Hand-computed: counts per query, only for the classes (background included) its labels hold."""
    labels = torch.tensor([[[[0, 1, 1, 255], [2, 2, 0, 255]], [[0, 0, 1, 1], [0, 0, 255, 255]]]])
    pred = torch.tensor([[[[1, 1, 0, 1], [2, 0, 0, 2]], [[2, 0, 1, 0], [0, 2, 2, 1]]]], dtype=torch.uint8)
    counts = query_counts(pred, labels, ways=2)  # 1 episode, 2 queries
    # Query 1: background TP 1 FP 2 FN 1; way 1 TP 1 FP 1 FN 1; way 2 TP 1 FP 0 FN 1.
    # Query 2 (no way 2 in its labels: way 2's false positives are not counted): background TP 2 FP 1
    # FN 2; way 1 TP 1 FP 0 FN 1.
    assert counts.tolist() == [[[3, 3, 3], [2, 1, 2], [1, 0, 1]]]


def test_iou_counts_summary_is_the_official_metric():
    counts = IouCounts(["a", "b"])
    counts.add(
        [["a", "b"], ["b", "a"]],
        torch.tensor([[[5, 1, 2], [3, 1, 0], [1, 1, 1]], [[4, 0, 0], [2, 0, 2], [1, 2, 1]]]),
    )
    # Ways follow each episode's class order: a = [3,1,0] + [1,2,1], b = [1,1,1] + [2,0,2], background
    # [5,1,2] + [4,0,0]; the foreground sums a's and b's counts: [7,4,4].
    summary = counts.summary()
    assert summary["class_iou"] == pytest.approx({"a": 4 / 8, "b": 3 / 7})
    assert summary["mean_iou"] == pytest.approx((4 / 8 + 3 / 7) / 2)
    assert summary["binary_iou"] == pytest.approx((9 / 12 + 7 / 15) / 2)


def test_perfect_and_empty_predictions(shapes, monkeypatch):
    dataset = FolderDataset(shapes, SIZE)
    model = fss.PANet(width=0.0625)
    monkeypatch.setattr(evaluation, "predict", lambda model, batch, *_: batch.qry_labels.clamp(max=2))
    perfect = evaluate(model, dataset, dataset.classes, ways=2, episodes=5, batch_episodes=2)
    assert perfect["mean_iou"] == perfect["binary_iou"] == 1.0
    monkeypatch.setattr(evaluation, "predict", lambda model, batch, *_: (batch.qry_labels + 1) % 3)
    wrong = evaluate(model, dataset, dataset.classes, ways=2, episodes=5, batch_episodes=2)
    assert wrong["mean_iou"] == wrong["binary_iou"] == 0.0


def test_default_schedule_and_validation_classes():
    cfg = TrainConfig(data=Path("x"))
    assert [cfg.lr_at(s) for s in (1, 10000, 10001, 20000, 20001, 30000)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]
    )
    names = [f"c{i:02d}" for i in range(24)]
    assert default_val_classes(names, 1) == ["c00", "c04", "c08", "c12", "c16", "c20"]
    assert default_val_classes(names[:4], 2) == ["c00", "c02"]


# -- training ---------------------------------------------------------------------------------------


def test_training_writes_loadable_checkpoints_with_meta(shapes, tmp_path):
    result = train(config(shapes, tmp_path / "run", val_classes=["bar"], iters=3, snapshot_every=2))
    assert result.step == 3 and len(result.losses) == 3
    assert all(np.isfinite(q) and np.isfinite(a) and a > 0 for q, a in result.losses)
    for name in ("final.pt", "last.pt", "step-000002.pt"):
        model = fss.load_model(tmp_path / "run" / name)
        assert model.meta["classes"] == ["circle", "square", "triangle"]
        assert model.meta["input_size"] == SIZE and model.meta["width"] == 0.125
    meta = fss.load_model(tmp_path / "run" / "final.pt").meta
    assert meta["iterations"] == 3 and meta["val"]["classes"] == ["bar"]
    assert 0 <= meta["val"]["mean_iou"] <= 1 and meta["train_config"]["iters"] == 3
    where = meta["train_config"]["data"], meta["train_config"]["out"]
    assert where == (shapes.name, "run")  # names only: no paths of the training machine
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["train_state"]["step"] == 3
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,lr,query_loss") and len(rows) == 4 and rows[-1].split(",")[5]


def test_training_lowers_the_loss(shapes, tmp_path):
    result = train(config(shapes, tmp_path, val_classes=[], iters=60, lr=0.05, lr_milestones=[]))
    losses = [q + a for q, a in result.losses]
    assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15])


def test_resume_continues_bit_for_bit(shapes, tmp_path):
    options = dict(val_classes=["bar"], lr=0.01, lr_milestones=[2, 4], flip=True, seed=3)
    whole = train(config(shapes, tmp_path / "whole", iters=6, **options))
    train(config(shapes, tmp_path / "parts", iters=3, **options))
    resumed = train(
        config(shapes, tmp_path / "parts", iters=6, resume=tmp_path / "parts" / "last.pt", **options)
    )
    assert resumed.losses == whole.losses[3:]
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert len((tmp_path / "parts" / "log.csv").read_text().splitlines()) == 7


def test_adamw_trains_and_resumes_bit_for_bit(shapes, tmp_path):
    options = dict(val_classes=[], optimizer="adamw", lr=1e-3, lr_milestones=[4], seed=2)
    whole = train(config(shapes, tmp_path / "whole", iters=6, **options))
    train(config(shapes, tmp_path / "parts", iters=3, **options))
    last = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    assert "exp_avg_sq" in next(iter(last["train_state"]["optimizer"]["state"].values()))
    resumed = train(
        config(shapes, tmp_path / "parts", iters=6, resume=tmp_path / "parts" / "last.pt", **options)
    )
    assert resumed.losses == whole.losses[3:]
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    sgd = train(config(shapes, tmp_path / "sgd", iters=6, **{**options, "optimizer": "sgd"}))
    assert sgd.losses[1:] != whole.losses[1:]  # the option reaches the optimizer


def test_resume_refuses_another_optimizer(shapes, tmp_path):
    train(config(shapes, tmp_path, val_classes=[], iters=2))
    with pytest.raises(FssError, match="trained with optimizer sgd, not adamw"):
        resume = tmp_path / "last.pt"
        train(config(shapes, tmp_path, val_classes=[], iters=3, optimizer="adamw", resume=resume))


def test_the_method_recipe_picks_the_optimizer(shapes, tmp_path):
    argv = ["--data", str(shapes), "--out", str(tmp_path)]
    oslsm = config_from_args(build_parser().parse_args([*argv, "--method", "oslsm"]))
    assert (oslsm.optimizer, oslsm.lr) == ("adamw", get_method("oslsm").train_defaults["lr"])
    panet = config_from_args(build_parser().parse_args(argv))
    assert (panet.optimizer, panet.lr, panet.momentum) == ("sgd", 1e-3, 0.9)
    chosen = config_from_args(build_parser().parse_args([*argv, "--method", "oslsm", "--optimizer", "sgd"]))
    assert chosen.optimizer == "sgd"


# -- command line -----------------------------------------------------------------------------------


def test_cli_trains_resumes_and_evaluates(shapes, tmp_path, capsys):
    common = ["--data", str(shapes), "--size", str(SIZE), "--width", "0.125", "--val-classes", "bar,circle"]
    common += ["--eval-episodes", "3", "--out", str(tmp_path), "--no-progress", "--recipe", "paper"]
    assert main([*common, "--iters", "2"]) == 0
    assert "held-out mean-IoU" in capsys.readouterr().out
    assert main([*common, "--iters", "3", "--resume"]) == 0
    assert fss.load_model(tmp_path / "final.pt").meta["iterations"] == 3
    assert main([*common, "--eval-only", "--ckpt", str(tmp_path / "final.pt")]) == 0
    assert '"mean_iou"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing"], "support folder not found"),
        (
            ["--data", "{shapes}", "--ways", "3"],
            "training classes has 1 class(es) (triangle), 3-way episodes need 3",
        ),
        (["--data", "{shapes}", "--shots", "4", "--val-classes", "none"], "has 4 image(s), episodes need 5"),
        (["--data", "{shapes}", "--val-classes", "cat"], "validation class 'cat' is not a class folder"),
        (["--data", "{shapes}", "--resume", "{tmp}/nothing.pt"], "checkpoint not found"),
        (["--data", "{shapes}", "--init", "{shapes}/bar/bar0.png"], "unreadable checkpoint"),
        (["--data", "{shapes}", "--optimizer", "adamw", "--momentum", "0.5"], "--momentum is SGD's"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(shapes, tmp_path, capsys, args, message):
    argv = [a.format(tmp=tmp_path, shapes=shapes) for a in args]
    paper = ["--recipe", "paper", "--size", str(SIZE), "--width", "0.125"]
    assert main([*argv, "--out", str(tmp_path / "run"), *paper]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fss-train: error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_cli_refuses_to_overwrite_a_run(shapes, tmp_path, capsys):
    args = [
        "--data",
        str(shapes),
        "--size",
        str(SIZE),
        "--width",
        "0.125",
        "--iters",
        "1",
        "--out",
        str(tmp_path),
        "--recipe",
        "paper",
    ]
    assert main([*args, "--val-classes", "none", "--no-progress"]) == 0
    assert main([*args, "--val-classes", "none", "--no-progress"]) == 2
    assert "holds a run already" in capsys.readouterr().err
