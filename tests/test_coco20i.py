"""COCO-20i: fold conventions, merged instances, crowd ignored, instances for boxes; coco-mini end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_coco_folder import COCO_MINI, rle_counts, square

import fss
from fss.train.benchmark import fold_classes
from fss.train.coco import CocoDataset, coco20i_fold_indices
from fss.train.data import Way, episode_tensors
from fss.train.eval_cli import main as eval_main
from fss.train.trainer import TrainConfig, train

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

# 80 categories with gaps in the ids, as COCO's 1..90; listed out of order in the json.
CATEGORY_IDS = [k + k // 12 for k in range(1, 81)]


def make_coco20i(root: Path) -> Path:
    """Four 40 x 30 images. Class 1: two instances + a crowd in image 1, one in image 2. Class 2: images
    2 and 3. Class 21: image 1 and 4; image 3 has only a crowd of it (so is not listed for it)."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    images = []
    for image_id in (1, 2, 3, 4):
        name = f"{image_id:012d}.jpg"
        Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).save(root / "train2017" / name)
        images.append({"id": image_id, "file_name": name, "width": 40, "height": 30, "license": 4})
    crowd = np.zeros((30, 40), np.uint8)
    crowd[20:30, 0:10] = 1
    cat = {k: CATEGORY_IDS[k - 1] for k in (1, 2, 21)}
    annotations = [
        (1, cat[1], 0, [square(0, 0, 10, 10)]),
        (1, cat[1], 0, [square(20, 0, 30, 10)]),
        (1, cat[1], 1, {"size": [30, 40], "counts": rle_counts(crowd)}),
        (1, cat[21], 0, [square(30, 20, 40, 30)]),
        (2, cat[1], 0, [square(5, 5, 35, 25)]),
        (2, cat[2], 0, [square(0, 0, 4, 4)]),
        (3, cat[2], 0, [square(10, 10, 30, 20)]),
        (3, cat[21], 1, {"size": [30, 40], "counts": rle_counts(crowd)}),
        (4, cat[21], 0, [square(0, 0, 20, 20)]),
    ]
    anns = [
        {"id": i, "image_id": img, "category_id": c, "iscrowd": crowd_flag, "segmentation": seg, "area": 1.0}
        for i, (img, c, crowd_flag, seg) in enumerate(annotations, start=1)
    ]
    for ann in anns:
        ann["bbox"] = [0, 0, 1, 1]
    categories = [
        {"id": c, "name": f"class{k:02d}", "supercategory": "x"} for k, c in enumerate(CATEGORY_IDS, 1)
    ]
    data = {"images": images, "annotations": anns, "categories": categories[::-1], "licenses": []}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def coco20i(tmp_path_factory) -> Path:
    return make_coco20i(tmp_path_factory.mktemp("coco20i"))


def test_fold_conventions():
    assert coco20i_fold_indices(1, "consecutive") == list(range(21, 41))
    assert coco20i_fold_indices(1, "interleaved") == list(range(2, 81, 4))
    for convention in ("consecutive", "interleaved"):
        folds = [coco20i_fold_indices(i, convention) for i in range(4)]
        assert sorted(sum(folds, [])) == list(range(1, 81))


def test_classes_in_category_order_and_photos_with_instances(coco20i):
    dataset = CocoDataset(coco20i, 30)
    assert dataset.classes == [f"class{k:02d}" for k in range(1, 81)]
    assert fold_classes(dataset, "coco", 0)[:3] == ["class01", "class02", "class03"]
    assert fold_classes(dataset, "coco", 3, "interleaved")[:2] == ["class04", "class08"]
    photos = {c: [i.photo for i in dataset.items[c]] for c in ("class01", "class02", "class21")}
    assert photos == {
        "class01": ["train2017/1", "train2017/2"],
        "class02": ["train2017/2", "train2017/3"],
        "class21": ["train2017/1", "train2017/4"],  # image 3 has a crowd of it only
    }


