"""fss-train --recipe: the fine-tune default, the paper's recipe, flags over recipes, progress, resume."""

import io
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_train import SIZE, make_shapes

import fss
from fss.checkpoint import DEMO_MODEL
from fss.errors import FssError
from fss.models.base import get_method
from fss.train.cli import build_parser, config_from_args, main
from fss.train.recipes import RECIPES
from fss.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("recipes") / "shapes", per_class=3)


@pytest.fixture(scope="module")
def three(shapes, tmp_path_factory) -> Path:
    """A user's folder of three classes."""
    root = tmp_path_factory.mktemp("few") / "mine"
    for cls in ("circle", "square", "triangle"):
        shutil.copytree(shapes / cls, root / cls)
    return root


@pytest.fixture(scope="module")
def bundled() -> dict:
    return fss.load_model(DEMO_MODEL).meta


def resolved(*argv) -> TrainConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_the_default_fine_tunes_the_bundled_model(shapes, bundled):
    cfg = resolved("--data", str(shapes))
    assert cfg.recipe == "finetune" and Path(cfg.init) == DEMO_MODEL
    model = (cfg.method, cfg.encoder, cfg.width, cfg.size)
    assert model == (bundled["method"], bundled["encoder"], bundled["width"], bundled["input_size"])
    schedule = (cfg.freeze_stages, cfg.iters, cfg.batch_episodes, cfg.milestones(), cfg.optimizer, cfg.lr)
    assert schedule == (4, 400, 4, [300], "sgd", get_method(cfg.method).train_defaults["lr"])
    assert cfg.out == Path("runs/shapes") and cfg.val_classes is None and cfg.progress is None
    assert (cfg.save_every, cfg.snapshot_every, cfg.eval_every, cfg.eval_episodes) == (50, 0, 100, 500)


def test_the_paper_recipe_is_the_defaults_before_recipes(shapes):
    cfg = resolved("--data", str(shapes), "--recipe", "paper")
    model = (cfg.method, cfg.encoder, cfg.width, cfg.init, cfg.freeze_stages)
    assert model == ("panet", "vgg16-dilated", 1, None, 0)
    assert (cfg.size, cfg.iters, cfg.batch_episodes, cfg.milestones()) == (417, 30000, 1, [10000, 20000])
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 1e-3, 0.9, 5e-4)
    every = (cfg.save_every, cfg.snapshot_every, cfg.eval_every, cfg.eval_episodes)
    assert every == (1000, 10000, 5000, 1000)
    assert cfg == TrainConfig(data=shapes, out=Path("runs/shapes"), recipe="paper")  # no field left over
    for method in ("prnet", "oslsm"):  # each method's own optimizer and learning rate
        cfg = resolved("--data", str(shapes), "--recipe", "paper", "--method", method)
        defaults = get_method(method).train_defaults
        assert (cfg.optimizer, cfg.lr) == (defaults.get("optimizer", "sgd"), defaults["lr"])


def test_flags_given_win_over_the_recipe(shapes):
    cfg = resolved("--data", str(shapes), "--iters", "1000", "--size", "225", "--out", "x")
    assert (cfg.iters, cfg.milestones(), cfg.size, cfg.out) == (1000, [750], 225, Path("x"))
    cfg = resolved("--data", str(shapes), "--lr-milestones", "", "--freeze-stages", "0", "--lr", "0.01")
    assert (cfg.milestones(), cfg.freeze_stages, cfg.lr, cfg.iters) == ([], 0, 0.01, 400)
    cfg = resolved("--data", str(shapes), "--encoder", "vgg16-dilated", "--init", "auto", "--width", "0.5")
    assert (cfg.encoder, cfg.init, cfg.width, cfg.size, cfg.iters) == ("vgg16-dilated", "auto", 0.5, 417, 400)
    assert resolved("--data", str(shapes), "--init", "none").init is None
    cfg = resolved("--data", str(shapes), "--recipe", "paper", "--iters", "9", "--batch-episodes", "2")
    assert (cfg.iters, cfg.milestones(), cfg.batch_episodes, cfg.encoder) == (9, [3, 6], 2, "vgg16-dilated")
    sst = resolved("--data", str(shapes), "--method", "sst")  # the bundled PANet's encoder starts SST's
    assert (sst.method, sst.encoder, Path(sst.init)) == ("sst", "efficientnet-lite0", DEMO_MODEL)
    assert sst.lr == get_method("sst").train_defaults["lr"]
    with pytest.raises(FssError, match="--encoder vgg16-dilated: --recipe finetune fine-tunes demo-panet.pt"):
        resolved("--data", str(shapes), "--encoder", "vgg16-dilated")


