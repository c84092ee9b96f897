"""Objects of a label map (fss.io.instances) and the results that carry them: Segmenter.predict, the
label-order rule, presence gating, fss-run --instances / --min-score."""

import json
from collections import deque

import numpy as np
import pytest
from helpers import make_queries, make_support, random_model
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

import fss
from fss.io.instances import coco_document, find_instances, instance_record, region_ids
from fss.runtime.cli import main
from fss.runtime.segmenter import Segmenter

SIZE = 49


def flood_regions(labels: np.ndarray) -> list[set]:
    """The reference: 4-connected regions of equal nonzero labels by breadth-first search."""
    seen, regions = np.zeros(labels.shape, bool), []
    for start in zip(*np.nonzero(labels), strict=True):
        if seen[start]:
            continue
        region, todo = set(), deque([start])
        seen[start] = True
        while todo:
            y, x = todo.popleft()
            region.add((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                inside = 0 <= ny < labels.shape[0] and 0 <= nx < labels.shape[1]
                if inside and not seen[ny, nx] and labels[ny, nx] == labels[y, x]:
                    seen[ny, nx] = True
                    todo.append((ny, nx))
        regions.append(region)
    return regions


@pytest.mark.parametrize("seed", range(4))
def test_regions_equal_flood_fill(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (23, 31)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.3] = 0
    ids = region_ids(labels)
    ours = {frozenset(zip(*np.nonzero(ids == i), strict=True)) for i in np.unique(ids[labels > 0])}
    assert ours == {frozenset(r) for r in flood_regions(labels)}


def test_instances_masks_scores_boxes_and_rle():
    labels = np.zeros((30, 40), np.uint8)
    labels[2:10, 3:12] = 1  # 72 px
    labels[15:28, 20:38] = 1  # 234 px, a second object of class 1
    labels[2:12, 12:20] = 2  # 80 px touching the first: another class, another object
    labels[25:27, 2:4] = 2  # 4 px: under min_area
    prob = np.random.default_rng(0).random(labels.shape).astype(np.float32)
    found = find_instances(labels, prob, min_area=10)
    assert [(i.label, i.area) for i in found] == [(1, 234), (1, 72), (2, 80)]
    first = found[1]
    assert first.box == [3, 2, 9, 8]
    assert np.array_equal(first.mask, np.pad(np.ones((8, 9), bool), ((2, 20), (3, 28))))
    assert first.score == pytest.approx(prob[2:10, 3:12].mean(), abs=1e-6)
    for instance in found:
        rle = instance.rle()
        decoded = coco_mask.decode({**rle, "counts": rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), instance.mask)
        assert coco_mask.area({**rle, "counts": rle["counts"].encode()}) == instance.area
    assert [i.area for i in find_instances(labels, prob, min_area=1)][-1] == 4


def test_coco_document_loads_in_pycocotools():
    labels = np.zeros((20, 20), np.uint8)
    labels[2:8, 2:8], labels[10:18, 10:18] = 1, 2
    found = find_instances(labels, np.ones(labels.shape, np.float32), min_area=4)
    image = {"file_name": "q.jpg", "width": 20, "height": 20}
    document = coco_document(
        [{**image, "instances": [instance_record(i, ["a", "b"]) for i in found]}], ["a", "b"]
    )
    coco = COCO()
    coco.dataset = json.loads(json.dumps(document))
    coco.createIndex()
    results = coco.loadRes(document["annotations"])
    for ann in results.loadAnns(results.getAnnIds(imgIds=[1])):
        assert np.array_equal(results.annToMask(ann).astype(bool), labels == ann["category_id"])
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["a", "b"]


def shots(rng, n):
    images = [(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(n)]
    masks = []
    for k in range(n):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[5 + k : 30, 8 : 35 - k] = 1
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def model():
    return random_model(input_size=SIZE)


def test_predict_carries_classes_scores_probs_and_objects(model):
    rng = np.random.default_rng(1)
    (a_img, a_mask), (b_img, b_mask) = shots(rng, 2), shots(rng, 1)
    seg = Segmenter(model, size=SIZE)
    seg.set_support([b_img, a_img], [b_mask, a_mask], ["pizza", "bus"])  # stored in name order
    queries = [(rng.random((37, 45, 3)) * 255).astype(np.uint8) for _ in range(2)]
    results = seg.predict(queries, return_probs=True, instances=True, min_area=4, return_prob=True)
    for query, result in zip(queries, results, strict=True):
        assert result.classes == ["bus", "pizza"] and result.min_score == 0 and result.absent == []
        assert np.array_equal(result.labels, seg.segment(query))
        assert result.scores.shape == (2,) and ((result.scores >= 0) & (result.scores <= 1)).all()
        assert result.probs.shape == (3, 37, 45)
        assert np.allclose(result.probs.sum(0), 1, atol=1e-5)
        assert (result.probs.argmax(0) == result.labels).mean() > 0.999
        assert np.allclose(
            np.take_along_axis(result.probs, result.labels[None].astype(int), 0)[0], result.prob, atol=1e-5
        )
        objects = find_instances(result.labels, result.prob, 4)
        assert [(i.label, i.area, i.box) for i in result.instances] == [
            (i.label, i.area, i.box) for i in objects
        ]
    # The same set built in name order, or grown by add_shot, labels the same way.
    by_name = Segmenter(model, size=SIZE)
    by_name.set_support([b_img[:1]], [b_mask[:1]], ["pizza"])
    by_name.add_shot("bus", a_img[0], a_mask[0])
    by_name.add_shot("bus", a_img[1], a_mask[1])
    assert by_name.classes() == ["bus", "pizza"]
    for query, result in zip(queries, results, strict=True):
        assert np.array_equal(by_name.segment(query), result.labels)
    streamed = list(seg.segment_stream(queries, instances=True, min_area=4))
    assert [s.result.class_scores() for s in streamed] == [r.class_scores() for r in results]


def test_min_score_gates_absent_classes(model):
    rng = np.random.default_rng(2)
    images, masks = shots(rng, 2)
    query = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    plain = Segmenter(model, size=SIZE)
    plain.set_support([images[:1], images[1:]], [masks[:1], masks[1:]], ["a", "b"])
    result = plain.predict(query)
    assert plain.min_score == 0 and np.array_equal(result.labels, plain.segment(query))  # uncalibrated
    low, high = sorted(result.scores)
    cut = (low + high) / 2
    gated = Segmenter(model, size=SIZE, min_score=float(cut))
    gated.set_support([images[:1], images[1:]], [masks[:1], masks[1:]], ["a", "b"])
    out = gated.predict(query, return_probs=True)
    weak = result.classes[int(np.argmin(result.scores))]
    assert out.absent == [weak] and np.allclose(out.scores, result.scores)
    assert not (out.labels == result.classes.index(weak) + 1).any()
    assert np.array_equal(out.labels, gated.segment(query))
    assert (out.probs[result.classes.index(weak) + 1] == 0).all()
    everything = Segmenter(model, size=SIZE, min_score=1.0)
    everything.set_support([images[:1], images[1:]], [masks[:1], masks[1:]], ["a", "b"])
    assert not everything.segment(query).any()
    with pytest.raises(fss.errors.SettingError):
        Segmenter(model, size=SIZE, min_score=1.5)


def test_run_writes_scores_and_coco_instances(tmp_path, model, capsys):
    ckpt = tmp_path / "model.pt"
    fss.save_checkpoint(random_model(input_size=65), ckpt)
    support, query, out = make_support(tmp_path / "s"), make_queries(tmp_path / "q", n=2), tmp_path / "out"
    args = [
        "--support",
        support,
        "--query",
        query,
        "--out",
        out,
        "--ckpt",
        ckpt,
        "--backend",
        "torch",
        "--instances",
        "--min-area",
        3,
    ]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["min_score"] == 0 and results["settings"]["instances"] == 3
    document = json.loads((out / "instances.json").read_text())
    assert [c["name"] for c in document["categories"]] == ["cat", "dog"]
    assert [i["file_name"] for i in document["images"]] == ["q0.jpg", "q1.jpg"]
    for image, entry in zip(document["images"], results["queries"], strict=True):
        assert set(entry["score"]) == {"cat", "dog"} and entry["absent"] == []
        labels = np.array(Image.open(out / entry["file"].replace(".jpg", ".png")))
        anns = [a for a in document["annotations"] if a["image_id"] == image["id"]]
        union = np.zeros(labels.shape, np.uint8)
        for ann in anns:
            rle = ann["segmentation"]
            mask = coco_mask.decode({**rle, "counts": rle["counts"].encode()}).astype(bool)
            assert (labels[mask] == ann["category_id"]).all() and mask.sum() == ann["area"] >= 3
            union[mask] = ann["category_id"]
        small = [r for r in flood_regions(labels) if len(r) < 3]
        for y, x in (p for r in small for p in r):
            labels[y, x] = 0
        assert np.array_equal(union, labels)
    # Another --min-score is another setting: refused without --overwrite.
    assert main([str(a) for a in [*args, "--min-score", 0.5]]) == 2
    assert "another --min-score" in capsys.readouterr().err


def test_overlay_outlines_each_object():
    from fss.io.outputs import outline

    labels = np.zeros((12, 12), np.uint8)
    labels[1:6, 1:6], labels[1:6, 6:11], labels[8:11, 8:11] = 1, 2, 1
    objects = labels > 0
    objects[8:11, 8:11] = False  # under min_area: not an object, not outlined
    edge = outline(labels, objects)
    ring = np.zeros((5, 5), bool)
    ring[[0, -1]], ring[:, [0, -1]] = True, True
    assert np.array_equal(edge[1:6, 1:6], ring) and np.array_equal(edge[1:6, 6:11], ring)
    assert edge.sum() == 2 * ring.sum()
