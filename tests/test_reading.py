"""Images are read as a person sees them; masks by one parser; support folders paired without surprises."""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from helpers import save_image, save_mask
from hostile import save_pixel_bomb, save_png16_grey, save_png16_rgb, save_rotated_jpeg
from PIL import Image

from fss.errors import FssError
from fss.io.folders import MAX_CLASSES, check_class_names, class_pairs, find_support_pairs, list_images
from fss.io.images import full_size, max_pixels, pixel_limit, read_image
from fss.io.masks import parse_mask, read_mask


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    save_pixel_bomb(path)
    assert path.stat().st_size < 200_000
    return path


# -- 16-bit ----------------------------------------------------------------------------------------------
def test_16_bit_grey_png_is_scaled_by_range_not_white(tmp_path):
    values = np.array([[0, 257 * 10], [257 * 128, 65535]], np.uint16)
    save_png16_grey(tmp_path / "g.png", values)
    img = np.asarray(read_image(tmp_path / "g.png"))
    assert img[..., 0].tolist() == [[0, 10], [128, 255]] and (img[..., 0] == img[..., 2]).all()


def test_16_bit_rgb_png_is_scaled_by_range(tmp_path):
    pixels = (np.arange(12, dtype=np.uint16).reshape(2, 2, 3) * 5000).astype(np.uint16)
    save_png16_rgb(tmp_path / "c.png", pixels)
    np.testing.assert_allclose(np.asarray(read_image(tmp_path / "c.png")), pixels / 257, atol=1)


def test_16_bit_masks_and_arrays(tmp_path):
    values = np.zeros((4, 5), np.uint16)
    values[1:3, 1:4] = 65535
    save_png16_grey(tmp_path / "m.png", values)
    assert read_mask(tmp_path / "m.png").tolist() == (values > 0).astype(np.uint8).tolist()
    assert parse_mask(values).tolist() == (values > 0).astype(np.uint8).tolist()
    from fss.io.images import as_rgb

    assert np.asarray(as_rgb(np.full((2, 2, 3), 65535, np.uint16))).max() == 255
    assert np.asarray(as_rgb(np.full((2, 2, 3), 257 * 7, np.uint16))).max() == 7


# -- one mask parser ---------------------------------------------------------------------------------------
def test_one_parser_for_files_images_and_arrays(tmp_path):
    fss1000 = np.zeros((6, 7), np.uint8)
    fss1000[2:5, 1:4] = 255
    expected = (fss1000 > 0).astype(np.uint8)
    Image.fromarray(fss1000).save(tmp_path / "m.png")
    # an FSS-1000 mask as an array is foreground, not ignored (it used to fail as "no foreground")
    for source in (
        tmp_path / "m.png",
        str(tmp_path / "m.png"),
        Image.fromarray(fss1000),
        fss1000,
        fss1000 > 0,
    ):
        assert parse_mask(source).tolist() == expected.tolist(), type(source)
    parsed = expected.copy()
    parsed[0, 0] = 255  # 0 / 1 / 255: already parsed, 255 ignored
    assert parse_mask(parsed)[0, 0] == 255
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[2:5, 1:4, 1] = 200
    assert parse_mask(rgb).tolist() == expected.tolist()


