"""``fss-run``: segment a folder of queries from a folder of annotated supports."""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fss.errors import FssError

PROG = "fss-run"
DEMO_NOTICE = f"{PROG}: no --ckpt given: using the bundled demo model (see README, 'Demo model')"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG, description="Segment every image of --query with the classes of --support."
    )
    p.add_argument("--support", required=True, type=Path, help="support folder: <class>/<stem>.jpg + mask")
    p.add_argument("--query", required=True, type=Path, help="folder of query images")
    p.add_argument("--out", type=Path, default=Path("fss-out"), help="output folder (default ./fss-out)")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--ckpt", type=Path, help="official PANet snapshot or fss checkpoint (default: demo model)"
    )
    source.add_argument("--bundle", type=Path, help="bundle directory written by fss-export")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnxruntime", "tensorrt"],
        help="what runs the encoder: torch for checkpoints; onnxruntime or tensorrt for --bundle",
    )
    p.add_argument("--size", type=int, help="encoder input size (default: the checkpoint's, 417 for PANet)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=4, help="queries encoded together")
    p.add_argument("--overwrite", action="store_true", help="recompute queries already in --out")
    p.add_argument("--no-overlays", action="store_true", help="write only the label PNGs and results.json")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be at least 1")
    if args.size is not None and args.size < 8:
        p.error("--size must be at least 8")
    if args.bundle is None and args.backend not in ("auto", "torch"):
        p.error(f"--backend {args.backend} runs an exported bundle: give --bundle DIR (see fss-export)")
    return args


def load_supports(root):
    """Class names and their (image, parsed mask) shots, every file checked; errors name the file."""
    from fss.io import find_support_pairs, read_image, read_mask

    classes, images, masks = [], [], []
    for name, pairs in find_support_pairs(root).items():
        class_images, class_masks = [], []
        for image_path, mask_path in pairs:
            image, mask = read_image(image_path), read_mask(mask_path)
            if mask.shape != (image.height, image.width):
                raise FssError(
                    f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                    f"{image.width}x{image.height}",
                    mask_path,
                )
            if not (mask == 1).any():
                raise FssError("mask has no foreground pixel", mask_path)
            class_images.append(image)
            class_masks.append(mask)
        classes.append(name)
        images.append(class_images)
        masks.append(class_masks)
    return classes, images, masks


def support_signature(root, classes, images) -> dict:
    return {"folder": str(Path(root).resolve()), "classes": classes, "shots": [len(s) for s in images]}


def load_previous(results_path, signature, overwrite) -> dict:
    """Per-query results of an earlier run into the same folder (to resume), or nothing."""
    if overwrite or not results_path.exists():
        return {}
    try:
        previous = json.loads(results_path.read_text())
    except (OSError, ValueError):
        return {}  # a results.json we cannot read is rebuilt from scratch
    if previous.get("support") != signature:
        raise FssError(
            "output folder holds results of another support set: use --overwrite or another --out",
            results_path,
        )
    return {q["file"]: q for q in previous.get("queries", []) if not q.get("error")}


def fractions(labels: np.ndarray, names: list[str]) -> dict:
    counts = np.bincount(labels.ravel(), minlength=len(names))
    return {name: round(float(c) / labels.size, 6) for name, c in zip(names, counts, strict=False)}


def run(args) -> int:
    from tqdm import tqdm

    from fss.checkpoint import load_model
    from fss.io import list_images, write_json, write_label_png, write_overlay
    from fss.runtime.segmenter import Segmenter, resolve_device

    device = resolve_device(args.device)
    if args.bundle is not None:
        from fss.export.backends import load_bundle

        wanted = None if args.device == "auto" else device
        model = load_bundle(args.bundle, backend=args.backend, device=wanted, input_size=args.size)
        device = model.device  # the head runs where the bundle's encoder delivers its features
    else:
        if args.ckpt is None:
            print(DEMO_NOTICE, file=sys.stderr)
        model = load_model(args.ckpt, device=device)
    classes, images, masks = load_supports(args.support)
    queries, skipped = list_images(args.query)
    for path in skipped:
        print(f"{PROG}: warning: skipping non-image file ({path})", file=sys.stderr)
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

    out = args.out
    results_path = out / "results.json"
    signature = support_signature(args.support, classes, images)
    done = load_previous(results_path, signature, args.overwrite)
    names = ["background", *classes]

    seg = Segmenter(model, device=device, size=args.size, batch=args.batch)
    seg.set_support(images, masks, classes)

    results: dict[str, dict] = {}
    todo = []
    for path in queries:
        if path.name in done and (out / f"{path.stem}.png").exists():
            results[path.name] = done[path.name]
        else:
            todo.append(path)

    def save_results():
        write_json(
            results_path,
            {
                "classes": {str(k): name for k, name in enumerate(names)},
                "model": str(args.bundle or args.ckpt or "bundled demo model"),
                "input_size": seg.size,
                "support": signature,
                "queries": [results[p.name] for p in queries if p.name in results],
            },
        )

    failures = 0
    with tqdm(total=len(todo), desc=PROG, unit="img", disable=None, file=sys.stderr) as bar:
        for count, result in enumerate(seg.segment_stream(todo), start=1):
            path = result.query
            if result.error is not None:
                failures += 1
                message = result.error.message if isinstance(result.error, FssError) else str(result.error)
                results[path.name] = {"file": path.name, "error": message}
                print(f"{PROG}: error: {result.error}", file=sys.stderr)
            else:
                write_label_png(out / f"{path.stem}.png", result.labels)
                if not args.no_overlays:
                    write_overlay(out / "overlays" / f"{path.stem}.jpg", result.image, result.labels, classes)
                results[path.name] = {
                    "file": path.name,
                    "size": [result.image.width, result.image.height],
                    "fractions": fractions(result.labels, names),
                    "time_s": round(result.seconds, 4),
                }
            bar.update(1)
            if count % args.batch == 0 or count == len(todo):
                save_results()
    if not todo:
        save_results()
    print(
        f"{PROG}: {len(todo) - failures} segmented, {len(queries) - len(todo)} already done, "
        f"{failures} failed -> {out}",
        file=sys.stderr,
    )
    return 1 if failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except FssError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished queries are kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
