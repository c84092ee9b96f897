"""``fss-run``: segment a folder of queries from a folder of annotated supports.

Resuming is keyed on content: ``results.json`` records the run's settings (sha256 of the model file,
input size, method, backend, pixel limit, versions of the libraries that decode, resize and run the
model, sha256 of every support image and mask) and, per query, the sha256 of the query file and of
the outputs written for it. A query counts as done only when all of these match; other settings, or
none recorded, are refused, a replaced query or a damaged output is recomputed. A file in ``--out``
that fss-run did not write (its hash recorded neither in ``results.json`` nor in the folder's
journal, :func:`fss.io.folder_lock`) is never replaced without ``--overwrite``.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from fss.constants import MAX_INPUT_SIZE, MIN_INPUT_SIZE, REFINEMENTS
from fss.errors import FssError
from fss.io import LOCK_FILE

PROG = "fss-run"
DEMO_NOTICE = f"{PROG}: no --ckpt given: using the bundled demo model (see README, 'Demo model')"
RESULTS_FORMAT = "fss-run-results"
RESULTS_VERSION = 2
RESULTS_FILE = "results.json"
OVERLAYS = "overlays"
OUTPUT_BYTES_PER_QUERY = 64 * 1024  # a label PNG and results entry, beyond the overlay's share


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG, description="Segment every image of --query with the classes of --support."
    )
    p.add_argument("--support", required=True, type=Path, help="support folder: <class>/<stem>.jpg + mask")
    p.add_argument("--query", required=True, type=Path, help="folder of query images")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("fss-out"),
        help="output folder (default ./fss-out); not inside, nor holding, an input folder",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--ckpt", type=Path, help="official PANet snapshot or fss checkpoint (default: demo model)"
    )
    source.add_argument("--bundle", type=Path, help="bundle directory written by fss-export")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnxruntime", "tensorrt"],
        help="what runs the encoder (default auto: on the CPU, ONNX Runtime from a verified graph cached per "
        "checkpoint; a new checkpoint's first run takes torch and exports the graph in the background, "
        "unless the job repays exporting first; a bundle's TensorRT engine where it fits the GPU)",
    )
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
    p.add_argument("--size", type=int, help="encoder input size (default: the checkpoint's, 417 for PANet)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=4, help="queries encoded together")
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        help="largest image read, width x height (default $FSS_MAX_PIXELS or 64,000,000)",
    )
    p.add_argument(
        "--refine",
        choices=REFINEMENTS,
        default=None,
        help="test-time refinement of the prototypes on each query (default: the checkpoint's method's: "
        "none for PANet, fusion for PRNet, tune for SST)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute queries already in --out, replacing any file at their output paths",
    )
    p.add_argument("--no-overlays", action="store_true", help="write only the label PNGs and results.json")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be at least 1")
    if args.size is not None and not MIN_INPUT_SIZE <= args.size <= MAX_INPUT_SIZE:
        p.error(f"--size must be from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}")
    if args.int8 and args.bundle is None:
        p.error(
            "--int8 runs a bundle's int8 encoder: make one with fss-export --int8 PHOTOS, give --bundle DIR"
        )
    if args.precision != "fp32" and (args.bundle is not None or args.backend == "onnxruntime"):
        p.error("--precision bf16 runs a checkpoint in torch: drop --bundle / --backend onnxruntime")
    if args.bundle is None and args.backend == "tensorrt":
        p.error("--backend tensorrt runs an exported bundle: give --bundle DIR (see fss-export --trt)")
    return args


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def warn_line(message: str, path) -> None:
    print(" ".join(f"{PROG}: warning: {message} ({path})".split()), file=sys.stderr)


# -- inputs --------------------------------------------------------------------------------------------
def check_out_against_inputs(
    out: Path, support: Path, folders: list[Path], queries: list[Path], other_inputs: list[Path]
) -> None:
    """Outputs never overwrite or mix with inputs (symbolic links resolved).

    Refused: ``out`` or ``out/overlays`` being an input folder (the query folder, the support folder
    or a class folder), an input folder inside ``out/overlays``, ``out`` directly in the support
    folder (a later run would read it as a class), and any output path that is an input file.
    Allowed: ``out`` deeper inside an input folder (e.g. ``--query . --out fss-out``): folders are
    read one level deep, so a subfolder of the query folder is never read as a query.
    """
    out_dirs = [out.resolve(), out.resolve() / OVERLAYS]
    for folder in folders:
        resolved = folder.resolve()
        if resolved in out_dirs or out_dirs[1] in resolved.parents:
            raise FssError(
                f"--out would write into the input folder {folder}: outputs would overwrite or mix with "
                "inputs; choose another --out",
                out,
            )
    if out_dirs[0].parent == support.resolve():
        raise FssError(
            f"--out lies in the support folder {support}: a later run would read it as a class; choose "
            "another --out",
            out,
        )
    outputs = {out_dirs[0] / RESULTS_FILE, out_dirs[0] / LOCK_FILE}
    resolved_files = {f.resolve(): f for f in queries + other_inputs}
    for path in queries:
        outputs |= {out_dirs[0] / f"{path.stem}.png", out_dirs[1] / f"{path.stem}.jpg"}
    clash = sorted(set(resolved_files) & outputs)
    if clash:
        raise FssError(f"an output would overwrite the input {resolved_files[clash[0]]}", out)


def load_supports(pairs):
    """Class names, their (image, parsed mask) shots and the content hash of the support set."""
    from fss.io import read_image, read_mask

    classes, images, masks, hashes = [], [], [], []
    for name, class_pairs in pairs.items():
        class_images, class_masks, class_hashes = [], [], []
        for image_path, mask_path in class_pairs:
            image, mask = read_image(image_path, draft=False), read_mask(mask_path)
            if mask.shape != (image.height, image.width):
                hint = ""
                if mask.shape == (image.width, image.height):
                    hint = "; masks refer to the image as displayed (EXIF orientation applied)"
                raise FssError(
                    f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                    f"{image.width}x{image.height}{hint}",
                    mask_path,
                )
            if not (mask == 1).any():
                raise FssError("mask has no foreground pixel", mask_path)
            class_images.append(image)
            class_masks.append(mask)
            class_hashes.append([file_sha256(image_path), file_sha256(mask_path)])
        classes.append(name)
        images.append(class_images)
        masks.append(class_masks)
        hashes.append([name, sorted(class_hashes)])  # prototypes are means: the shot order is irrelevant
    support_sha = hashlib.sha256(json.dumps(hashes).encode()).hexdigest()
    return classes, images, masks, support_sha


def model_identity(args, model, backend: str) -> dict:
    """What determines the masks besides the supports and the queries."""
    from fss.checkpoint import DEMO_MODEL

    if args.bundle is not None:
        sha = file_sha256(args.bundle / "manifest.json")  # it holds the sha256 of every bundle file
    else:
        sha = file_sha256(args.ckpt or DEMO_MODEL)
    from fss.models.base import method_of

    return {"model_sha256": sha, "backend": backend, "method": method_of(model).name}


def library_versions(backend: str) -> dict[str, str]:
    """Versions of the libraries that decode, resize and run the model: another may give other pixels."""
    import PIL
    import torch

    versions = {"pillow": PIL.__version__, "numpy": np.__version__, "torch": torch.__version__}
    if "onnxruntime" in backend:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    if "tensorrt" in backend:
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    return versions


# -- previous results ----------------------------------------------------------------------------------
SETTING_NAMES = {
    "model_sha256": "another model",
    "backend": "another --backend",
    "method": "another method",
    "refine": "another --refine",
    "precision": "another --precision",
    "input_size": "another --size",
    "support_sha256": "another support set (images or masks differ)",
    "classes": "other classes",
    "max_pixels": "another pixel limit (--max-pixels or $FSS_MAX_PIXELS)",
    "libraries": "other versions of the libraries that decode, resize or run the model",
}


def read_previous(results_path: Path, overwrite: bool) -> dict | None:
    """The previous ``results.json`` of this folder, None when there is none; a file fss-run did not
    write, cannot read, or that records no settings (nothing in it can be verified) is refused unless
    ``overwrite``, which replaces it."""
    if not results_path.exists():
        return None
    try:
        previous = json.loads(results_path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        if overwrite:
            return None
        raise FssError(
            f"--out holds an unreadable {RESULTS_FILE} ({type(exc).__name__}): move it away or pass "
            "--overwrite",
            results_path,
        ) from None
    ours = isinstance(previous, dict) and previous.get("format") == RESULTS_FORMAT
    if ours and isinstance(previous.get("settings"), dict):
        return previous
    if overwrite:
        return None
    if ours or (isinstance(previous, dict) and "support" in previous and "queries" in previous):
        raise FssError(
            f"--out holds a {RESULTS_FILE} that records no settings (an older fss-run's, or edited): "
            "nothing in it can be verified; pass --overwrite to replace it, or choose another --out",
            results_path,
        )
    raise FssError(
        f"--out holds a {RESULTS_FILE} that fss-run did not write: move it away or choose another --out",
        results_path,
    )


def settings_difference(previous: dict, settings: dict) -> str | None:
    """What differs between a previous run's settings and these (None: nothing)."""
    old = previous["settings"]
    for key, what in SETTING_NAMES.items():
        if key not in old:
            return f"settings an older fss-run did not record ({key})"
        if old[key] != settings[key]:
            if key == "libraries" and isinstance(old[key], dict):
                what += ": " + version_changes(old[key], settings[key])
            return what
    return None