def box_mask(box=(1, 2, 4, 5)) -> np.ndarray:
    """A 6 x 7 parsed mask with a foreground box (x0, y0, x1, y1)."""
    mask = np.zeros((6, 7), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    return mask


def with_alpha(colour: np.ndarray, alpha: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(np.dstack([colour, alpha]).astype(np.uint8), mode=mode)


def parse_everywhere(img: Image.Image, tmp_path) -> list[np.ndarray]:
    """The image parsed as a PNG file, a PIL image and an array."""
    img.save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == img.mode  # the file keeps its alpha
    return [read_mask(tmp_path / "m.png"), parse_mask(img), parse_mask(np.asarray(img))]


@pytest.mark.parametrize("white", [True, False])
def test_a_mask_only_in_the_alpha_channel_reads_the_alpha(tmp_path, white):
    """An object cut out of a white (or black) layer: the colour is uniform, the alpha holds the mask."""
    expected = box_mask()
    alpha = expected * 255
    alpha[2, 1] = 128  # half-transparent edges are foreground
    rgb = np.full((6, 7, 3), 255 if white else 0, np.uint8)
    for img in (with_alpha(rgb, alpha, "RGBA"), with_alpha(rgb[..., :1], alpha, "LA")):
        for parsed in parse_everywhere(img, tmp_path):
            assert parsed.tolist() == expected.tolist(), img.mode


def test_a_colour_mask_with_transparency_reads_its_colour(tmp_path):
    expected = box_mask()
    colour = np.zeros((6, 7, 3), np.uint8)
    colour[..., 0] = expected * 200
    opaque = np.full((6, 7), 255, np.uint8)
    cut_out = expected * 255  # the same object in both: transparent black background
    for alpha in (opaque, cut_out):
        for img in (with_alpha(colour, alpha, "RGBA"), with_alpha(colour[..., :1], alpha, "LA")):
            for parsed in parse_everywhere(img, tmp_path):
                assert parsed.tolist() == expected.tolist(), img.mode


def test_a_mask_whose_colour_and_alpha_disagree_is_refused(tmp_path):
    colour = np.zeros((6, 7, 3), np.uint8)
    colour[..., 1] = box_mask((1, 2, 4, 5)) * 255
    alpha = box_mask((3, 0, 7, 3)) * 255
    with_alpha(colour, alpha, "RGBA").save(tmp_path / "m.png")
    with pytest.raises(FssError, match=r"colour and alpha mark different pixels.*\(.*m\.png\)$"):
        read_mask(tmp_path / "m.png")
    with pytest.raises(FssError, match="colour and alpha mark different pixels"):
        parse_mask(np.dstack([colour, alpha]))


def test_segmenter_accepts_an_fss1000_array_mask():
    from helpers import random_model

    import fss

    rng = np.random.default_rng(0)
    image = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[5:30, 5:30] = 255
    seg = fss.Segmenter(random_model(), size=33, batch=2)
    seg.set_support([[image]], [[mask]], ["thing"])
    by_array = seg.segment([image])[0]
    seg.set_support([[image]], [[mask > 0]], ["thing"])
    assert (seg.segment([image])[0] == by_array).all()


# -- EXIF orientation --------------------------------------------------------------------------------------
def test_exif_orientation_is_applied_to_images_not_masks(tmp_path):
    rng = np.random.default_rng(1)
    stored = (rng.random((30, 50, 3)) * 255).astype(np.uint8)  # 50 wide, 30 high as stored
    save_rotated_jpeg(tmp_path / "p.jpg", stored, orientation=6)
    img = read_image(tmp_path / "p.jpg")
    assert img.size == (30, 50)  # displayed: turned 90 degrees clockwise
    plain = np.asarray(read_image(tmp_path / "p.jpg", orient_exif=False))
    assert plain.shape == (30, 50, 3)
    np.testing.assert_array_equal(np.asarray(img), np.rot90(plain, k=-1))
    # a mask PNG carrying an orientation tag is still read as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ones((30, 50), np.uint8) * 255).save(tmp_path / "m.png", exif=exif.tobytes())
    assert read_mask(tmp_path / "m.png").shape == (30, 50)


# -- pixel limit -------------------------------------------------------------------------------------------
def test_pixel_bomb_is_refused_from_its_header_without_pillow_warning(bomb):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not leak
        with pytest.raises(FssError, match=r"12500 x 12500 = 156,250,000 pixels, more than the limit"):
            read_image(bomb)
        with pytest.raises(FssError, match="more than the limit"):
            read_mask(bomb)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    save_image(tmp_path / "a.png", np.random.default_rng(0), size=(40, 30))
    with pixel_limit(1000), pytest.raises(FssError, match="40 x 30 = 1,200 pixels"):
        read_image(tmp_path / "a.png")
    monkeypatch.setenv("FSS_MAX_PIXELS", "1199")
    assert max_pixels() == 1199
    with pytest.raises(FssError, match="limit of 1,199"):
        read_image(tmp_path / "a.png")
    with pixel_limit(1200):
        assert read_image(tmp_path / "a.png").size == (40, 30)
    monkeypatch.setenv("FSS_MAX_PIXELS", "lots")
    with pytest.raises(FssError, match="FSS_MAX_PIXELS must be a positive integer"):
        max_pixels()


def test_large_jpeg_decodes_at_half_side_in_draft_mode(tmp_path):
    rng = np.random.default_rng(2)
    Image.fromarray((rng.random((300, 400, 3)) * 255).astype(np.uint8)).save(tmp_path / "big.jpg")
    with pixel_limit(40_000):  # 120,000 pixels: within 4x the limit
        img = read_image(tmp_path / "big.jpg")
        assert img.size == (200, 150) and full_size(img) == (400, 300)
    with pixel_limit(29_999), pytest.raises(FssError, match="more than the limit"):
        read_image(tmp_path / "big.jpg")  # beyond 4x: refused


PILLOW_BOUND_AT_10000 = 13_981  # Pillow's default bound (89,478,485) as it stands to our default limit (64 M)


def test_jpeg_exactly_4x_over_the_limit_decodes_at_half_side_past_pillows_own_bound(tmp_path, monkeypatch):
    """At the default limit, 16000 x 16000 (4x) is beyond Pillow's bound (twice 89 M): scaled down."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_BOUND_AT_10000)
    rng = np.random.default_rng(2)
    for width in (200, 201):
        pixels = (rng.random((200, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{width}.jpg")
    with pixel_limit(10_000):
        img = read_image(tmp_path / "200.jpg")  # 40,000 pixels: exactly 4x
        assert img.size == (100, 100) and full_size(img) == (200, 200)
        with pytest.raises(FssError, match=r"201 x 200 = 40,200 pixels, more than the limit of 10,000"):
            read_image(tmp_path / "201.jpg")  # beyond 4x: refused by our limit, from the header
    assert Image.MAX_IMAGE_PIXELS == PILLOW_BOUND_AT_10000  # only raised while fss opens an image


def test_pillows_own_bound_rises_with_the_pixel_limit(tmp_path, monkeypatch):
    save_image(tmp_path / "a.png", np.random.default_rng(0), size=(100, 100))
    save_mask(tmp_path / "m.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over 2,000 pixels
    with pixel_limit(10_000):
        assert read_image(tmp_path / "a.png").size == (100, 100)
        assert read_mask(tmp_path / "m.png").shape == (100, 100)
    with pixel_limit(1999), pytest.raises(FssError, match="10,000 pixels, more than the limit of 1,999"):
        read_image(tmp_path / "a.png")
    with (
        pixel_limit(100),
        pytest.raises(FssError, match="more than 2,000 pixels, more than the limit of 100"),
    ):
        read_mask(tmp_path / "m.png")  # beyond twice Pillow's bound, Pillow's refusal is one line too


def test_rotated_large_jpeg_keeps_its_displayed_full_size(tmp_path):
    save_rotated_jpeg(tmp_path / "r.jpg", np.zeros((300, 400, 3), np.uint8), orientation=8)
    with pixel_limit(40_000):
        img = read_image(tmp_path / "r.jpg")
    assert img.size == (150, 200) and full_size(img) == (300, 400)


MEMORY_CHECK = """
import resource, sys
from pathlib import Path
from fss.io.images import read_image
from fss.io.masks import read_mask
from fss.errors import FssError
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 192 * 2**20, resource.RLIM_INFINITY))
for read in (read_image, read_mask):
    try:
        read(Path(sys.argv[1]))
    except FssError as exc:
        print("refused:", exc)
