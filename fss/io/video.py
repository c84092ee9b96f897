"""Video files in and out, through PyAV (the ``av`` package, FFmpeg in its wheel; ``fss[video]``).

Frames are decoded one at a time (:class:`FrameReader` is a lazy iterable: a clip is never held in
memory), as a person sees them (a phone's rotation applied), under the pixel limit of images. A file
that is no video, holds no video stream or no frame that decodes is refused by :func:`probe_video`
before any work; a stream that stops decoding part way ends the frames with :attr:`FrameReader.error`
set, the frames before it kept. :class:`VideoWriter` encodes frames into an MP4 written to a file
object (H.264 where the wheel has it).
"""

import contextlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image

from fss.errors import FssError, ImageTooLargeError
from fss.io.folders import IMAGE_EXTS
from fss.io.images import max_pixels

VIDEO_EXTS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".mpg", ".mpeg", ".wmv")
INSTALL_HINT = 'reading and writing video needs PyAV: pip install "fss[video]"'
DEFAULT_FPS = Fraction(25)  # a stream that records no frame rate
ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


class VideoError(FssError):
    """A file that is no readable video: not found, an unknown container, no video stream, no frame."""


def import_av(path=None):
    try:
        import av
    except ImportError:
        raise FssError(INSTALL_HINT, path) from None
    av.logging.set_level(None)  # FFmpeg's own messages: errors reach the user as one line of ours
    return av


def is_video_name(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` read: the first frame's size as displayed, the stream's frame rate,
    its frame count (recorded, else estimated from the duration; 0: neither is recorded) and codec."""

    path: Path
    width: int
    height: int
    fps: Fraction
    frames: int
    codec: str

    def frame_estimate(self) -> int:
        return max(1, self.frames)


def open_video(av, path: Path):
    """The opened container and its first video stream (refusals as :class:`VideoError`)."""
    if path.is_dir():
        raise VideoError("video is a folder", path)
    if not path.exists():
        raise VideoError("video not found", path)
    if path.suffix.lower() in IMAGE_EXTS:
        raise VideoError("an image, not a video (images are read from a folder)", path)
    try:
        container = av.open(str(path))
    except av.FFmpegError:
        raise VideoError(
            "not a video, or a container FFmpeg does not know (corrupt or truncated?)", path
        ) from None
    fmt = container.format.name
    if not container.streams.video or fmt.endswith("_pipe") or fmt.startswith("image2"):
        container.close()
        raise VideoError(f"no video stream (an {fmt} file)", path)
    return container, container.streams.video[0]


def as_displayed(frame) -> Image.Image:
    """A decoded frame as 8-bit RGB, turned as its stream's display matrix shows it."""
    img = frame.to_image()
    turn = ROTATIONS.get(round(frame.rotation) % 360)
    return img.transpose(turn) if turn is not None else img


def probe_video(path) -> VideoInfo:
    """Open ``path`` and decode its first frame: a file that cannot give frames is refused here, before
    any work, as is a frame over the pixel limit (:func:`fss.io.images.max_pixels`)."""
    path = Path(path)
    av = import_av(path)
    container, stream = open_video(av, path)
    with container:
        check_frame_size(stream.codec_context.width, stream.codec_context.height, path)  # before decoding
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError:
            first = None
        if first is None:
            raise VideoError("no frame of the video decodes (zero frames, corrupt or truncated)", path)
        check_frame_size(first.width, first.height, path)
        width, height = as_displayed(first).size
        fps = Fraction(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
        frames = stream.frames or round(float(container.duration or 0) / 1e6 * fps)  # duration in us
        return VideoInfo(path, width, height, fps, int(frames), stream.codec_context.name)


def check_frame_size(width: int, height: int, path: Path) -> None:
    limit = max_pixels()
    if width * height > limit:
        pixels = f"{width} x {height} = {width * height:,} pixels"
        detail = f"video frames have {pixels}, more than the limit of {limit:,}"
        raise ImageTooLargeError(detail, path, (width, height), limit)


class FrameReader:
    """``(index, image)`` of every ``every``-th frame (index 0, every, 2 every...), decoded lazily, one
    frame at a time. Decoding that fails part way ends the frames and sets :attr:`error` (a
    :class:`VideoError` naming the last frame decoded): the frames before it are good."""

    def __init__(self, path, every: int = 1):
        self.path, self.every = Path(path), every
        self.error: VideoError | None = None
        self.decoded = 0  # frames decoded so far, selected or not

    def __iter__(self):
        av = import_av(self.path)
        container, stream = open_video(av, self.path)
        with container:
            frames = container.decode(stream)
            while True:
                try:
                    frame = next(frames, None)
                except av.FFmpegError as exc:
                    where = f"after frame {self.decoded - 1}" if self.decoded else "at the first frame"
                    reason = exc.strerror or type(exc).__name__
                    self.error = VideoError(f"decoding stopped {where}: {reason}", self.path)
                    return
                if frame is None:
                    return
                index, self.decoded = self.decoded, self.decoded + 1
                if index % self.every == 0:
                    yield index, as_displayed(frame)


class VideoWriter:
    """Frames (PIL images of one size) encoded as an MP4 into ``file`` (a writable, seekable binary file
    object) at ``fps``. H.264 (yuv420p) needs even sides: an odd side is padded by one black line."""

    def __init__(self, file, fps: Fraction, size: tuple[int, int]):
        av = import_av()
        self.container = av.open(file, "w", format="mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=fps)
        self.size = (size[0] + size[0] % 2, size[1] + size[1] % 2)
        self.stream.width, self.stream.height = self.size
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.stream.options = {"crf": "20", "preset": "veryfast"}
        self.av = av

    def write(self, img: Image.Image) -> None:
        if img.size != self.size:
            padded = Image.new("RGB", self.size)
            padded.paste(img)
            img = padded
        for packet in self.stream.encode(self.av.VideoFrame.from_image(img)):
            self.container.mux(packet)

    def abandon(self) -> None:
        """Close without finishing the file (a run that stopped): nothing more is encoded."""
        with contextlib.suppress(Exception):
            self.container.close()

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
