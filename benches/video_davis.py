"""``fss-run`` on video: J mean and frames per second on clips of held-out DAVIS sequences.

For each sequence of ``--data`` (the DAVIS folder of ../shared/data: every 6th frame of a DAVIS-2016
validation video, 854 x 480, with its mask), the JPEG frames are encoded into an MP4 with PyAV (H.264,
CRF 18, 4 frames/s: DAVIS's 24 divided by 6), frame 0 of the decoded clip and its DAVIS mask become the
support (one class), and ``fss-run --query <clip>.mp4`` runs in a subprocess with the bundled model.
J is the region IoU of each frame's mask against the DAVIS mask, averaged over the frames after the
support frame; frames per second is what fss-run logs (ONNX Runtime, the default path once the model's
graph is cached; the first sequence exports it) (frames segmented over the time of its pass
over the clip: decoding, segmentation, masks and overlay video; start-up excluded). The clips, support
folders and outputs go to a temporary folder (``--work`` to keep them): nothing is committed.

    nice -n 10 python benches/video_davis.py [--data DIR] [--sequences a,b] [--every N] [--throughput]

``--throughput`` also times one clip of every frame of ``--data`` (all sequences one after the other,
``--repeat`` times: 474 frames by default) with and without the overlay video; each run's peak resident
memory shows that a long clip costs no more memory than a short one.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Every 4th DAVIS video in name order, held out of the bundled model's training (docs/demo-model.md).
HELD_OUT = ["blackswan", "car-roundabout", "dog", "horsejump-high", "paragliding-launch"]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "davis"
FPS = 4  # DAVIS is 24 frames/s; the folder holds every 6th frame


def make_clip(frames: list[Path], clip: Path) -> None:
    import av

    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height = Image.open(frames[0]).size
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "18"}
        for path in frames:
            frame = av.VideoFrame.from_image(Image.open(path).convert("RGB"))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def first_frame(clip: Path) -> Image.Image:
    import av

    with av.open(str(clip)) as container:
        return next(container.decode(video=0)).to_image()


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


@dataclass
class Run:
    fps: float  # as fss-run logs it
    wall_s: float  # the whole command
    peak_mib: float  # its peak resident memory


def fss_run(name: str, frames: list[Path], work: Path, options: list[str]) -> tuple[Path, Path, Run]:
    """(clip, --out, figures) of fss-run on a clip of ``frames``, the support being the clip's first
    frame and the mask of ``frames[0]``."""
    clip = work / f"{name}.mp4"
    make_clip(frames, clip)
    support = work / "support" / name / name
    support.mkdir(parents=True)
    first_frame(clip).save(support / "frame0.png")
    Image.open(frames[0].with_suffix(".png")).save(support / "frame0_mask.png")
    out = work / f"out-{name}"
    command = ["fss-run", "--support", str(support.parent), "--query", str(clip), "--out", str(out)]
    start = time.perf_counter()
    with open(work / f"{name}.log", "w+") as log:
        process = subprocess.Popen(command + options, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        stderr = log.read()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"{name}: fss-run failed:\n{stderr}")
    fps = float(re.search(r"\(([\d.]+) frames/s\)", stderr).group(1))
    return clip, out, Run(fps, wall, usage.ru_maxrss / 1024)


def run_sequence(name: str, data: Path, work: Path, every: int, extra: list[str]) -> dict:
    frames = sorted((data / name).glob("*.jpg"))
    clip, out, run = fss_run(name, frames, work, ["--every", str(every), *extra])
    entries = [e for e in json.loads((out / "results.json").read_text())["queries"] if e["file"] == clip.name]
    scores = []
    for entry in entries:
        if entry["frame"] == 0:
            continue  # the support frame
        pred = np.asarray(Image.open(out / name / f"{entry['frame']:06d}.png")) == 1
        truth = np.asarray(Image.open(frames[entry["frame"]].with_suffix(".png")).convert("L")) > 0
        scores.append(iou(pred, truth))
    return {"sequence": name, "frames": len(entries), "J": float(np.mean(scores)), "run": run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--sequences", default=",".join(HELD_OUT))
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="keep clips and outputs here")
    parser.add_argument("--throughput", action="store_true", help="also time one clip of every frame")
    parser.add_argument("--repeat", type=int, default=2, help="the throughput clip: every frame, N times")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more fss-run options")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    every_frame = sorted(args.data.glob("*/*.jpg")) * args.repeat
    if "--backend" not in extra:  # what --backend auto runs once the graph is cached
        extra += ["--backend", "onnxruntime"]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("FSS_CACHE_DIR", str(work / "cache"))
        names = args.sequences.split(",")
        fss_run("warm-up", sorted((args.data / names[0]).glob("*.jpg"))[:2], work, extra)  # caches the graph
        rows = [run_sequence(name, args.data, work, args.every, extra) for name in names]
        for row in rows:
            run = row["run"]
            print(
                f"{row['sequence']:20s} frames {row['frames']:3d}  J {row['J']:.3f}  {run.fps:.2f} frames/s  "
                f"peak {run.peak_mib:.0f} MiB"
            )
        frames = sum(r["frames"] for r in rows)
        seconds = sum(r["frames"] / r["run"].fps for r in rows)
        j_mean = np.mean([r["J"] for r in rows])
        print(f"J mean over sequences {j_mean:.3f}; {frames / seconds:.2f} frames/s overall", flush=True)
        if args.throughput:
            print(f"throughput, one clip of {len(every_frame)} frames ({args.data}, {args.repeat} times):")
            for label, options in (("overlay-video", []), ("no-overlays", ["--no-overlays"])):
                run = fss_run(label, every_frame, work, [*extra, *options])[2]
                figures = f"{run.fps:.2f} frames/s (command {run.wall_s:.1f} s), peak {run.peak_mib:.0f} MiB"
                print(f"  {label:14s} {figures}", flush=True)


if __name__ == "__main__":
    main()
