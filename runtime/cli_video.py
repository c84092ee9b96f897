"""``fss-run --query clip.mp4``: every frame of a video (or every ``--every``-th) segmented.

Outputs in ``--out``: ``<stem>/<frame index, 6 digits>.png`` per frame (the label PNG of a query),
``<stem>.overlay.mp4`` (the overlays of the frames segmented, at the clip's frame rate / ``--every``),
and in ``results.json`` one entry per frame (file, path and sha256 of the video, ``frame``, the mask's
sha256, size, fractions, time) plus one per video under ``videos`` (frames read, frame rate, the
overlay's sha256, the decoding error if any). Frames are decoded one at a time and streamed through
:meth:`Segmenter.segment_stream`: memory does not grow with the clip.

Resume follows the folder rules (:mod:`fss.runtime.cli_resume`): a frame is done when the video's
sha256, the settings and its mask's sha256 match; a changed clip (another sha256 at the same path) is
recomputed, its earlier masks removed; frames written by another video of the same name are refused.
The overlay video is written again on each run (done frames are read back from their masks), into a
temporary renamed into place at the end. A stream that stops decoding part way keeps the frames
before it, reports the error as a broken query is reported, and exits with status 1.
"""

import itertools
import math
import re
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from fss.errors import FssError
from fss.runtime.cli import (
    OUTPUT_BYTES_PER_QUERY,
    PROG,
    fractions,
    results_document,
    start_segmenter,
    worded,
)
from fss.runtime.cli_inputs import check_out_against_inputs
from fss.runtime.cli_resume import (
    RESULTS_FILE,
    check_ours,
    file_sha256,
    frame_key,
    kept_videos,
    outputs_intact,
    read_previous,
    remove_outputs,
    reusable_entries,
    valid_entries,
)

OVERLAY_VIDEO = "{stem}.overlay.mp4"
FRAME_FILE = re.compile(r"^\d{6,}\.png$")


def valid_videos(previous: dict | None, settings: dict | None = None) -> dict[str, dict]:
    """Video stem -> the ``videos`` entry of a previous results file (malformed entries dropped); given
    ``settings``, only those of a run of the same settings."""
    videos = previous.get("videos") if isinstance(previous, dict) else None
    if settings is not None:
        videos = kept_videos(previous, settings)
    videos = videos if isinstance(videos, list) else []
    return {Path(v["file"]).stem: v for v in videos if isinstance(v, dict) and isinstance(v.get("file"), str)}


def skip_reason(path: Path, reason: str) -> str:
    """Why a query folder's file is skipped: a video's frames are segmented when it is the --query."""
    from fss.io.video import is_video_name

    return "video (give it as --query to segment its frames)" if is_video_name(path) else reason


def run_video(args, pairs) -> int:
    """fss-run on the video ``args.query``: refusals first (the file, --out), then the frames."""
    from fss.io.video import probe_video

    if args.query.is_dir():
        raise FssError("--every N selects frames of a video, and --query is a folder", args.query)
    info = probe_video(args.query)
    inputs = [f for class_pairs in pairs.values() for pair in class_pairs for f in pair]
    inputs += [p for p in (args.ckpt, args.bundle and args.bundle / "manifest.json", args.query) if p]
    folders = [args.support, *(p[0][0].parent for p in pairs.values())]
    check_out_against_inputs(args.out, args.support, folders, [], inputs)
    stem = args.query.stem
    frames_dir = (args.out / stem).resolve()
    for path in inputs:
        resolved = path.resolve()
        if frames_dir in resolved.parents or resolved == args.out.resolve() / OVERLAY_VIDEO.format(stem=stem):
            raise FssError(f"an output would overwrite the input {path}", args.out)
    return segment_video(args, pairs, info)


def check_out_video(out: Path, stem: str, frames: int, info, overlays: bool) -> None:
    """--out can take ``frames`` masks of the video (and its overlay video)."""
    from fss.io.outputs import check_output_folder

    need = frames * OUTPUT_BYTES_PER_QUERY + (info.path.stat().st_size * 2 if overlays else 0)
    check_output_folder(out, "--out", need_bytes=need)
    folder = out / stem
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FssError(
            f"--out holds {stem}, which is not a folder: move it away or choose another --out", folder
        )