def version_changes(old: dict, new: dict) -> str:
    changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    return ", ".join(f"{name} {old.get(name, 'none')} -> {new.get(name, 'none')}" for name in changed)


def reusable_entries(previous, settings: dict, out: Path, overwrite: bool, results_path: Path) -> dict:
    """Previous entries made with these settings; other settings are refused, or with ``overwrite``
    their outputs removed."""
    entries = valid_entries(previous)
    differs = settings_difference(previous, settings) if previous is not None else None
    if differs is None:
        return entries
    if not overwrite:
        raise FssError(
            f"output folder holds results made with {differs}: pass --overwrite to replace them, or choose "
            "another --out",
            results_path,
        )
    remove_outputs(out, entries)
    return {}


def valid_entries(previous: dict | None) -> dict[str, dict]:
    """Output stem -> entry of a previous results file (malformed entries are dropped)."""
    entries = {}
    for entry in (previous or {}).get("queries", []) if isinstance(previous, dict) else []:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and isinstance(entry.get("path"), str)
        ):
            entries[Path(entry["file"]).stem] = entry
    return entries


def output_paths(stem: str, overlays: bool) -> list[tuple[str, str]]:
    """(path relative to --out, key of its sha256 in a results entry) of a query's outputs."""
    paths = [(f"{stem}.png", "mask_sha256")]
    return paths + [(f"{OVERLAYS}/{stem}.jpg", "overlay_sha256")] if overlays else paths


