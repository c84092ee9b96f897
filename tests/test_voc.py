"""PASCAL-5i: a synthetic VOC2012 + SBD folder, folds, class lists, label semantics, training on a fold."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fss
from fss.train.cli import main
from fss.train.data import Way, episode_tensors
from fss.train.voc import VOC_CLASSES, VocDataset, pascal_fold_classes
from fss.train.weak import bounding_box

W, H = 40, 30
# image id -> [(class index, box x0, y0, x1, y1)]; every object gets a 1-pixel void (255) outline.
OBJECTS = {
    "2008_000001": [(1, 2, 2, 20, 20), (15, 24, 4, 36, 26)],  # aeroplane + person
    "2008_000002": [(1, 10, 5, 30, 25)],  # aeroplane
    "2008_000003": [(2, 4, 4, 16, 16), (2, 22, 10, 36, 26)],  # two bicycles (two instances)
    "2008_000004": [(2, 5, 5, 35, 25), (6, 1, 1, 4, 4)],  # bicycle + a small bus
    "2008_000005": [(6, 3, 3, 30, 25)],  # bus
    "2008_000006": [(15, 8, 2, 30, 28), (6, 32, 20, 38, 28)],  # person + bus
    "2008_000007": [(15, 5, 5, 25, 25), (3, 30, 2, 38, 10)],  # person + bird (bird: one image only)
}


def label_png(path: Path, values: np.ndarray) -> None:
    img = Image.fromarray(values, mode="P")
    img.putpalette(fss.constants.voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_voc(root: Path, instances=True) -> Path:
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    for image_id, objects in OBJECTS.items():
        Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8)).save(
            root / "JPEGImages" / f"{image_id}.jpg"
        )
        labels = np.zeros((H, W), np.uint8)
        inst = np.zeros((H, W), np.uint8)
        for _, x0, y0, x1, y1 in objects:
            labels[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 255
            inst[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 255
        for number, (cls, x0, y0, x1, y1) in enumerate(objects, start=1):
            labels[y0:y1, x0:x1] = cls
            inst[y0:y1, x0:x1] = number
        label_png(root / "SegmentationClassAug" / f"{image_id}.png", labels)
        if instances:
            label_png(root / "SegmentationObjectAug" / f"{image_id}.png", inst)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "trainaug.txt").write_text("".join(f"{i}\n" for i in OBJECTS))
    return root


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"))


def test_pascal_folds_are_the_papers():
    assert pascal_fold_classes(0) == ["aeroplane", "bicycle", "bird", "boat", "bottle"]
    assert pascal_fold_classes(1) == ["bus", "car", "cat", "chair", "cow"]
    assert pascal_fold_classes(2) == ["diningtable", "dog", "horse", "motorbike", "person"]
    assert pascal_fold_classes(3) == ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    assert sorted(sum((pascal_fold_classes(i) for i in range(4)), [])) == sorted(VOC_CLASSES)


def test_class_lists_are_built_written_and_reused(voc):
    dataset = VocDataset(voc, 30)
    lists = voc / "ImageSets" / "Segmentation" / "trainaug"
    assert (lists / "class1.txt").read_text().split() == ["2008_000001", "2008_000002"]
    assert (lists / "class6.txt").read_text().split() == ["2008_000004", "2008_000005", "2008_000006"]
    assert (lists / "class20.txt").read_text() == ""
    assert [i.photo for i in dataset.items["bicycle"]] == ["2008_000003", "2008_000004"]
    (lists / "class3.txt").write_text("2008_000002\n")  # an existing list is read, not rebuilt
    assert [i.photo for i in VocDataset(voc, 30).items["bird"]] == ["2008_000002"]
    (lists / "class3.txt").write_text("2008_000007\n")


def resized_labels(voc: Path, image_id: str, size: int) -> np.ndarray:
    raw = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{image_id}.png"))
    return np.asarray(Image.fromarray(raw).resize((size, size), Image.NEAREST))


def test_labels_void_and_other_episode_classes(voc):
    dataset = VocDataset(voc, 30)
    items = {c: {i.photo: i for i in dataset.items[c]} for c in ("aeroplane", "person")}
    episode = [
        Way("aeroplane", (items["aeroplane"]["2008_000001"],), (items["aeroplane"]["2008_000002"],)),
        Way("person", (items["person"]["2008_000007"],), (items["person"]["2008_000006"],)),
    ]
    _, fg, bg, _, qry_labels = episode_tensors(dataset, episode)
    support = resized_labels(voc, "2008_000001", 30)  # aeroplane, person (way 2), void
    assert torch.equal(fg[0, 0], torch.from_numpy(support == 1).float())
    # As the reference: void is the support's background; the episode's other class is neither.
    assert torch.equal(bg[0, 0], torch.from_numpy((support == 0) | (support == 255)).float())
    support = resized_labels(voc, "2008_000007", 30)  # person, bird (not in the episode: background)
    assert torch.equal(bg[1, 0], torch.from_numpy(support != 15).float())
    query = resized_labels(voc, "2008_000006", 30)  # person, bus (not in the episode: background)
    expected = np.select([query == 15, query == 255], [2, 255], 0)
    assert torch.equal(qry_labels[1], torch.from_numpy(expected))


def test_instances_come_from_the_instance_maps_or_connected_parts(voc):
    dataset = VocDataset(voc, 40)
    item = next(i for i in dataset.items["bicycle"] if i.photo == "2008_000003")
    instances = dataset.instances(item, "bicycle")
    assert len(instances) == 2 and all((bounding_box(m) == m).all() for m in instances)  # two rectangles
    no_maps = VocDataset(make_voc(voc.parent / "voc-no-instances", instances=False), 40)
    item = next(i for i in no_maps.items["bicycle"] if i.photo == "2008_000003")
    parts = no_maps.instances(item, "bicycle")
    assert sorted(m.sum() for m in parts) == sorted(m.sum() for m in instances)


def test_training_on_a_fold_skips_classes_without_enough_images(voc, tmp_path, capsys):
    args = ["--dataset", "voc", "--data", str(voc), "--fold", "0", "--size", "32", "--width", "0.0625"]
    args += ["--recipe", "paper"]
    args += ["--iters", "2", "--eval-episodes", "3", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "class 'bird' left out: 1 image(s), episodes need 2" in captured.err
    meta = fss.load_model(tmp_path / "final.pt").meta
    assert meta["classes"] == ["bus", "person"]  # the other 13 training classes have no image here
    assert meta["val"]["classes"] == ["aeroplane", "bicycle"]
    assert meta["train_config"]["dataset"] == "voc" and meta["train_config"]["fold"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "voc", "--data", "{tmp}/none", "--fold", "0"], "VOC folder not found"),
        (["--dataset", "voc", "--data", "{voc}"], "--dataset voc needs --fold"),
        (["--dataset", "voc", "--data", "{voc}", "--fold", "0", "--split", "val"], "split list val.txt"),
        (["--dataset", "voc", "--data", "{voc}", "--fold", "0", "--val-classes", "bus"], "give one"),
    ],
)
def test_voc_user_errors(voc, tmp_path, capsys, args, message):
    argv = [a.format(tmp=tmp_path, voc=voc) for a in args]
    paper = ["--recipe", "paper", "--size", "32", "--width", "0.0625"]
    assert main([*argv, "--out", str(tmp_path / "run"), *paper]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fss-train: error: ") and message in err and err.count("\n") == 1


def test_flip_and_void_keep_supports_consistent(voc):
    dataset = VocDataset(voc, 30)
    item = dataset.items["bus"][0]
    episode = [Way("bus", (item,), (dataset.items["bus"][1],))]
    plain = episode_tensors(dataset, episode)
    flipped = episode_tensors(dataset, episode, flip=np.ones(2, bool))
    for a, b in zip(plain, flipped, strict=True):
        assert torch.equal(a.flip(-1), b)