"""


def test_pixel_bomb_is_refused_within_a_memory_bound(bomb):
    """With 192 MB of address space to spare (the bomb's RGB decode is 469 MB), both readers refuse."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_CHECK), str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("refused:") == 2 and "more than the limit" in done.stdout


# -- folders -------------------------------------------------------------------------------------------------
def test_folder_like_images_and_broken_links_are_warned_of(tmp_path):
    query = tmp_path / "q"
    save_image(query / "a.jpg", np.random.default_rng(0))
    (query / "dir.jpg").mkdir()
    (query / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (query / "loop.png").symlink_to(query / "loop.png")
    images, skipped = list_images(query)
    assert [p.name for p in images] == ["a.jpg"]
    reasons = {p.name: why for p, why in skipped}
    assert reasons == {
        "dir.jpg": "folder named like an image",
        "gone.jpg": "dangling or looping symbolic link",
        "loop.png": "dangling or looping symbolic link",
    }
    support = tmp_path / "s" / "cat"
    save_image(support / "a.jpg", np.random.default_rng(0))
    save_mask(support / "a.png")
    (support / "b.jpg").symlink_to(tmp_path / "nowhere.jpg")
    heard = []
    pairs = find_support_pairs(tmp_path / "s", warn=lambda message, path: heard.append((message, path.name)))
    assert list(pairs) == ["cat"] and heard == [("skipping dangling or looping symbolic link", "b.jpg")]


def pair_names(folder):
    return [(i.name, m.name) for i, m in class_pairs(folder)]


def test_readme_layouts_pair_including_foo_mask_jpg(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("foo_mask.jpg", "a.jpg", "b.png", "c.webp"):
        save_image(tmp_path / name, rng)
    for name in ("foo_mask.png", "a.png", "b_mask.png", "c_mask.png"):
        save_mask(tmp_path / name)
    assert pair_names(tmp_path) == [
        ("a.jpg", "a.png"),
        ("b.png", "b_mask.png"),
        ("c.webp", "c_mask.png"),
        ("foo_mask.jpg", "foo_mask.png"),
    ]


def test_two_masks_for_one_image_is_an_error(tmp_path):
    save_image(tmp_path / "a.jpg", np.random.default_rng(0))
    save_mask(tmp_path / "a.png")
    save_mask(tmp_path / "a_mask.png")
    with pytest.raises(FssError, match=r"two masks for one image \(a_mask.png and a.png\)"):
        class_pairs(tmp_path)


def test_loose_pairs_beside_class_folders_are_not_dropped(tmp_path):
    rng = np.random.default_rng(0)
    save_image(tmp_path / "s" / "cat" / "a.jpg", rng)
    save_mask(tmp_path / "s" / "cat" / "a.png")
    save_image(tmp_path / "s" / "b.jpg", rng)
    save_mask(tmp_path / "s" / "b.png")
    with pytest.raises(FssError, match=r"class subfolders and loose images \(b.jpg\)"):
        find_support_pairs(tmp_path / "s")


def test_class_names_fit_the_label_format():
    with pytest.raises(FssError, match="collides with label 0"):
        check_class_names(["cat", "Background"], "s")
    check_class_names([f"c{i}" for i in range(MAX_CLASSES)], "s")
    with pytest.raises(FssError, match=f"256 classes, more than the {MAX_CLASSES}"):
        check_class_names([f"c{i}" for i in range(256)], "s")


def test_pil_images_with_an_orientation_tag_are_turned_as_displayed(tmp_path):
    from fss.io.images import as_rgb

    stored = (np.random.default_rng(5).random((30, 50, 3)) * 255).astype(np.uint8)
    save_rotated_jpeg(tmp_path / "p.jpg", stored)
    from_pil = as_rgb(Image.open(tmp_path / "p.jpg"))
    assert from_pil.size == (30, 50)
    assert np.array_equal(np.asarray(from_pil), np.asarray(read_image(tmp_path / "p.jpg")))
    assert as_rgb(from_pil).size == (30, 50)  # turned once, not twice


def test_coco_folder_masks_follow_the_photo_as_displayed(tmp_path):
    pytest.importorskip("pycocotools")
    from fss.train.coco import displayed_mask

    mask = np.zeros((30, 50), np.uint8)
    mask[2:10, 5:40] = 1  # on the stored pixels, as COCO annotates
    save_rotated_jpeg(tmp_path / "p.jpg", np.zeros((30, 50, 3), np.uint8), orientation=6)
    turned = displayed_mask(mask, tmp_path / "p.jpg")
    assert turned.shape == read_image(tmp_path / "p.jpg").size[::-1] == (50, 30)
    assert np.array_equal(turned, np.rot90(mask, k=-1))
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "plain.jpg")
    assert displayed_mask(mask, tmp_path / "plain.jpg") is mask
