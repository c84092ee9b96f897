"""Box supports: box files (hostile ones too), boxes as masks (filled or GrabCut), fss-run, fss-eval."""

import json
import sys

import numpy as np
import pytest
import torch
from helpers import make_queries, random_model, save_image, save_mask
from PIL import Image
from test_train import SIZE, make_shapes

import fss
from fss.errors import FssError
from fss.io.boxes import BoxFileError, boxes_mask, filled_boxes, grabcut, pixel_boxes, read_boxes
from fss.io.folders import find_support_pairs
from fss.io.masks import read_support_shots
from fss.runtime.cli import main as fss_run
from fss.runtime.segmenter import Segmenter
from fss.train.box_quality import measure
from fss.train.eval_cli import main as fss_eval


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def object_photo(size=(96, 80), square=(30, 22, 70, 58), seed=0) -> tuple[Image.Image, np.ndarray]:
    """A red square on a textured grey-green background, and its true mask."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 90 + 40).astype(np.uint8)
    pixels[::6, :, 1] = 150  # stripes: the background is not one colour
    x0, y0, x1, y1 = square
    pixels[y0:y1, x0:x1] = np.clip(rng.normal((210, 30, 40), 12, (y1 - y0, x1 - x0, 3)), 0, 255)
    truth = filled_boxes([square], (size[1], size[0]))
    return Image.fromarray(pixels), truth


def iou(a, b) -> float:
    return float((a.astype(bool) & b.astype(bool)).sum() / (a.astype(bool) | b.astype(bool)).sum())


# -- box files ---------------------------------------------------------------------------------------


def test_box_files_parse(tmp_path):
    assert read_boxes(write(tmp_path / "a.box.json", "[[1, 2, 30, 40], [5.5, 6, 7, 8]]")) == [
        (1, 2, 30, 40),
        (5.5, 6, 7, 8),
    ]
    assert read_boxes(write(tmp_path / "b.box.json", '{"boxes": [[0, 0, 3, 3]]}')) == [(0, 0, 3, 3)]
    text = "# x0 y0 x1 y1\n1 2 30 40\n\n 5,6, 7 ,8  # second\n"
    assert read_boxes(write(tmp_path / "c.box.txt", text)) == [(1, 2, 30, 40), (5, 6, 7, 8)]


HOSTILE = [
    ("empty.box.txt", "", "holds no box"),
    ("blank.box.txt", "\n  \n# only a comment\n", "holds no box"),
    ("empty.box.json", "[]", "holds no box"),
    ("word.box.txt", "1 2 three 4", "non-number"),
    ("nan.box.txt", "1 2 nan 4", "non-number"),
    ("inf.box.json", "[[1, 2, 1e999, 4]]", "non-number"),
    ("bool.box.json", "[[true, 2, 3, 4]]", "non-number"),
    ("nested.box.json", "[[[1], 2, 3, 4]]", "non-number"),
    ("three.box.txt", "1 2 3", "not four numbers"),
    ("five.box.json", "[[1, 2, 3, 4, 5]]", "not four numbers"),
    ("flat.box.json", "[1, 2, 3, 4]", "not four numbers"),
    ("x.box.txt", "5 0 5 9", "x1 must exceed x0"),
    ("y.box.txt", "0 9 5 3", "x1 must exceed x0 and y1 exceed y0"),
    ("dict.box.json", '{"box": [[0, 0, 1, 1]]}', "expected a list"),
    ("text.box.json", "x0 y0", "not JSON"),
    ("latin.box.txt", b"1 2 3 4 \xe9", "not UTF-8"),
    ("deep.box.json", "[" * 100_000 + "]" * 100_000, "nests lists too deeply"),
    ("huge.box.txt", "1 2 3 4\n" * 200_000, "over 1024 KiB"),
]


@pytest.mark.parametrize("name, content, message", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_box_files_are_one_line_errors_naming_the_file(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(BoxFileError, match=message) as caught:
        read_boxes(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_boxes_outside_the_image_or_under_a_pixel_are_refused():
    assert pixel_boxes([(0, 0, 48, 40), (2.4, 3.6, 10.5, 20)], (48, 40)) == [(0, 0, 48, 40), (2, 4, 10, 20)]
    for box, message in [
        ((-1, 0, 10, 10), "reaches outside the image 48x40"),
        ((0, 0, 49, 10), "reaches outside"),
        ((0, 30, 10, 41), "reaches outside"),
        ((3.2, 0, 3.4, 10), "covers no whole pixel"),
    ]:
        with pytest.raises(BoxFileError, match=message):
            pixel_boxes([box], (48, 40), "shot.box.txt")


def test_folder_pairs_images_with_box_files(tmp_path):
    rng = np.random.default_rng(0)
    cat = tmp_path / "s" / "cat"
    save_image(cat / "a.jpg", rng)
    write(cat / "a.box.txt", "1 1 20 20")
    save_image(cat / "b.jpg", rng)
    save_mask(cat / "b.png")
    save_image(cat / "c.png", rng)
    write(cat / "c.BOX.JSON", "[[0, 0, 5, 5]]")
    pairs = find_support_pairs(tmp_path / "s", boxes=True)
    assert [(i.name, m.name) for i, m in pairs["cat"]] == [
        ("a.jpg", "a.box.txt"),
        ("b.jpg", "b.png"),
        ("c.png", "c.BOX.JSON"),
    ]
    # Readers that take no box files skip them as before (b's mask stays) and miss a's mask.
    heard = []
    with pytest.raises(FssError, match="image without mask"):
        find_support_pairs(tmp_path / "s", warn=lambda message, path: heard.append(path.name))
    assert "a.box.txt" in heard


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"a.png": "mask"}, r"a mask and a box file for one image \(a.png and a.box.txt\): keep one"),
        ({"a.box.json": "[[0, 0, 2, 2]]"}, r"two box files for one image \(a.box.json and a.box.txt\)"),
        ({"z.box.txt": "0 0 2 2"}, r"box file without image \(expected an image z\.\*\)"),
    ],
)
def test_folder_refuses_ambiguous_or_orphan_box_files(tmp_path, extra, message):
    cat = tmp_path / "cat"
    save_image(cat / "a.jpg", np.random.default_rng(0))
    write(cat / "a.box.txt", "1 1 20 20")
    for name, content in extra.items():
        if content == "mask":
            save_mask(cat / name)
        else:
            write(cat / name, content)
    with pytest.raises(FssError, match=message):
        find_support_pairs(cat, boxes=True)


# -- boxes as masks ----------------------------------------------------------------------------------


def test_mask_mode_is_exactly_the_filled_boxes(tmp_path):
    cat = tmp_path / "cat"
    save_image(cat / "a.jpg", np.random.default_rng(0), size=(48, 40))
    write(cat / "a.box.txt", "2 3 10 12\n8 10 30 39.6")
    _, images, masks = read_support_shots(find_support_pairs(cat, boxes=True))
    expected = np.zeros((40, 48), np.uint8)
    expected[3:12, 2:10] = 1
    expected[10:40, 8:30] = 1
    assert images[0][0].size == (48, 40) and np.array_equal(masks[0][0], expected)
    write(cat / "a.box.txt", "2 3 10 41")
    with pytest.raises(
        BoxFileError, match=r"box 1 \(2 3 10 41\) reaches outside the image 48x40 \(.*a.box.txt\)"
    ):
        read_support_shots(find_support_pairs(cat, boxes=True))
    with pytest.raises(FssError, match="must be one of mask, grabcut"):
        read_support_shots(find_support_pairs(cat, boxes=True), "brush")


def test_grabcut_recovers_an_object_from_a_loose_box():
    image, truth = object_photo()
    loose = (18, 10, 84, 72)  # the square plus 12 px of background on every side
    found = grabcut(image, [loose])
    assert iou(found, truth) > 0.8 > iou(filled_boxes([loose], truth.shape), truth)
    assert not (found & (1 - filled_boxes([loose], truth.shape))).any()  # never outside its box
    assert np.array_equal(found, grabcut(image, [loose]))  # OpenCV's generator is seeded: reproducible
    # A large photo is cut at a bounded size and scaled back: the same object at 8x.
    big = image.resize((96 * 8, 80 * 8), Image.NEAREST)
    big_truth = np.asarray(Image.fromarray(truth).resize(big.size, Image.NEAREST))
    assert iou(grabcut(big, [tuple(8 * v for v in loose)]), big_truth) > 0.8


def test_grabcut_never_returns_an_empty_box():
    flat = Image.new("RGB", (40, 30), (90, 90, 90))
    image, _ = object_photo()
    cases = [
        (flat, [(5, 5, 20, 20)]),  # one colour: nothing to separate
        (flat, [(0, 0, 40, 30)]),  # the whole image: no background to learn from
        (image, [(2, 2, 4, 4), (30, 22, 70, 58)]),  # a box too small to refine, beside a normal one
        (image, [(0, 70, 10, 80)]),  # a box of background only
    ]
    for img, boxes in cases:
        found = boxes_mask(img, boxes, "grabcut")
        for x0, y0, x1, y1 in boxes:
            assert found[y0:y1, x0:x1].any(), boxes
        assert not (found & (1 - filled_boxes(boxes, found.shape))).any()


def test_missing_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    image, _ = object_photo()
    with pytest.raises(FssError, match=r'pip install "fss\[box\]"'):
        boxes_mask(image, [(1, 1, 20, 20)], "grabcut")
    assert boxes_mask(image, [(1, 1, 20, 20)], "mask").sum() == 19 * 19  # filled boxes need no OpenCV


# -- fss-run, Segmenter, fss-eval --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    fss.save_checkpoint(random_model(input_size=65), path)
    return path


def box_support(root):
    """Two classes: one shot by box file, one by mask; and the same folder with the box as a mask PNG."""
    rng = np.random.default_rng(0)
    for folder in ("boxes", "masks"):
        rng = np.random.default_rng(0)
        save_image(root / folder / "cat" / "cat0.jpg", rng)
        save_image(root / folder / "dog" / "dog0.jpg", rng)
        save_mask(root / folder / "dog" / "dog0.png", box=(3, 4, 40, 30))
    write(root / "boxes" / "cat" / "cat0.box.json", json.dumps({"boxes": [[8, 6, 30, 28]]}))
    save_mask(root / "masks" / "cat" / "cat0.png", box=(8, 6, 30, 28))
    return root / "boxes", root / "masks"


def test_fss_run_with_box_supports(tmp_path, ckpt, capsys):
    boxes, masks = box_support(tmp_path)
    query = make_queries(tmp_path / "q")
    outs = {}
    for name, support, mode in [
        ("mask", masks, "mask"),
        ("box", boxes, "mask"),
        ("grabcut", boxes, "grabcut"),
    ]:
        outs[name] = tmp_path / f"out-{name}"
        args = [
            "--support",
            support,
            "--query",
            query,
            "--out",
            outs[name],
            "--ckpt",
            ckpt,
            "--box-supports",
            mode,
        ]
        assert fss_run([str(a) for a in args]) == 0, capsys.readouterr().err
    for i in range(3):  # a box file gives the masks of its filled box drawn as a mask PNG
        assert np.array_equal(
            np.asarray(Image.open(outs["box"] / f"q{i}.png")),
            np.asarray(Image.open(outs["mask"] / f"q{i}.png")),
        )
    sha = {
        name: json.loads((out / "results.json").read_text())["settings"]["support_sha256"]
        for name, out in outs.items()
    }
    assert len(set(sha.values())) == 3  # the box mode is part of the support set: resuming sees a change
    write(boxes / "cat" / "cat0.box.json", "[[8, 6, 30, 99]]")
    assert (
        fss_run(
            [
                str(a)
                for a in ["--support", boxes, "--query", query, "--out", tmp_path / "bad", "--ckpt", ckpt]
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "reaches outside the image 48x40" in err and "cat0.box.json" in err and "Traceback" not in err


def test_fss_run_without_opencv_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    boxes, _ = box_support(tmp_path)
    monkeypatch.setitem(sys.modules, "cv2", None)
    args = ["--support", boxes, "--query", make_queries(tmp_path / "q"), "--out", tmp_path / "out"]
    assert (
        fss_run([str(a) for a in [*args, "--ckpt", tmp_path / "missing.pt", "--box-supports", "grabcut"]])
        == 2
    )
    err = capsys.readouterr().err
    assert 'pip install "fss[box]"' in err and "missing.pt" not in err and not (tmp_path / "out").exists()


def test_segmenter_from_a_box_folder(tmp_path):
    boxes, masks = box_support(tmp_path)
    model = random_model(input_size=65)
    query = np.asarray(Image.open(next((tmp_path / "boxes" / "dog").glob("*.jpg"))))
    by_box = Segmenter.from_folder(boxes, model=model, backend="torch").segment(query)
    by_mask = Segmenter.from_folder(masks, model=model, backend="torch").segment(query)
    assert np.array_equal(by_box, by_mask)
    seg = Segmenter(model, backend="torch")
    seg.set_support(boxes, box_supports="grabcut")
    assert seg.segment(query).shape == query.shape[:2]


def test_fss_eval_grabcut_annotation(tmp_path_factory, capsys):
    data = make_shapes(tmp_path_factory.mktemp("shapes"), per_class=3)
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    fss.save_checkpoint(fss.PANet(width=0.0625, meta={"input_size": SIZE}), ckpt)
    out = tmp_path_factory.mktemp("eval") / "out.json"
    args = ["--ckpt", ckpt, "--data", data, "--classes", "circle,triangle", "--episodes", "3", "--runs", "1"]
    assert fss_eval([str(a) for a in [*args, "--annotation", "grabcut", "--json", out, "--no-progress"]]) == 0
    assert json.loads(out.read_text())["annotation"] == "grabcut"
    assert "grabcut" in capsys.readouterr().out


def test_box_quality_scores_grabcut_above_boxes_on_round_objects(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=2)
    for kind in ("bar", "square", "triangle"):
        for path in (data / kind).iterdir():
            path.unlink()
        (data / kind).rmdir()
    found = measure(data)  # circles: their box holds a fifth of background
    assert found["photos"] == 2 and found["iou_mask"] < 0.85 < found["iou_grabcut"]


# -- the page's box tool -----------------------------------------------------------------------------


def test_page_box_tool_boxes_typed_or_around_the_paint():
    from fss.demo.box_tool import box_mask, painted_box
    from fss.demo.session import DemoError

    image, truth = object_photo()
    typed, boxed = box_mask(image, [], "18 10 84 72", "box")
    assert boxed == "18 10 84 72" and np.array_equal(typed, filled_boxes([(18, 10, 84, 72)], truth.shape))
    refined, _ = box_mask(image, [], "18 10 84 72", "GrabCut")
    assert np.array_equal(refined, grabcut(image, [(18, 10, 84, 72)]))  # fss-run's --box-supports grabcut
    stroke = np.zeros((40, 48, 4), np.uint8)  # a diagonal drag on a canvas at half the image's size
    for i in range(30):
        stroke[5 + i, 9 + i] = (255, 0, 0, 255)
    assert painted_box([stroke], image.size) == (18, 10, 78, 70)
    assert box_mask(image, [stroke], "", "box")[1] == "18 10 78 70"
    for text, layers, mode, message in [
        ("", [], "box", "drag the brush"),
        ("1 2 3", [], "box", "not four numbers"),
        ("0 0 97 10", [], "box", "reaches outside the image 96x80"),
        ("0 0 9 9", [], "brush", "choose one of"),
    ]:
        with pytest.raises(FssError, match=message):
            box_mask(image, layers, text, mode)
    assert issubclass(DemoError, FssError)
