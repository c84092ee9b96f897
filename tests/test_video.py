"""``fss-run --query clip.mp4``: masks per frame, the overlay video, resume, hostile files, lazy decoding."""

import json
import shutil
import sys

import numpy as np
import pytest
from helpers import make_support, random_model
from PIL import Image

import fss
from fss.runtime.cli import main

av = pytest.importorskip("av")

W, H = 64, 48


def square_frame(i: int, shift: int = 0) -> np.ndarray:
    """A white square moving right on a dark gradient (``shift`` moves the whole clip's content)."""
    frame = np.zeros((H, W, 3), np.uint8)
    frame[..., 0] = np.linspace(0, 90, W, dtype=np.uint8)[None]
    x = 4 + 5 * i + shift
    frame[12:30, x : x + 18] = 255
    return frame


def make_clip(path, n=8, fmt=None, options=None, shift=0, size=(W, H), pix_fmt="yuv420p"):
    """An ``n``-frame clip at 8 frames/s, written with PyAV."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = *size, pix_fmt
        for i in range(n):
            pixels = square_frame(i, shift)
            if size != (W, H):
                pixels = np.asarray(Image.fromarray(pixels).resize(size))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    fss.save_checkpoint(random_model(input_size=65), path)
    return path


@pytest.fixture
def support(tmp_path):
    return make_support(tmp_path / "s", classes=("square",), shots=(1,))


def run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def fss_run(capsys, support, query, out, ckpt, *extra):
    return run(capsys, "--support", support, "--query", query, "--out", out, "--ckpt", ckpt, *extra)


def test_video_masks_overlay_and_results(tmp_path, support, ckpt, capsys):
    clip = make_clip(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    code, err = fss_run(capsys, support, clip, out, ckpt, "--batch", 3)
    assert code == 0, err
    assert "clip.mp4: 8 frames segmented (" in err and "frames/s" in err
    results = json.loads((out / "results.json").read_text())
    frames = results["queries"]
    assert [e["frame"] for e in frames] == list(range(8))
    # Each frame's mask is the Segmenter's labels of that decoded frame.
    seg = fss.Segmenter(fss.load_model(ckpt), backend="torch")
    seg.set_support(str(support))
    for entry, pixels in zip(frames, decoded_frames(clip), strict=True):
        mask = out / "clip" / f"{entry['frame']:06d}.png"
        labels = np.asarray(Image.open(mask))
        assert Image.open(mask).mode == "P" and entry["size"] == [W, H] and labels.shape == (H, W)
        assert (labels == seg.segment(pixels)).mean() > 0.999
        assert entry["file"] == "clip.mp4" and entry["sha256"] == fss.runtime.cli_resume.file_sha256(clip)
        assert entry["mask_sha256"] == fss.runtime.cli_resume.file_sha256(mask)
    (video,) = results["videos"]
    assert video["frames_decoded"] == 8 and video["frames_segmented"] == 8 and video["every"] == 1
    overlay = decoded_frames(out / "clip.overlay.mp4")
    assert len(overlay) == 8 and overlay[0].shape == (H, W, 3)
    assert video["overlay_sha256"] == fss.runtime.cli_resume.file_sha256(out / "clip.overlay.mp4")


def test_every_and_resume(tmp_path, support, ckpt, capsys):
    clip = make_clip(tmp_path / "clip.mkv", n=7)
    out = tmp_path / "out"
    code, err = fss_run(capsys, support, clip, out, ckpt, "--every", 3, "--no-overlays")
    assert code == 0, err
    assert sorted(p.name for p in (out / "clip").iterdir()) == ["000000.png", "000003.png", "000006.png"]
    assert not (out / "clip.overlay.mp4").exists()
    # Every frame: the three done are read back, the others segmented; the overlay has all seven.
    code, err = fss_run(capsys, support, clip, out, ckpt)
    assert code == 0 and "4 frames segmented" in err and "3 already done" in err
    assert len(decoded_frames(out / "clip.overlay.mp4")) == 7
    # A killed run resumes at the first frame it had not recorded.
    results = json.loads((out / "results.json").read_text())
    results["queries"] = results["queries"][:5]
    (out / "results.json").write_text(json.dumps(results))
    code, err = fss_run(capsys, support, clip, out, ckpt)
    assert code == 0 and "2 frames segmented" in err and "5 already done" in err


def test_interrupted_run_resumes_at_the_first_unrecorded_frame(tmp_path, support, ckpt, capsys, monkeypatch):
    from fss.runtime.cli_video import VideoJob

    clip, out = make_clip(tmp_path / "clip.mp4", n=8), tmp_path / "out"
    real_mask = VideoJob.write_mask

    def write_mask(job, key, labels):
        if key.endswith("000005"):
            raise KeyboardInterrupt
        return real_mask(job, key, labels)

    monkeypatch.setattr(VideoJob, "write_mask", write_mask)
    code, err = fss_run(capsys, support, clip, out, ckpt, "--batch", 2)
    assert code == 130 and "interrupted" in err
    assert not (out / "clip.overlay.mp4").exists() and not list(out.glob(".fss-partial*"))
    assert [e["frame"] for e in json.loads((out / "results.json").read_text())["queries"]] == [0, 1, 2, 3]
    monkeypatch.setattr(VideoJob, "write_mask", real_mask)
    code, err = fss_run(capsys, support, clip, out, ckpt, "--batch", 2)
    assert code == 0 and "4 frames segmented" in err and "4 already done" in err, err  # frame 4: unrecorded
    assert len(decoded_frames(out / "clip.overlay.mp4")) == 8


def test_changed_clip_is_recomputed_and_another_clip_refused(tmp_path, support, ckpt, capsys):
    clip, out = make_clip(tmp_path / "clip.mp4", n=4), tmp_path / "out"
    assert fss_run(capsys, support, clip, out, ckpt)[0] == 0
    before = (out / "clip" / "000001.png").read_bytes()
    make_clip(clip, n=3, shift=20)  # the same path, other content: nothing of it is reused
    code, err = fss_run(capsys, support, clip, out, ckpt)
    assert code == 0 and "3 frames segmented" in err and "0 already done" in err, err
    assert not (out / "clip" / "000003.png").exists()  # the old clip's fourth frame is gone
    assert (out / "clip" / "000001.png").read_bytes() != before
    assert len(json.loads((out / "results.json").read_text())["queries"]) == 3
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(make_clip(tmp_path / "x.mp4", n=3, shift=7), other / "clip.mp4")
    code, err = fss_run(capsys, support, other / "clip.mp4", out, ckpt)
    assert code == 2 and "holds the frames of another video" in err


def test_foreign_files_in_out_are_never_replaced(tmp_path, support, ckpt, capsys):
    clip, out = make_clip(tmp_path / "clip.mp4", n=3), tmp_path / "out"
    (out / "clip").mkdir(parents=True)
    (out / "clip" / "000001.png").write_bytes(b"mine")
    (out / "clip" / "notes.txt").write_text("mine too")
    code, err = fss_run(capsys, support, clip, out, ckpt)
    assert code == 2 and "000001.png, which fss-run did not write" in err
    (out / "clip" / "000001.png").unlink()
    (out / "clip.overlay.mp4").write_bytes(b"my video")
    code, err = fss_run(capsys, support, clip, out, ckpt)
    assert code == 2 and "clip.overlay.mp4, which fss-run did not write" in err
    assert (out / "clip.overlay.mp4").read_bytes() == b"my video"
    assert fss_run(capsys, support, clip, out, ckpt, "--no-overlays")[0] == 0
    assert (out / "clip" / "notes.txt").read_text() == "mine too"


def truncated(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "not a video"),
        (lambda p: p.write_bytes(b"this is a text file, not a video\n" * 40), "not a video"),
        (lambda p: truncated(make_clip(p), 0.5), "not a video"),  # an MP4's index is at its end
        (lambda p: Image.new("RGB", (W, H)).save(p, format="JPEG"), "no video stream"),
        (
            lambda p: truncated(make_clip(p.with_suffix(".mkv")), 0.6).rename(p),
            "no frame of the video decodes",
        ),
    ],
    ids=["empty", "text", "truncated", "jpeg-named-mp4", "zero-frames"],
)
def test_hostile_videos_exit_2_with_one_line(tmp_path, support, ckpt, capsys, make, message):
    clip = tmp_path / "clip.mp4"
    make(clip)
    code, err = fss_run(capsys, support, clip, tmp_path / "out", ckpt)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "clip.mp4" in lines[0], err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_unknown_container_and_folder_with_every(tmp_path, support, ckpt, capsys):
    odd = tmp_path / "clip.xyz"
    odd.write_bytes(bytes(range(256)) * 8)
    code, err = fss_run(capsys, support, odd, tmp_path / "out", ckpt)
    assert code == 2 and "not a video" in err and "clip.xyz" in err
    code, err = fss_run(capsys, support, tmp_path, tmp_path / "out", ckpt, "--every", 2)
    assert code == 2 and "--every N selects frames of a video" in err


def test_frames_over_the_pixel_limit_are_refused(tmp_path, support, ckpt, capsys):
    clip = make_clip(tmp_path / "clip.mp4", n=2)
    code, err = fss_run(capsys, support, clip, tmp_path / "out", ckpt, "--max-pixels", 3000)
    assert code == 2 and "64 x 48 = 3,072 pixels, more than the limit of 3,000 (--max-pixels" in err, err
    assert "clip.mp4" in err and not (tmp_path / "out").exists()


def test_partly_decodable_video_keeps_its_frames(tmp_path, support, ckpt, capsys):
    clip = make_clip(tmp_path / "clip.mp4", n=24, options={"movflags": "faststart"})  # index first
    truncated(clip, 0.9)
    out = tmp_path / "out"
    code, err = fss_run(capsys, support, clip, out, ckpt)
    assert code == 1 and "fss-run: error: decoding stopped after frame" in err and "clip.mp4" in err
    results = json.loads((out / "results.json").read_text())
    kept = len(results["queries"])
    assert 0 < kept < 24 and len(list((out / "clip").iterdir())) == kept
    assert "decoding stopped" in results["videos"][0]["error"]
    assert len(decoded_frames(out / "clip.overlay.mp4")) == kept


def test_frames_are_decoded_lazily(tmp_path, support, ckpt, capsys, monkeypatch):
    """Frames are decoded one at a time, at most two batches ahead of the masks written."""
    from fss.io.video import FrameReader
    from fss.runtime.cli_video import VideoJob

    clip, out = make_clip(tmp_path / "clip.mp4", n=8), tmp_path / "out"
    ahead, real_mask = [], VideoJob.write_mask

    def write_mask(job, key, labels):
        ahead.append(job.reader.decoded - int(key.rsplit("/", 1)[1]))
        return real_mask(job, key, labels)

    monkeypatch.setattr(VideoJob, "write_mask", write_mask)
    assert fss_run(capsys, support, clip, out, ckpt, "--batch", 1, "--no-overlays")[0] == 0
    assert len(ahead) == 8 and max(ahead) <= 2  # the frame itself and the next batch's
    reader = FrameReader(clip, every=2)
    frames = iter(reader)
    assert next(frames)[0] == 0 and reader.decoded == 1
    assert next(frames)[0] == 2 and reader.decoded == 3


def test_odd_sized_video(tmp_path, support, ckpt, capsys):
    """Masks keep the frame's odd size; the overlay video pads it by one line (H.264 needs even sides)."""
    clip, out = make_clip(tmp_path / "odd.mp4", n=2, size=(W + 1, H - 1), pix_fmt="yuv444p"), tmp_path / "out"
    code, err = fss_run(capsys, support, clip, out, ckpt)
    assert code == 0, err
    assert Image.open(out / "odd" / "000001.png").size == (W + 1, H - 1)
    assert decoded_frames(out / "odd.overlay.mp4")[0].shape == (H, W + 2, 3)


def test_frames_are_read_as_displayed(tmp_path):
    """A phone's portrait video stores landscape pixels and a display matrix turning them 90 degrees
    clockwise (PyAV's rotation -90, counter-clockwise): frames, and so masks, come out portrait."""
    from fss.io.video import FrameReader, probe_video

    clip = tmp_path / "portrait.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.set_display_rotation(-90)
        pixels = np.zeros((H, W, 3), np.uint8)
        pixels[:16, :16] = 255  # top-left as stored: top-right once turned clockwise
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")), *stream.encode()]:
            container.mux(packet)
    info = probe_video(clip)
    ((index, image),) = list(FrameReader(clip))
    assert (info.width, info.height) == image.size == (H, W)
    turned = np.asarray(image.convert("L"))
    assert turned[:16, -16:].mean() > 200 and turned[:16, :16].mean() < 50 and turned[-16:, -16:].mean() < 50


def test_without_pyav_the_error_names_the_extra(tmp_path, support, ckpt, capsys, monkeypatch):
    clip = make_clip(tmp_path / "clip.mp4", n=1)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    code, err = fss_run(capsys, support, clip, tmp_path / "out", ckpt)
    assert code == 2 and 'pip install "fss[video]"' in err and "clip.mp4" in err
