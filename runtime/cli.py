"""``fss-run``: segment a folder of queries from a folder of annotated supports.

Resuming is keyed on content (:mod:`fss.runtime.cli_resume`): ``results.json`` records the run's
settings (sha256 of the model file, input size, method, backend, pixel limit, versions of the
libraries that decode, resize and run the model, sha256 of every support image and mask) and, per
query, the sha256 of the query file and of the outputs written for it. A query counts as done only
when all of these match; other settings, or none recorded, are refused, a replaced query or a damaged
output is recomputed. A file in ``--out`` that fss-run did not write (its hash recorded neither in
``results.json`` nor in the folder's journal, :func:`fss.io.outputs.folder_lock`) is never replaced
without ``--overwrite``.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from fss.cli_args import (
    add_batch_arg,
    add_edges_arg,
    add_min_score_arg,
    add_model_args,
    add_refine_arg,
    add_size_arg,
    check_input_size,
    demo_model_note,
    load_from_args,
    positive_int,
)
from fss.errors import FssError, ImageTooLargeError
from fss.runtime import cli_results
from fss.runtime.cli_inputs import check_out_against_inputs, load_supports
from fss.runtime.cli_resume import (
    OVERLAYS,
    RESULTS_FILE,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    check_no_foreign_outputs,
    file_sha256,
    kept_videos,
    library_versions,
    plan,
    read_previous,
    resumed_backend,
    reusable_entries,
)

PROG = "fss-run"
PIXEL_LIMIT_HINT = "--max-pixels or $FSS_MAX_PIXELS"
OUTPUT_BYTES_PER_QUERY = 64 * 1024  # a label PNG and results entry, beyond the overlay's share
BACKEND_HELP = (
    "what runs the encoder (default auto: on the CPU, ONNX Runtime from a verified graph cached per "
    "checkpoint; a new checkpoint's first run takes torch and exports the graph in the background, "
    "unless the job repays exporting first; a bundle's TensorRT engine where it fits the GPU)"
)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG, description="Segment every image of --query with the classes of --support."
    )
    p.add_argument("--support", required=True, type=Path, help="support folder: <class>/<stem>.jpg + mask")
    p.add_argument("--query", required=True, type=Path, help="folder of query images, or a video file")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("fss-out"),
        help="output folder (default ./fss-out); not inside, nor holding, an input folder",
    )
    add_model_args(p, backend_help=BACKEND_HELP)
    p.add_argument(
        "--int8",
        action="store_true",
        help="run the bundle's int8 encoder (opt-in, CPU; made by fss-export --int8 PHOTOS): faster on CPUs "
        "with VNNI, masks close to but not equal to float32 (docs/performance.md)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="encoder precision of a checkpoint: fp32 (default), or bf16 (opt-in; torch on CPUs with "
        "bfloat16 units, or CUDA; masks close to but not equal to fp32, docs/performance.md)",
    )
    add_size_arg(p)
    add_batch_arg(p)
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        help="largest image read, width x height (default $FSS_MAX_PIXELS or 64,000,000)",
    )
    add_refine_arg(p)
    p.add_argument(
        "--box-supports",
        choices=["mask", "grabcut"],
        default="mask",
        help="a support image with a box file (<stem>.box.json / .box.txt) in place of its mask: the boxes "
        'as the mask (default), or each box refined by OpenCV\'s GrabCut (pip install "fss[box]")',
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute queries already in --out, replacing any file at their output paths",
    )
    p.add_argument("--no-overlays", action="store_true", help="write only the label PNGs and results.json")
    p.add_argument("--every", type=positive_int, default=1, metavar="N", help="a video: every N-th frame")
    add_min_score_arg(p)
    add_edges_arg(p)
    cli_results.add_result_args(p, positive_int)
    args = p.parse_args(argv)
    check_input_size(p, args.size)
    if args.int8 and args.bundle is None:
        p.error(
            "--int8 runs a bundle's int8 encoder: make one with fss-export --int8 PHOTOS, give --bundle DIR"
        )
    if args.precision != "fp32" and (args.bundle is not None or args.backend == "onnxruntime"):
        p.error("--precision bf16 runs a checkpoint in torch: drop --bundle / --backend onnxruntime")
    if args.bundle is None and args.backend == "tensorrt":
        p.error("--backend tensorrt runs an exported bundle: give --bundle DIR (see fss-export --trt)")
    return args


def warn_line(message: str, path) -> None:
    print(" ".join(f"{PROG}: warning: {message} ({path})".split()), file=sys.stderr)


def model_identity(args, model, backend: str) -> dict:
    """What determines the masks besides the supports and the queries."""
    from fss.checkpoint import DEMO_MODEL

    if args.bundle is not None:
        sha = file_sha256(args.bundle / "manifest.json")  # it holds the sha256 of every bundle file
    else:
        sha = file_sha256(args.ckpt or DEMO_MODEL)
    from fss.models.base import method_of

    return {"model_sha256": sha, "backend": backend, "method": method_of(model).name}


def fractions(labels: np.ndarray, names: list[str]) -> dict:
    counts = np.bincount(labels.ravel(), minlength=len(names))
    return {name: round(float(c) / labels.size, 6) for name, c in zip(names, counts, strict=False)}


def full_size_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Labels of an image decoded at a reduced size, at its full ``size`` (w, h): nearest neighbour."""
    from PIL import Image

    if labels.shape == (size[1], size[0]):
        return labels
    return np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))