def check_no_foreign_outputs(out: Path, queries: list[Path], previous: dict | None, overlays: bool) -> None:
    """Refuse an output path of these queries that holds a file fss-run did not write: one whose
    sha256 neither ``results.json`` nor the folder's journal records there (a user's file, or an
    output edited or damaged since: either may be someone's work)."""
    from fss.io import journal_outputs

    entries, written = valid_entries(previous), journal_outputs(out)
    for path in queries:
        entry = entries.get(path.stem, {})
        for name, key in output_paths(path.stem, overlays):
            target = out / name
            if not (target.exists() or target.is_symlink()):
                continue
            recorded = {sha for sha in (entry.get(key), written.get(name)) if isinstance(sha, str)}
            if target.is_file() and not target.is_symlink() and file_sha256(target) in recorded:
                continue
            if recorded:
                what = "which differs from the file fss-run wrote there (edited or damaged)"
            else:
                what = "which fss-run did not write"
            raise FssError(
                f"--out holds {name}, {what}: move it away (it is then recomputed), choose another --out, "
                "or pass --overwrite",
                target,
            )


def outputs_intact(out: Path, entry: dict, overlays: bool) -> bool:
    """The outputs an entry records exist and hash as recorded."""
    if entry.get("error") or not isinstance(entry.get("mask_sha256"), str):
        return False
    for name, key in output_paths(Path(entry["file"]).stem, overlays):
        if not (out / name).is_file() or file_sha256(out / name) != entry.get(key):
            return False
    return True


