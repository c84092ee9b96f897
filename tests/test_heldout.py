import json
from pathlib import Path

import pytest

from fss.errors import FssError
from fss.train.coco import class_folder_name, load_coco
from fss.train.heldout import CROSS_VIDEO_CLASSES, build, main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    if not all((SHARED / name).is_dir() for name in ("coco-mini", "tiny-coco", "davis", "pets")):
        pytest.skip("needs ../shared/data")
    out = tmp_path_factory.mktemp("heldout") / "sets"
    counts = build(SHARED, out, seed=0, per_class=3)
    return out, counts


def episodes(out, name):
    return json.loads((out / name / "episodes.json").read_text())


def annotated_classes(source: str, file_name: str) -> set[str]:
    coco = load_coco(SHARED / source / "annotations" / "instances_val2017.json")
    image = next(i for i in coco.dataset["images"] if i["file_name"] == file_name)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"], iscrowd=None))
    return {f"coco-{class_folder_name(coco.loadCats(a['category_id'])[0]['name'])}" for a in anns}


@pytest.mark.data
def test_cluttered_queries_are_unseen_photos_and_negatives_lack_the_class(heldout):
    out, counts = heldout
    spec = episodes(out, "cluttered")
    assert counts["cluttered"] == len(spec["episodes"]) > 0
    for cls in spec["classes"]:
        kinds = {e["present"] for e in spec["episodes"] if e["class"] == cls}
        assert kinds == {True, False}, cls
    checked = 0
    for e in spec["episodes"]:
        support, query = (
            (out / "cluttered" / e["support"][0]).resolve(),
            (out / "cluttered" / e["query"]).resolve(),
        )
        assert support != query and "val2017" in query.parent.parent.name
        assert (Path(e["query"]).parts[0] == e["class"]) == e["present"]
        if not e["present"] and checked < 20:  # the photo has no instance of the class, however small
            source = "coco-mini" if query.parent.parent.name.startswith("coco-mini") else "tiny-coco"
            assert e["class"] not in annotated_classes(source, query.name)
            checked += 1


@pytest.mark.data
def test_objects_take_support_and_query_from_different_videos(heldout):
    out, _ = heldout
    spec = episodes(out, "objects")
    assert spec["classes"] == sorted(CROSS_VIDEO_CLASSES)
    for e in spec["episodes"]:
        support_videos, query_videos = CROSS_VIDEO_CLASSES[e["class"]]
        support_folder, query_folder = Path(e["support"][0]).parts[1], Path(e["query"]).parts[1]
        assert support_folder in support_videos
        assert (query_folder in query_videos) == e["present"]
        assert query_folder not in support_videos


@pytest.mark.data
def test_unseen_is_the_demo_models_heldout_classes(heldout):
    out, _ = heldout
    heldout_classes = (out / "demo-data" / "heldout.txt").read_text().strip().split(",")
    spec = episodes(out, "unseen")
    assert set(spec["classes"]) <= set(heldout_classes)
    for e in spec["episodes"]:
        assert Path(e["query"]).parts[0] in heldout_classes
        assert (Path(e["query"]).parts[0] == e["class"]) == e["present"]


def test_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("users' file")
    with pytest.raises(FssError, match="not empty"):
        build(tmp_path / "shared", tmp_path)
    assert main(["--shared", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "users' file"
