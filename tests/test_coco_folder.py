"""COCO layout -> fss class folders: merged instances, crowd as ignored, filters, sources, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fss.io.folders import find_support_pairs
from fss.io.masks import read_mask
from fss.train.coco import convert, main
from fss.train.data import FolderDataset

# pycocotools' mask decoding warns under numpy 2 (its __array__ lacks the copy keyword): harmless.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"

LICENSES = [
    {"id": 1, "name": "Attribution-NonCommercial-ShareAlike License", "url": "http://nc-sa"},
    {"id": 4, "name": "Attribution License", "url": "http://creativecommons.org/licenses/by/2.0/"},
]


def square(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make_coco(root: Path) -> Path:
    """Two 40 x 30 images: image 1 (licence 4) has two cats and a crowd of cats plus a small
    dining table; image 2 (licence 1) has one cat."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    images = []
    for image_id, licence in ((1, 4), (2, 1)):
        name = f"{image_id:012d}.jpg"
        Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).save(root / "train2017" / name)
        urls = {"flickr_url": f"http://flickr/{image_id}", "coco_url": f"http://coco/{image_id}"}
        images.append(
            {"id": image_id, "file_name": name, "width": 40, "height": 30, "license": licence, **urls}
        )
    crowd = np.zeros((30, 40), np.uint8)
    crowd[20:30, 0:10] = 1
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 17, "iscrowd": 0, "segmentation": [square(0, 0, 10, 10)]},
        {"id": 2, "image_id": 1, "category_id": 17, "iscrowd": 0, "segmentation": [square(20, 0, 30, 10)]},
        {
            "id": 3,
            "image_id": 1,
            "category_id": 17,
            "iscrowd": 1,
            "segmentation": {"size": [30, 40], "counts": rle_counts(crowd)},
        },
        {"id": 4, "image_id": 1, "category_id": 67, "iscrowd": 0, "segmentation": [square(30, 20, 32, 22)]},
        {"id": 5, "image_id": 2, "category_id": 17, "iscrowd": 0, "segmentation": [square(5, 5, 35, 25)]},
    ]
    for ann in annotations:
        ann.update(area=1.0, bbox=[0, 0, 1, 1])
    categories = [
        {"id": 17, "name": "cat", "supercategory": "animal"},
        {"id": 67, "name": "dining table", "supercategory": "furniture"},
    ]
    data = {"images": images, "annotations": annotations, "categories": categories, "licenses": LICENSES}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    return root


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE (column-major runs, starting with a run of zeros)."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    return [*counts, run]


@pytest.fixture
def coco(tmp_path) -> Path:
    return make_coco(tmp_path / "coco")


def test_instances_merge_and_crowd_is_ignored(coco, tmp_path):
    counts = convert(coco, tmp_path / "out", min_images=1, min_area=0.001)
    assert counts == {"cat": 2, "dining_table": 1}
    pairs = find_support_pairs(tmp_path / "out")
    assert [img.name for img, _ in pairs["cat"]] == ["000000000001.jpg", "000000000002.jpg"]
    mask = read_mask(pairs["cat"][0][1])
    expected = np.zeros((30, 40), np.uint8)
    expected[20:30, 0:10] = 255
    expected[0:10, 0:10] = expected[0:10, 20:30] = 1
    np.testing.assert_array_equal(mask, expected)
    assert Image.open(pairs["cat"][0][1]).mode == "P"
    assert (tmp_path / "out" / "cat" / "000000000001.jpg").read_bytes() == (
        coco / "train2017" / "000000000001.jpg"
    ).read_bytes()
    sources = json.loads((tmp_path / "out" / "sources.json").read_text())
    assert sources["000000000001"]["classes"] == ["cat", "dining_table"]
    assert sources["000000000001"]["flickr_url"] == "http://flickr/1"
    assert sources["000000000001"]["license_name"] == "Attribution License"
    # The copies in two class folders are one photo for the episode sampler.
    dataset = FolderDataset(tmp_path / "out", 16)
    assert dataset.items["cat"][0].photo == dataset.items["dining_table"][0].photo


def test_filters_area_images_licence_classes(coco, tmp_path):
    assert convert(coco, tmp_path / "a", min_images=1, min_area=0.01) == {"cat": 2}  # table is 4/1200
    assert convert(coco, tmp_path / "b", min_images=2, min_area=0.001) == {"cat": 2}
    assert convert(coco, tmp_path / "c", min_images=1, min_area=0.001, licenses={4}) == {
        "cat": 1,
        "dining_table": 1,
    }
    assert convert(coco, tmp_path / "d", min_images=1, min_area=0.001, classes=["dining_table"]) == {
        "dining_table": 1
    }


def test_cli(coco, tmp_path, capsys):
    assert main(["--coco", str(coco), "--out", str(tmp_path / "out"), "--min-images", "2"]) == 0
    assert "1 classes, 2 image+mask pairs" in capsys.readouterr().out
    assert main(["--coco", str(coco), "--out", str(tmp_path / "out")]) == 2
    assert "output folder is not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--coco", "{tmp}/nothing"], "COCO folder not found"),
        (["--coco", "{tmp}/coco", "--split", "val2017"], "COCO annotations not found"),
        (["--coco", "{tmp}/coco", "--min-images", "3"], "no class has 3 images"),
    ],
)
def test_cli_errors(coco, tmp_path, capsys, args, message):
    argv = [a.format(tmp=tmp_path) for a in args]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m fss.train.coco: error: ") and message in err and err.count("\n") == 1


def test_missing_image_and_bad_json(coco, tmp_path):
    (coco / "train2017" / "000000000002.jpg").unlink()
    assert main(["--coco", str(coco), "--out", str(tmp_path / "a"), "--min-images", "1"]) == 2
    (coco / "annotations" / "instances_train2017.json").write_text("{not json")
    assert main(["--coco", str(coco), "--out", str(tmp_path / "b")]) == 2


@pytest.mark.data
@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="needs ../shared/data/coco-mini")
def test_coco_mini_converts_to_24_classes(tmp_path):
    counts = convert(COCO_MINI, tmp_path / "folders")
    assert len(counts) == 24 and counts["person"] == 58 and min(counts.values()) >= 5
    dataset = FolderDataset(tmp_path / "folders", 64)
    assert len({item.photo for items in dataset.items.values() for item in items}) <= 159
    shippable = convert(COCO_MINI, tmp_path / "shippable", min_images=1, licenses={4, 5, 7, 8})
    sources = json.loads((tmp_path / "shippable" / "sources.json").read_text())
    assert shippable and {s["license"] for s in sources.values()} <= {4, 5, 7, 8}