def remove_outputs(out: Path, entries: dict[str, dict]) -> None:
    """Delete the outputs previous entries recorded (only files that still hash as recorded)."""
    for stem, entry in entries.items():
        for name, key in output_paths(stem, overlays=True):
            path = out / name
            if path.is_file() and isinstance(entry.get(key), str) and file_sha256(path) == entry[key]:
                path.unlink()


def plan(queries, hashes, entries, out, overwrite, overlays, results_path):
    """(done entries by stem, queries to compute); refuses a stem another query folder wrote."""
    done, todo = {}, []
    for path in queries:
        entry = entries.get(path.stem)
        same_source = entry is not None and entry.get("path") == str(path.resolve())
        same_content = entry is not None and entry.get("sha256") == hashes[path]
        if (
            entry is not None
            and not (same_source or same_content)
            and not entry.get("error")
            and not overwrite
        ):
            raise FssError(
                f"{path.stem}.png in --out was written for another query ({entry['path']}): "
                f"{path} would overwrite it; choose another --out, or pass --overwrite",
                results_path,
            )
        if not overwrite and same_content and outputs_intact(out, entry, overlays):
            done[path.stem] = {**entry, "file": path.name, "path": str(path.resolve())}
        else:
            todo.append(path)
    return done, todo


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
    from fss.io import check_class_names, find_support_pairs, list_images, max_pixels, pixel_limit

    with pixel_limit(args.max_pixels):
        max_pixels()  # a malformed $FSS_MAX_PIXELS is refused before any work
        pairs = find_support_pairs(args.support, warn=warn_line)
        check_class_names(list(pairs), args.support)
        queries, skipped = list_images(args.query)
        for path, reason in skipped:
            warn_line(f"skipping {reason}", path)
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
    from fss.checkpoint import load_model
    from fss.runtime.segmenter import resolve_device

    device = resolve_device(args.device)
    if args.bundle is not None:
        from fss.export.backends import load_bundle

        wanted = None if args.device == "auto" else device
        model = load_bundle(args.bundle, args.backend, wanted, args.size, int8=args.int8)
        return model, model.device  # the head runs where the bundle's encoder delivers its features
    if args.ckpt is None:
        print(DEMO_NOTICE, file=sys.stderr)
    return load_model(args.ckpt, device=device), device


def encoder_backend(args) -> str:
    """The Segmenter's encoder path for --backend: a bundle's backend was chosen when it was loaded."""
    return "auto" if args.bundle is not None else args.backend


def resumed_backend(previous: dict | None, overwrite: bool) -> str | None:
    """The encoder path of the results this run resumes: ``auto`` keeps it, so that one path makes
    every mask of the folder (the first run of a new checkpoint may have taken torch)."""
    settings = previous.get("settings") if previous is not None and not overwrite else None
    return settings.get("backend") if isinstance(settings, dict) else None


def write_outputs(out: Path, result, classes: list[str], overlays: bool) -> dict:
    """A segmented query's mask (at its full size) and overlay; its results entry (without source)."""
    from fss.io import full_size, write_label_png, write_overlay

    stem = result.query.stem
    width, height = full_size(result.image)
    labels = full_size_labels(result.labels, (width, height))
    entry = {"mask_sha256": write_label_png(out / f"{stem}.png", labels)}  # verified as written
    if overlays:
        overlay = out / OVERLAYS / f"{stem}.jpg"
        entry["overlay_sha256"] = write_overlay(overlay, result.image, result.labels, classes)
    return {**entry, "size": [width, height], "fractions": fractions(labels, ["background", *classes])}