# -- the command ---------------------------------------------------------------------------------------
def run(args) -> int:
    from fss.io.boxes import box_files, import_cv2
    from fss.io.folders import check_class_names, find_support_pairs, list_images
    from fss.io.images import max_pixels, pixel_limit

    with pixel_limit(args.max_pixels):
        max_pixels()  # a malformed $FSS_MAX_PIXELS is refused before any work
        pairs = find_support_pairs(args.support, warn=warn_line, boxes=True)
        check_class_names(list(pairs), args.support)
        if args.box_supports == "grabcut" and box_files(pairs):
            import_cv2()  # missing OpenCV is refused before the model loads
        from fss.runtime.cli_video import run_video, skip_reason

        if args.query.is_file() or args.every != 1:
            return run_video(args, pairs)
        queries, skipped = list_images(args.query)
        for path, reason in skipped:
            warn_line(f"skipping {skip_reason(path, reason)}", path)
        if not queries:
            raise FssError("query folder has no images", args.query)
        stems = {}
        for path in queries:
            if path.stem in stems:
                raise FssError(
                    f"two queries would write {path.stem}.png ({stems[path.stem].name} and {path.name})",
                    args.query,
                )
            stems[path.stem] = path
        inputs = [f for class_pairs in pairs.values() for pair in class_pairs for f in pair]
        inputs += [p for p in (args.ckpt, args.bundle and args.bundle / "manifest.json") if p]
        folders = [args.query, args.support, *(p[0][0].parent for p in pairs.values())]
        check_out_against_inputs(args.out, args.support, folders, queries, inputs)
        return segment_folder(args, pairs, queries)


def load_runtime_model(args):
    """(model, device) of --ckpt / --bundle / the demo model."""
    return load_from_args(args, demo_model_note(PROG))


def encoder_backend(args) -> str:
    """The Segmenter's encoder path for --backend: a bundle's backend was chosen when it was loaded."""
    return "auto" if args.bundle is not None else args.backend


def write_outputs(out: Path, result, classes: list[str], overlays: bool, min_area: int | None = None) -> dict:
    """A query's mask (at its full size) and overlay; its results entry (without source, with its objects
    of ``min_area`` pixels or more where given)."""
    from fss.io.images import full_size
    from fss.io.outputs import write_label_png, write_overlay

    stem = result.query.stem
    width, height = full_size(result.image)
    labels = full_size_labels(result.labels, (width, height))
    entry = {"mask_sha256": write_label_png(out / f"{stem}.png", labels)}  # verified as written
    instances, records = cli_results.query_instances(result, labels, min_area, classes)
    if overlays:
        overlay = out / OVERLAYS / f"{stem}.jpg"
        objects = None if instances is None else cli_results.objects_mask(instances, result.image.size)
        entry["overlay_sha256"] = write_overlay(overlay, result.image, result.labels, classes, objects)
    entry |= {"size": [width, height], "fractions": fractions(labels, ["background", *classes])}
    entry |= cli_results.presence_fields(result)
    return entry if records is None else {**entry, "instances": records}


def check_out(out: Path, queries: list[Path], overlays: bool) -> None:
    """--out can take the outputs of ``queries`` (a writable folder with room for them)."""
    from fss.io.outputs import check_output_folder

    need = len(queries) * OUTPUT_BYTES_PER_QUERY + (sum(q.stat().st_size for q in queries) if overlays else 0)
    check_output_folder(out, "--out", need_bytes=need)
    if overlays and (out / OVERLAYS).exists() and not (out / OVERLAYS).is_dir():
        raise FssError(f"--out/{OVERLAYS} is a file, not a folder", out / OVERLAYS)