def test_instances_merged_crowd_ignored(coco20i):
    dataset = CocoDataset(coco20i, 30)
    items = {c: {i.photo: i for i in dataset.items[c]} for c in ("class01", "class21")}
    photo1 = items["class01"]["train2017/1"]
    episode = [
        Way("class01", (photo1,), (items["class01"]["train2017/2"],)),
        Way("class21", (items["class21"]["train2017/4"],), (items["class21"]["train2017/1"],)),
    ]
    _, fg, bg, _, qry_labels = episode_tensors(dataset, episode)
    expected = np.zeros((30, 40), np.uint8)
    expected[0:10, 0:10] = expected[0:10, 20:30] = 1  # both instances of class 1
    expected[20:30, 0:10] = 255  # its crowd
    expected[20:30, 30:40] = 2  # class 21 (way 2)
    expected = np.array(Image.fromarray(expected).resize((30, 30), Image.NEAREST))
    assert torch.equal(qry_labels[1], torch.from_numpy(expected).long())
    # Support of way 1 is the same photo: crowd and the other way's pixels are neither fg nor bg.
    assert torch.equal(fg[0, 0], torch.from_numpy(expected == 1).float())
    assert torch.equal(bg[0, 0], torch.from_numpy(expected == 0).float())
    assert sorted(m.sum() for m in dataset.instances(photo1, "class01")) == [
        (expected[:, :15] == 1).sum(),
        (expected[:, 15:] == 1).sum(),
    ]


def test_box_annotations_use_coco_instances(coco20i):
    dataset = CocoDataset(coco20i, 30)
    photo1 = next(i for i in dataset.items["class01"] if i.photo == "train2017/1")
    query = next(i for i in dataset.items["class01"] if i.photo == "train2017/2")
    _, fg, bg, _, _ = episode_tensors(dataset, [Way("class01", (photo1,), (query,))], annotation="box")
    instances = dataset.instances(photo1, "class01")
    assert any(torch.equal(fg[0, 0].bool(), torch.from_numpy(m)) for m in instances)  # squares: box = mask
    assert torch.equal(bg[0, 0].bool(), torch.from_numpy(~(instances[0] | instances[1])))


def test_training_and_evaluating_a_coco_fold(coco20i, tmp_path):
    """Fold 1 holds out class 21..40: class 21 (2 images) is validated, classes 1 and 2 are trained."""
    config = TrainConfig(
        data=coco20i,
        out=tmp_path,
        dataset="coco",
        fold=1,
        size=32,
        width=0.0625,
        iters=2,
        eval_episodes=2,
        progress=False,
    )
    result = train(config)
    assert result.train_classes == ["class01", "class02"] and result.val_classes == ["class21"]
    assert (
        eval_main(
            ["--ckpt", str(tmp_path / "final.pt"), "--dataset", "coco", "--data", str(coco20i), "--fold", "1"]
            + ["--runs", "2", "--episodes", "3", "--json", str(tmp_path / "eval.json"), "--no-progress"]
        )
        == 0
    )
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["classes"] == ["class21"] and len(scores["per_run"]) == 2
    assert scores["per_run"][0]["seed"] == 1234 and scores["per_run"][1]["seed"] == 1235
    assert scores["skipped_classes"]["class22"].startswith("0 image(s)")


@pytest.mark.data
@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="needs ../shared/data/coco-mini")
def test_coco_mini_fold_evaluation(tmp_path, capsys):
    dataset = CocoDataset(COCO_MINI, 48, ["train2017", "val2017"])
    assert len(dataset.classes) == 80 and dataset.classes[:3] == ["person", "bicycle", "car"]
    assert fold_classes(dataset, "coco", 0, "interleaved")[:3] == ["person", "airplane", "boat"]
    assert dataset.photo_count("person") == 36 + 39
    photo = dataset.items["person"][0]
    masks = dataset.photo_masks(photo.photo)
    assert set(torch.unique(masks["person"]).tolist()) <= {0, 1, 255} and (masks["person"] == 1).any()
    model = fss.PANet(width=0.0625, meta={"input_size": 48})
    fss.save_checkpoint(model, tmp_path / "tiny.pt")
    args = ["--ckpt", str(tmp_path / "tiny.pt"), "--dataset", "coco", "--data", str(COCO_MINI)]
    args += ["--fold", "0", "--split", "val2017", "--runs", "1", "--episodes", "8", "--no-progress"]
    assert eval_main([*args, "--json", str(tmp_path / "eval.json")]) == 0
    out, err = capsys.readouterr()
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["classes"][0] == "person" and "bicycle" in scores["skipped_classes"]
    assert "test class 'bicycle' left out: 1 image(s)" in err and "mean-IoU" in out
    assert 0 <= scores["mean_iou"] <= 1 and 0 <= scores["binary_iou"] <= 1