def test_a_folder_of_few_classes_trains_on_all_of_them(three):
    assert resolved("--data", str(three)).val_classes == []
    assert resolved("--data", str(three), "--recipe", "paper").val_classes is None  # every 4th: circle
    assert resolved("--data", str(three), "--val-classes", "square").val_classes == ["square"]
    assert RECIPES["finetune"].hold_out_from == 4


def test_fine_tune_end_to_end(three, tmp_path, capsys, bundled):
    out = tmp_path / "run"
    args = ["--data", str(three), "--out", str(out), "--size", "65", "--batch-episodes", "2"]
    assert main([*args, "--iters", "2", "--progress"]) == 0
    captured = capsys.readouterr()
    assert "recipe finetune: panet on efficientnet-lite0 from demo-panet.pt, 4 stages" in captured.err
    assert "2/2 [" in captured.err and "step" in captured.err  # the bar: steps, time per step, time left
    assert "none held out (no validation)" in captured.err
    assert "trained 2 iterations in " in captured.out and " s/step)" in captured.out
    assert f"fss-run --ckpt {out / 'final.pt'}" in captured.out
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and all("%|" not in row and "step/s" not in row for row in rows)
    model = fss.load_model(out / "final.pt")
    config = model.meta["train_config"]
    assert (config["recipe"], config["init"], model.meta["input_size"]) == ("finetune", DEMO_MODEL.name, 65)
    assert model.meta["normalisation"] == bundled["normalisation"]
    start = fss.load_model(DEMO_MODEL)
    for frozen, initial in zip(model.encoder.stages()[:4], start.encoder.stages()[:4], strict=True):
        for ours, theirs in zip(frozen.state_dict().values(), initial.state_dict().values(), strict=True):
            assert torch.equal(ours, theirs.to(ours.dtype))
    tuned = zip(model.encoder.stages()[4].parameters(), start.encoder.stages()[4].parameters(), strict=True)
    assert any(not torch.equal(ours, theirs.to(ours.dtype)) for ours, theirs in tuned)


def test_resume_keeps_the_runs_recipe(shapes, tmp_path, capsys):
    paper = ["--data", str(shapes), "--size", str(SIZE), "--width", "0.125", "--out", str(tmp_path)]
    paper += ["--val-classes", "none", "--no-progress"]
    assert main([*paper, "--recipe", "paper", "--iters", "1"]) == 0
    assert main([*paper, "--iters", "2", "--resume"]) == 0  # no --recipe: the run's, not finetune
    meta = fss.load_model(tmp_path / "final.pt").meta
    assert (meta["iterations"], meta["encoder"]) == (2, "vgg16-dilated")
    assert meta["train_config"]["recipe"] == "paper"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "progress, terminal, shown",
    [(None, True, True), (None, False, False), (False, True, False), (True, False, True)],
)
def test_the_progress_bar_shows_on_a_terminal_or_when_asked(
    shapes, tmp_path, monkeypatch, progress, terminal, shown
):
    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    cfg = TrainConfig(
        data=shapes, out=tmp_path, size=SIZE, width=0.125, iters=2, val_classes=[], progress=progress
    )
    train(cfg)
    assert ("2/2 [" in stderr.getvalue()) is shown
    assert "training on 4 classes" in stderr.getvalue()
    assert "%|" not in (tmp_path / "log.csv").read_text()