def start_segmenter(args, pairs, queries, previous):
    """(Segmenter with the supports set, the run's settings, shots per class) of the model flags."""
    from fss.io.images import max_pixels
    from fss.memory import check_encoder_memory
    from fss.models.base import resolve_refine
    from fss.runtime.segmenter import Segmenter

    model, device = load_runtime_model(args)
    size = int(args.size or model.meta["input_size"])
    check_encoder_memory(model, size, args.batch, device, size_name="--size", hint="--batch")
    classes, images, masks, support_sha = load_supports(pairs, args.box_supports)
    seg = Segmenter(
        model,
        device=device,
        size=size,
        batch=args.batch,
        refine=args.refine,
        precision=args.precision,
        backend=encoder_backend(args),
        min_score=args.min_score,
        edges=args.edges,
        expected_images=len(queries) + sum(len(shots) for shots in images),
        continuing=resumed_backend(previous, args.overwrite),
    )
    print(f"{PROG}: encoder: {seg.backend_reason}", file=sys.stderr)
    settings = {
        **model_identity(args, seg.model, seg.backend),
        "refine": resolve_refine(args.refine, model),
        "precision": args.precision,
        "input_size": size,
        "support_sha256": support_sha,
        "classes": classes,
        "max_pixels": max_pixels(),
        "libraries": library_versions(seg.backend),
        **cli_results.result_settings(args, seg),
    }
    seg.set_support(images, masks, classes)
    return seg, settings, [len(shots) for shots in images]


def results_document(args, settings: dict, shots: list[int], results: dict, videos=()) -> dict:
    """``results.json``: the run's classes, model and settings, an entry per query (a video's: per
    frame), and one per video (:mod:`fss.runtime.cli_video`), if any."""
    classes = settings["classes"]
    return {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "classes": {str(k): name for k, name in enumerate(["background", *classes])},
        "model": str(args.bundle or args.ckpt or "bundled demo model"),
        "input_size": settings["input_size"],
        "settings": settings,
        "support": {"folder": str(Path(args.support).resolve()), "classes": classes, "shots": shots},
        "queries": [results[stem] for stem in sorted(results)],
        **({"videos": list(videos)} if videos else {}),
    }


def worded(error: Exception) -> Exception:
    """A library error as fss-run words it: an image over the pixel limit names --max-pixels."""
    return error.hinted(PIXEL_LIMIT_HINT) if isinstance(error, ImageTooLargeError) else error


def segment_todo(seg, todo, hashes, results, save_results, args, classes) -> int:
    """Segment ``todo``, writing each query's outputs and results entry; the number that failed."""
    from tqdm import tqdm

    from fss.command import error_line

    failures = 0
    with tqdm(total=len(todo), desc=PROG, unit="img", disable=None, file=sys.stderr) as bar:
        for count, result in enumerate(seg.segment_stream(todo, return_prob=args.instances), start=1):
            path = result.query
            source = {"file": path.name, "path": str(path.resolve()), "sha256": hashes[path]}
            if result.error is None:
                area = args.min_area if args.instances else None
                written = write_outputs(args.out, result, classes, not args.no_overlays, area)
                results[path.stem] = {**source, **written, "time_s": round(result.seconds, 4)}
            else:
                failures += 1
                error = worded(result.error)
                results[path.stem] = {**source, "error": getattr(error, "message", None) or str(error)}
                print(error_line(PROG, str(error)), file=sys.stderr)
            bar.update(1)
            if count % args.batch == 0 or count == len(todo):
                save_results()
    return failures


def segment_folder(args, pairs, queries) -> int:
    from fss.io.outputs import folder_lock, remove_stale_temporaries, write_json

    out, overlays = args.out, not args.no_overlays
    check_out(out, queries, overlays)
    results_path = out / RESULTS_FILE
    with folder_lock(out):
        remove_stale_temporaries(out)  # those of out/overlays too: the journal records both
        previous = read_previous(results_path, args.overwrite)
        if not args.overwrite:
            check_no_foreign_outputs(out, queries, previous, overlays)
        cli_results.check_instances_file(out, args.overwrite or not args.instances)
        seg, settings, shots = start_segmenter(args, pairs, queries, previous)
        entries = reusable_entries(previous, settings, out, args.overwrite, results_path)
        hashes = {path: file_sha256(path) for path in queries}
        done, todo = plan(queries, hashes, entries, out, args.overwrite, overlays, results_path)
        this_run = {path.stem for path in queries}
        results = {stem: e for stem, e in entries.items() if stem not in this_run}  # other query folders
        results.update(done)
        videos = kept_videos(previous, settings)

        def save_results():
            write_json(results_path, results_document(args, settings, shots, results, videos))
            cli_results.write_instances(out, results, settings["classes"], args.instances)

        save_results()  # the folder is claimed, with its settings, before any mask is written
        failures = segment_todo(seg, todo, hashes, results, save_results, args, settings["classes"])
    print(
        f"{PROG}: {len(todo) - failures} segmented, {len(queries) - len(todo)} already done, "
        f"{failures} failed -> {out}",
        file=sys.stderr,
    )
    return 1 if failures else 0


def main(argv=None) -> int:
    from fss.command import run_command

    args = parse_args(argv)

    def body():
        try:
            return run(args)
        except ImageTooLargeError as err:
            raise worded(err) from None

    return run_command(PROG, body, "interrupted; finished queries are kept, re-run to resume")


if __name__ == "__main__":
    sys.exit(main())