def check_video_outputs_ours(out: Path, stem: str, previous: dict | None, overlays: bool) -> None:
    """Refuse a frame mask or overlay video in --out that fss-run did not write (or that changed)."""
    from fss.io.outputs import journal_outputs

    entries, written = valid_entries(previous), journal_outputs(out)
    if (out / stem).is_dir():
        for path in sorted((out / stem).iterdir()):
            if FRAME_FILE.match(path.name):
                key, name = f"{stem}/{path.stem}", f"{stem}/{path.name}"
                check_ours(out, name, {entries.get(key, {}).get("mask_sha256"), written.get(name)})
    if overlays:
        name = OVERLAY_VIDEO.format(stem=stem)
        check_ours(out, name, {valid_videos(previous).get(stem, {}).get("overlay_sha256"), written.get(name)})


def reusable_frames(entries: dict, video: Path, sha: str, out: Path, overwrite: bool, results_path) -> dict:
    """``entries`` less the frames of this video's name that cannot be reused: those of an earlier
    content of the clip, or all with ``overwrite`` (their files removed); frames another video of the
    same name wrote are refused."""
    stem, path = video.stem, str(video.resolve())
    kept, stale = {}, {}
    for key, entry in entries.items():
        if not key.startswith(f"{stem}/"):
            kept[key] = entry
            continue
        same_content = entry.get("sha256") == sha
        if entry.get("path") != path and not same_content and not entry.get("error") and not overwrite:
            raise FssError(
                f"{stem}/ in --out holds the frames of another video ({entry.get('path')}): {video} would "
                "overwrite them; choose another --out, or pass --overwrite",
                results_path,
            )
        if same_content and not overwrite:
            kept[key] = {**entry, "file": video.name, "path": path}
        else:
            stale[key] = entry
    remove_outputs(out, stale)
    return kept


def segment_video(args, pairs, info) -> int:
    from fss.io.outputs import folder_lock, remove_stale_temporaries, write_json

    out, overlays, stem = args.out, not args.no_overlays, info.path.stem
    selected = math.ceil(info.frame_estimate() / args.every)
    check_out_video(out, stem, selected, info, overlays)
    results_path = out / RESULTS_FILE
    with folder_lock(out):
        remove_stale_temporaries(out)
        previous = read_previous(results_path, args.overwrite)
        if not args.overwrite:
            check_video_outputs_ours(out, stem, previous, overlays)
        seg, settings, shots = start_segmenter(args, pairs, range(selected), previous)
        entries = reusable_entries(previous, settings, out, args.overwrite, results_path)
        sha = file_sha256(info.path)
        results = reusable_frames(entries, info.path, sha, out, args.overwrite, results_path)
        videos = {s: v for s, v in valid_videos(previous, settings).items() if s != stem}

        def save_results():
            document = results_document(args, settings, shots, results, [videos[s] for s in sorted(videos)])
            write_json(results_path, document)

        save_results()  # the folder is claimed, with its settings, before any mask is written
        job = VideoJob(args, seg, settings["classes"], info, sha, results, save_results)
        job.run(overlays)
        videos[stem] = job.video_entry()
        save_results()
    rate = job.segmented / job.seconds if job.seconds > 0 else 0.0
    print(
        f"{PROG}: {info.path.name}: {job.segmented} frames segmented ({rate:.2f} frames/s), "
        f"{job.reused} already done, {job.reader.decoded} decoded -> {out}",
        file=sys.stderr,
    )
    if job.reader.error is not None:
        from fss.command import error_line

        print(error_line(PROG, str(job.reader.error)), file=sys.stderr)
    return 1 if job.reader.error is not None or job.failed else 0


