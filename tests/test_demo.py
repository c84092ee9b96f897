"""The demo without a browser: masks as Segmenter and fss-run make them, re-use, isolation, bad input."""

import importlib.util
import json
import re
import socket
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import random_model, save_image
from hostile import save_rotated_jpeg
from PIL import Image

import fss
from fss.constants import IGNORE_INDEX
from fss.demo import outputs
from fss.demo.cli import main as demo_main
from fss.demo.editor import mask_from_layers, mask_layer
from fss.demo.session import DemoError, Engine, Session, read_uploaded_image
from fss.io.images import read_image
from fss.io.outputs import overlay_image
from fss.runtime.cli import main as fss_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model():
    return random_model(input_size=65)


@pytest.fixture
def engine(model):
    return Engine(model, "test model", device="cpu", batch=2)


def shot(rng, size=(48, 40), box=(8, 6, 30, 28)):
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
    mask = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    return image, mask


def queries(tmp_path, n=3, seed=1):
    rng = np.random.default_rng(seed)
    paths = [tmp_path / f"q{i}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        save_image(path, rng, size=(40 + 5 * i, 36 + 3 * i))
    return paths


def labels(session):
    return {q.name: q.labels for q in session.queries.values() if q.labels is not None}


def reference(model, shots: dict, paths, refine=None) -> dict:
    """Segmenter with the same shots, classes in fss-run's order (sorted names)."""
    seg = fss.Segmenter(model, device="cpu", refine=refine)
    names = sorted(shots)
    seg.set_support(
        [[s[0] for s in shots[n]] for n in names], [[s[1] for s in shots[n]] for n in names], names
    )
    return {p.name: out for p, out in zip(paths, seg.segment(paths), strict=True)}


def test_masks_equal_segmenter_and_fss_run_zip(engine, model, tmp_path):
    rng = np.random.default_rng(0)
    shots = {"dog": [shot(rng)], "cat": [shot(rng, box=(4, 4, 20, 30)), shot(rng, box=(10, 2, 40, 20))]}
    session = Session(engine)
    paths = queries(tmp_path)
    session.add_queries(paths)  # before any shot: kept, segmented when the first shot arrives
    assert not labels(session)
    for name in ("dog", "cat"):  # "cat" sorts before "dog": the support set is rebuilt in fss-run's order
        for image, mask in shots[name]:
            session.add_shot(name, image, mask)
    assert session.classes == ["cat", "dog"]
    expected = reference(model, shots, paths)
    got = labels(session)
    assert set(got) == set(expected)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name
    assert any((m > 0).any() for m in got.values()) and any((m == 0).any() for m in got.values())

    # The zip is fss-run's output for the zip's own support folder and the same queries.
    archive = zipfile.ZipFile(outputs.write_zip(session))
    unpacked = tmp_path / "zip"
    archive.extractall(unpacked)
    ckpt = tmp_path / "model.pt"
    fss.save_checkpoint(model, ckpt)
    out = tmp_path / "run"
    query_dir = paths[0].parent
    code = fss_run(
        [
            "--support",
            str(unpacked / "support"),
            "--query",
            str(query_dir),
            "--out",
            str(out),
            "--ckpt",
            str(ckpt),
        ]
    )
    assert code == 0
    for path in paths:
        assert np.array_equal(
            np.asarray(Image.open(unpacked / f"{path.stem}.png")),
            np.asarray(Image.open(out / f"{path.stem}.png")),
        )
        overlay = f"overlays/{path.stem}.jpg"
        assert (unpacked / overlay).read_bytes() == (out / overlay).read_bytes()
    page, run = (
        json.loads((unpacked / "results.json").read_text()),
        json.loads((out / "results.json").read_text()),
    )
    assert page["classes"] == run["classes"] == {"0": "background", "1": "cat", "2": "dog"}
    assert page["support"]["shots"] == run["support"]["shots"] == [2, 1]
    assert [(q["file"], q["fractions"]) for q in page["queries"]] == [
        (q["file"], q["fractions"]) for q in run["queries"]
    ]
    session.close()


def test_phone_photos_are_turned_as_fss_run_turns_them(engine, model, tmp_path):
    """Photos stored sideways with an EXIF orientation (as phones save them) are read as displayed, as
    fss-run and the Segmenter read them: the mask painted on the page fits, and the masks are theirs."""
    rng = np.random.default_rng(3)
    support, query = tmp_path / "support.jpg", tmp_path / "query.jpg"
    for path in (support, query):
        save_rotated_jpeg(path, (rng.random((40, 56, 3)) * 255).astype(np.uint8), orientation=6)
    image = read_uploaded_image(support)
    assert image.size == (40, 56)  # displayed turned 90 degrees: 40 wide, 56 high
    np.testing.assert_array_equal(np.asarray(image), np.asarray(read_image(support, draft=False)))
    mask = np.zeros((56, 40), np.uint8)
    mask[10:40, 5:30] = 1
    session = Session(engine)
    session.add_queries([query])
    session.add_shot("cat", image, mask)
    expected = reference(model, {"cat": [(support, mask)]}, [query])
    got = labels(session)["query.jpg"]
    assert got.shape == (56, 40) and np.array_equal(got, expected["query.jpg"])
    session.close()


@pytest.mark.parametrize("method", ["sst", "oslsm"])
def test_learned_head_and_conditioning_methods_match_the_segmenter(method, tmp_path):
    from test_serve import small_method_model

    model = small_method_model(method)
    rng = np.random.default_rng(2)
    shots = {"cat": [shot(rng, box=(4, 4, 20, 30)), shot(rng, box=(10, 2, 40, 20))], "dog": [shot(rng)]}
    session = Session(Engine(model, f"tiny {method}", device="cpu", batch=2))
    paths = queries(tmp_path)
    session.add_queries(paths)
    for name, pairs in shots.items():
        for image, mask in pairs:
            session.add_shot(name, image, mask)
    session.remove_shot("cat", 1)  # the state is rebuilt from the remaining shot
    shots["cat"] = shots["cat"][:1]
    expected, got = reference(model, shots, paths), labels(session)
    assert set(got) == set(expected)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name
    session.close()


def test_shot_changes_match_cached_query_features_without_re_encoding(engine, model, tmp_path):
    rng = np.random.default_rng(1)
    first, second, other = shot(rng), shot(rng, box=(2, 2, 25, 35)), shot(rng, box=(20, 10, 46, 38))
    session = Session(engine)
    session.add_shot("cat", *first)
    paths = queries(tmp_path, n=4)
    session.add_queries(paths)
    assert engine.encoded_images == 1 + 4
    session.add_shot("cat", *second)  # one more shot: only it is encoded, the queries are re-matched
    assert engine.encoded_images == 1 + 4 + 1
    assert all(
        np.array_equal(labels(session)[k], v)
        for k, v in reference(model, {"cat": [first, second]}, paths).items()
    )
    session.add_shot("zebra", *other)  # a new class sorting last is appended without re-encoding
    assert engine.encoded_images == 7
    session.remove_shot("cat", 0)  # removing a shot re-encodes nothing
    assert engine.encoded_images == 7
    expected = reference(model, {"cat": [second], "zebra": [other]}, paths)
    assert all(np.array_equal(labels(session)[k], v) for k, v in expected.items())
    session.remove_shot("zebra", 0)  # the last shot of a class removes the class (the rest is rebuilt)
    assert session.classes == ["cat"]
    assert all(
        np.array_equal(labels(session)[k], v) for k, v in reference(model, {"cat": [second]}, paths).items()
    )
    session.remove_shot("cat", 0)
    assert not labels(session) and not engine.segmenter.has_support(session.id)


@pytest.mark.parametrize("refine", ["fusion", "adapt+fusion"])
def test_refine_matches_the_segmenter_through_shot_changes(model, refine, tmp_path):
    """``--refine``: an adapting refinement tunes the encoder to each support set, so the page keeps
    the queries' inputs and encodes them again at every change; masks equal Segmenter's."""
    engine = Engine(model, "test model", device="cpu", batch=2, refine=refine)
    assert engine.adapts == (refine == "adapt+fusion") and f"refinement {refine}" in engine.where
    rng = np.random.default_rng(3)
    first, second = shot(rng), shot(rng, box=(2, 2, 25, 35))
    session = Session(engine)
    paths = queries(tmp_path, n=1)  # added first: segmented when the set is registered
    session.add_queries(paths)
    shots = [first] if engine.adapts else [first, second]  # adapting costs seconds per change
    for image, mask in shots:
        session.add_shot("cat", image, mask)  # each change: queries encoded with the set's encoder
    expected = reference(model, {"cat": shots}, paths, refine=refine)
    assert np.array_equal(labels(session)["q0.jpg"], expected["q0.jpg"])
    session.close()


def test_feature_budget_re_encodes_queries_it_could_not_keep(model, tmp_path):
    engine = Engine(model, "test model", device="cpu", batch=2, feature_budget_mb=0)
    rng = np.random.default_rng(2)
    first, second = shot(rng), shot(rng, box=(2, 2, 25, 35))
    session = Session(engine)
    session.add_shot("cat", *first)
    paths = queries(tmp_path, n=2)
    session.add_queries(paths)
    session.add_shot("cat", *second)
    assert engine.encoded_images == 2 + 2 * 2  # two shots, the queries twice
    expected = reference(model, {"cat": [first, second]}, paths)
    assert all(np.array_equal(labels(session)[k], v) for k, v in expected.items())


def test_sessions_do_not_see_each_other(engine, model, tmp_path):
    rng = np.random.default_rng(3)
    a, b = Session(engine), Session(engine)
    shot_a, shot_b = shot(rng), shot(rng, box=(20, 10, 46, 38))
    a.add_shot("cat", *shot_a)
    b.add_shot("cat", *shot_b)
    paths = queries(tmp_path)
    a.add_queries(paths)
    b.add_queries(paths[:1])
    assert set(labels(b)) == {paths[0].name}
    for session, support in ((a, shot_a), (b, shot_b)):
        expected = reference(model, {"cat": [support]}, paths)
        assert all(np.array_equal(v, expected[k]) for k, v in labels(session).items())
    a.close()
    assert not engine.segmenter.has_support(a.id) and engine.segmenter.has_support(b.id)
    b.add_shot("cat", *shot_a)
    assert np.array_equal(
        labels(b)[paths[0].name], reference(model, {"cat": [shot_b, shot_a]}, paths)[paths[0].name]
    )


def test_concurrent_sessions_get_their_own_masks(engine, model, tmp_path):
    rng = np.random.default_rng(6)
    supports = [[shot(rng, box=(4 + 9 * i, 4, 30 + 5 * i, 30 + i)) for _ in range(2)] for i in range(3)]
    paths = queries(tmp_path, n=3)
    sessions = [Session(engine) for _ in supports]

    def work(session, shots):
        session.add_queries(paths)
        for image, mask in shots:
            session.add_shot("thing", image, mask)

    with ThreadPoolExecutor(len(sessions)) as pool:
        list(pool.map(work, sessions, supports))
    for session, shots in zip(sessions, supports, strict=True):
        expected = reference(model, {"thing": shots}, paths)
        assert all(np.array_equal(labels(session)[k], v) for k, v in expected.items())


def test_import_stays_light():
    code = "import sys, fss.demo.session, fss.demo.cli; assert 'gradio' not in sys.modules, 'gradio imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_input_gets_a_message_and_the_session_goes_on(engine, tmp_path):
    rng = np.random.default_rng(4)
    session = Session(engine)
    image, mask = shot(rng)
    with pytest.raises(DemoError, match="no foreground"):
        session.add_shot("cat", image, np.zeros_like(mask))
    with pytest.raises(DemoError, match="differs from image size"):
        session.add_shot("cat", image, mask[:-1])
    with pytest.raises(DemoError, match="class name"):
        session.add_shot("../etc", image, mask)
    # fss-run's class-name rules: the zip's support/<class>/ folders must read back as these classes.
    for name, message in [
        ("background", "collides with label 0"),
        ("Background", "collides with label 0"),
        ("bus.png", "like an image file name"),
    ]:
        with pytest.raises(DemoError, match=message):
            session.add_shot(name, image, mask)
    assert session.classes == []
    session.add_shot("cat", image, mask)
    with pytest.raises(DemoError, match="no shot 3"):
        session.remove_shot("cat", 2)
    corrupt, huge, text = tmp_path / "corrupt.jpg", tmp_path / "huge.png", tmp_path / "notes.png"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    Image.new("L", (10_000, 5_000)).save(huge)  # 50 MP: refused from the header, never decoded
    text.write_text("not an image")
    good = queries(tmp_path, n=1)
    messages = session.add_queries([corrupt, huge, text, *good])
    assert any("unreadable or corrupt image (corrupt.jpg)" in m for m in messages)
    assert any("too large: 10000x5000" in m and "huge.png" in m for m in messages)
    assert any("notes.png" in m for m in messages)
    assert set(labels(session)) == {"q0.jpg"}
    results = outputs.results(session)
    assert {q["file"]: "error" in q for q in results["queries"]} == {
        "corrupt.jpg": True,
        "huge.png": True,
        "notes.png": True,
        "q0.jpg": False,
    }
    session.clear_queries()
    with pytest.raises(DemoError, match="nothing to download"):
        outputs.write_zip(session)


@pytest.mark.parametrize("budget_mb", [512, 0])  # features kept, or labelled as they are encoded
def test_a_query_that_fails_to_segment_shows_its_error_and_the_others_go_on(model, budget_mb, tmp_path):
    """A server's refusal of one query (``fss-demo --server``) fails that query's row only."""
    engine = Engine(model, "test model", device="cpu", feature_budget_mb=budget_mb)
    working = engine.label

    def refuse_the_second(features, image, support):
        if image.size == (45, 39):
            raise DemoError("fss-serve: query image: more than the limit of 1000 pixels")
        return working(features, image, support)

    engine.label = refuse_the_second
    rng = np.random.default_rng(6)
    session = Session(engine)
    session.add_queries(queries(tmp_path, n=2))  # 40 x 36 and 45 x 39
    message = session.add_shot("cat", *shot(rng))
    refused = "q1.jpg not segmented: fss-serve: query image: more than the limit of 1000 pixels"
    assert message == f"1 queries segmented; {refused}"
    assert set(labels(session)) == {"q0.jpg"}
    assert outputs.table(session)[1][-1].startswith("error: fss-serve: query image")
    engine.label = working
    session.add_shot("cat", *shot(rng))
    assert set(labels(session)) == {"q0.jpg", "q1.jpg"} and all(
        q.error is None for q in session.queries.values()
    )


def test_query_memory_is_bounded_and_large_photos_are_shown_scaled(model, tmp_path):
    engine = Engine(model, "test model", device="cpu", max_query_pixels=3300)
    session = Session(engine)
    rng = np.random.default_rng(5)
    session.add_shot("cat", *shot(rng))
    paths = queries(tmp_path, n=3)  # 1440, 1755 and 2100 pixels
    messages = session.add_queries(paths)
    assert messages == ["the queries of this tab would pass 0.0033 megapixels: clear some first (q2.jpg)"]
    assert set(labels(session)) == {"q0.jpg", "q1.jpg"}
    big = tmp_path / "big.jpg"
    save_image(big, rng, size=(2000, 100))
    engine.max_query_pixels = 10**9
    session.add_queries([big])
    shown = dict((caption.split(":")[0], image) for image, caption in outputs.overlays(session))
    assert shown["big.jpg"].size == (1024, 51) and shown["q0.jpg"].size == (40, 36)
    assert session.queries["big"].labels.shape == (100, 2000)  # full size for the zip


def test_model_line_rounds_the_normalisation(engine):
    from fss.demo.outputs import model_line

    line = model_line(engine)
    assert "mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]" in line, line
    assert not re.search(r"\d\.\d{5,}", line), line


def test_the_legend_grows_with_the_photo():
    grey = (90, 90, 90)
    for width, legend_pixel in ((640, grey), (1280, (128, 0, 0))):  # class 1's colour, VOC palette
        labels_ = np.zeros((200, width), np.uint8)
        labels_[150:, width // 2 :] = 1
        overlay = overlay_image(Image.new("RGB", (width, 200), grey), labels_, ["bus"])
        assert overlay.getpixel((30, 26)) == legend_pixel, width  # inside the legend's box at 2x
    # The page draws it for its gallery's cells (at least twice as large at 640 px).
    labels_ = labels_[:, -640:]
    on_page = overlay_image(Image.new("RGB", (640, 200), grey), labels_, ["bus"], legend_scale=640 / 320)
    assert on_page.getpixel((30, 26)) == (128, 0, 0)


def test_painted_layers_become_the_mask():
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 10:30] = 1
    layer = mask_layer(mask, alpha=153)
    assert np.array_equal(mask_from_layers([layer], (40, 30)), mask)
    erased = layer.copy()
    erased[5:20, 10:20, 3] = 0  # the eraser makes pixels transparent again
    assert mask_from_layers([erased], (40, 30)).sum() == 15 * 10
    half = layer[::2, ::2]  # a canvas at another scale is brought to the image's size
    assert np.array_equal(mask_from_layers([half], (40, 30))[::2, ::2], mask[::2, ::2])
    assert not mask_from_layers([], (40, 30)).any()
    from_file = np.zeros((30, 40), np.uint8)
    from_file[20:25] = IGNORE_INDEX
    from_file[0:3] = 1
    combined = mask_from_layers([layer], (40, 30), base=from_file)  # paint adds to a mask file's mask
    assert (combined[mask == 1] == 1).all() and (combined[0:3] == 1).all() and (combined[20:25] == 255).all()
    assert (combined == 0).sum() == 30 * 40 - 15 * 20 - 3 * 40 - 5 * 40


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert demo_main(["--ckpt", str(bad), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fss-demo: error: ") and "bad.pt" in err[0]
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--port", "0"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    for argv, message in [
        (["--server", "127.0.0.1:9", "--refine", "fusion"], "--refine is for a local model"),
        (["--refine", "sharpen"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            demo_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert demo_main(["--server", f"127.0.0.1:{free_port()}"]) == 2  # nothing listens there
    err = capsys.readouterr().err.strip().splitlines()
    expected = "no fss-serve ready at" if importlib.util.find_spec("tritonclient") else "pip install"
    assert len(err) == 1 and expected in err[0], err
