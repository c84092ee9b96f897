"""torchrun with 2 gloo processes takes the same steps as 1 process on the same global batches."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import make_shapes

import fss
from fss.train.trainer import TrainConfig, train


def shapes_with_ignored_pixels(root: Path) -> Path:
    """The shapes, with the bars' masks as palettes whose top rows are ignored (255): the processes'
    shares of a batch then hold different numbers of valid pixels."""
    make_shapes(root, per_class=4)
    for mask_path in (root / "bar").glob("*.png"):
        mask = (np.asarray(Image.open(mask_path)) > 0).astype(np.uint8)
        mask[:12] = 255
        img = Image.fromarray(mask, mode="P")
        img.putpalette(fss.constants.voc_palette())
        img.save(mask_path)
    return root


def test_two_gloo_processes_equal_one_process(tmp_path):
    data = shapes_with_ignored_pixels(tmp_path / "shapes")
    options = dict(
        data=data,
        size=32,
        width=0.0625,
        iters=3,
        batch_episodes=2,
        lr=0.01,
        val_classes=["circle"],
        eval_every=0,
        eval_episodes=6,
        eval_batch=4,
        seed=5,
        progress=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun process (OMP_NUM_THREADS=1)
    try:
        single = train(TrainConfig(out=tmp_path / "single", **options))
    finally:
        torch.set_num_threads(threads)

    args = ["--data", str(data), "--out", str(tmp_path / "ddp"), "--size", "32", "--width", "0.0625"]
    args += ["--iters", "3", "--batch-episodes", "2", "--lr", "0.01", "--val-classes", "circle"]
    args += ["--eval-every", "0", "--eval-episodes", "6", "--eval-batch", "4", "--seed", "5", "--no-progress"]
    args += ["--recipe", "paper"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "fss.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("trained 3 iterations") == 1  # the first process reports

    with open(tmp_path / "ddp" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [(float(r["query_loss"]), float(r["align_loss"])) for r in rows]
    assert np.allclose(logged, single.losses, rtol=1e-5, atol=2e-6)
    ddp = fss.load_model(tmp_path / "ddp" / "final.pt")
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert ddp.meta["val"]["mean_iou"] == pytest.approx(single.val["mean_iou"], abs=1e-3)


def test_batch_must_split_evenly_across_processes(tmp_path, monkeypatch):
    from fss.errors import FssError
    from fss.train import trainer
    from fss.train.distributed import World

    monkeypatch.setattr(trainer, "init_world", lambda device: World(0, 2))
    monkeypatch.setattr(trainer, "close_world", lambda world, finished=False: None)
    with pytest.raises(FssError, match="batch_episodes 3 is not a multiple of the 2 processes"):
        train(TrainConfig(data=tmp_path, batch_episodes=3, progress=False))