class VideoJob:
    """One pass over a video's frames: done frames read back, the others segmented in a stream."""

    def __init__(self, args, seg, classes, info, sha, results, save_results):
        from fss.io.video import FrameReader

        self.args, self.seg, self.classes, self.info, self.sha = args, seg, classes, info, sha
        self.results, self.save_results = results, save_results
        self.reader = FrameReader(info.path, args.every)
        self.source = {"file": info.path.name, "path": str(info.path.resolve()), "sha256": sha}
        self.segmented = self.reused = self.failed = 0
        self.seconds = 0.0
        self.overlay_sha = None
        self.writer = None

    def run(self, overlays: bool) -> None:
        from tqdm import tqdm

        total = math.ceil(self.info.frames / self.args.every) if self.info.frames else None
        start = time.perf_counter()
        with tqdm(total=total, desc=PROG, unit="frame", disable=None, file=sys.stderr) as self.bar:
            if overlays:
                from fss.io.outputs import atomic_write_hashed

                name = OVERLAY_VIDEO.format(stem=self.info.path.stem)
                self.overlay_sha = atomic_write_hashed(self.args.out / name, self.frames_with_overlay)
            else:
                self.frames()
        self.seconds = time.perf_counter() - start
        self.save_results()

    def frames_with_overlay(self, file) -> None:
        from fss.io.video import VideoWriter

        self.writer = VideoWriter(file, self.info.fps / self.args.every, (self.info.width, self.info.height))
        try:
            self.frames()
        except BaseException:
            self.writer.abandon()  # the temporary is removed: the next run writes the video again
            raise
        self.writer.close()

    def frames(self) -> None:
        """Runs of consecutive frames, done or not: each run of frames to segment is one stream."""
        for done, run in itertools.groupby(self.reader, key=lambda frame: self.is_done(frame[0])):
            if done:
                for index, img in run:
                    self.reused += 1
                    self.overlay(img, lambda index=index: self.read_labels(index))
                    self.bar.update(1)
            else:
                self.segment_run(run)

    def segment_run(self, run) -> None:
        from fss.command import error_line

        pending = deque()  # indices of the frames in flight (at most two batches)

        def images():
            for index, img in run:
                pending.append(index)
                yield img

        for result in self.seg.segment_stream(images()):
            index = pending.popleft()
            key = frame_key(self.info.path.stem, index)
            entry = {**self.source, "frame": index}
            if result.error is None:
                entry.update(self.write_mask(key, result.labels))
                entry["time_s"] = round(result.seconds, 4)
                self.overlay(result.image, lambda labels=result.labels: labels)
            else:  # a frame that decoded but that the runtime refused
                entry["error"] = str(worded(result.error))
                self.failed += 1
                print(error_line(PROG, entry["error"]), file=sys.stderr)
            self.results[key] = entry
            self.segmented += 1
            self.bar.update(1)
            if self.segmented % self.args.batch == 0:
                self.save_results()

    def is_done(self, index: int) -> bool:
        entry = self.results.get(frame_key(self.info.path.stem, index))
        return (
            not self.args.overwrite
            and entry is not None
            and entry.get("sha256") == self.sha
            and outputs_intact(self.args.out, entry, overlays=False)
        )

    def write_mask(self, key: str, labels: np.ndarray) -> dict:
        from fss.io.outputs import write_label_png

        height, width = labels.shape
        return {
            "mask_sha256": write_label_png(self.args.out / f"{key}.png", labels),
            "size": [width, height],
            "fractions": fractions(labels, ["background", *self.classes]),
        }

    def read_labels(self, index: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.args.out / f"{frame_key(self.info.path.stem, index)}.png") as mask:
            return np.asarray(mask)

    def overlay(self, img, labels) -> None:
        """The frame's overlay into the overlay video (``labels`` is called only when one is written)."""
        if self.writer is not None:
            from fss.io.outputs import overlay_image

            self.writer.write(overlay_image(img, labels(), self.classes))

    def video_entry(self) -> dict:
        entry = {
            **self.source,
            "every": self.args.every,
            "fps": round(float(self.info.fps), 4),
            "frames_decoded": self.reader.decoded,
            "frames_segmented": self.segmented,
            "frames_reused": self.reused,
            "frames_per_second": round(self.segmented / self.seconds, 3) if self.seconds > 0 else None,
        }
        if self.overlay_sha is not None:
            entry.update(
                overlay=OVERLAY_VIDEO.format(stem=self.info.path.stem), overlay_sha256=self.overlay_sha
            )
        if self.reader.error is not None:
            entry["error"] = self.reader.error.message
        return entry