def segment_folder(args, pairs, queries) -> int:
    from tqdm import tqdm

    from fss.command import error_line
    from fss.io import check_output_folder, folder_lock, max_pixels, remove_stale_temporaries, write_json
    from fss.memory import check_encoder_memory
    from fss.models.base import resolve_refine
    from fss.runtime.segmenter import Segmenter

    out, overlays = args.out, not args.no_overlays
    need = len(queries) * OUTPUT_BYTES_PER_QUERY + (sum(q.stat().st_size for q in queries) if overlays else 0)
    check_output_folder(out, need_bytes=need)
    if overlays and (out / OVERLAYS).exists() and not (out / OVERLAYS).is_dir():
        raise FssError(f"--out/{OVERLAYS} is a file, not a folder", out / OVERLAYS)
    results_path = out / RESULTS_FILE
    with folder_lock(out):
        remove_stale_temporaries(out)  # those of out/overlays too: the journal records both
        previous = read_previous(results_path, args.overwrite)
        if not args.overwrite:
            check_no_foreign_outputs(out, queries, previous, overlays)
        model, device = load_runtime_model(args)
        size = int(args.size or model.meta["input_size"])
        check_encoder_memory(model, size, args.batch, device)
        classes, images, masks, support_sha = load_supports(pairs)
        seg = Segmenter(
            model,
            device=device,
            size=size,
            batch=args.batch,
            refine=args.refine,
            precision=args.precision,
            backend=encoder_backend(args),
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
        }
        entries = reusable_entries(previous, settings, out, args.overwrite, results_path)
        hashes = {path: file_sha256(path) for path in queries}
        done, todo = plan(queries, hashes, entries, out, args.overwrite, overlays, results_path)
        this_run = {path.stem for path in queries}
        results = {stem: e for stem, e in entries.items() if stem not in this_run}  # other query folders
        results.update(done)
        seg.set_support(images, masks, classes)

        def save_results():
            write_json(
                results_path,
                {
                    "format": RESULTS_FORMAT,
                    "version": RESULTS_VERSION,
                    "classes": {str(k): name for k, name in enumerate(["background", *classes])},
                    "model": str(args.bundle or args.ckpt or "bundled demo model"),
                    "input_size": size,
                    "settings": settings,
                    "support": {
                        "folder": str(Path(args.support).resolve()),
                        "classes": classes,
                        "shots": [len(s) for s in images],
                    },
                    "queries": [results[stem] for stem in sorted(results)],
                },
            )

        save_results()  # the folder is claimed, with its settings, before any mask is written
        failures = 0
        with tqdm(total=len(todo), desc=PROG, unit="img", disable=None, file=sys.stderr) as bar:
            for count, result in enumerate(seg.segment_stream(todo), start=1):
                path = result.query
                source = {"file": path.name, "path": str(path.resolve()), "sha256": hashes[path]}
                if result.error is None:
                    written = write_outputs(out, result, classes, overlays)
                    results[path.stem] = {**source, **written, "time_s": round(result.seconds, 4)}
                else:
                    failures += 1
                    error = result.error
                    results[path.stem] = {**source, "error": getattr(error, "message", None) or str(error)}
                    print(error_line(PROG, str(error)), file=sys.stderr)
                bar.update(1)
                if count % args.batch == 0 or count == len(todo):
                    save_results()
    print(
        f"{PROG}: {len(todo) - failures} segmented, {len(queries) - len(todo)} already done, "
        f"{failures} failed -> {out}",
        file=sys.stderr,
    )
    return 1 if failures else 0


def main(argv=None) -> int:
    from fss.command import run_command

    args = parse_args(argv)
    return run_command(PROG, lambda: run(args), "interrupted; finished queries are kept, re-run to resume")


if __name__ == "__main__":
    sys.exit(main())
