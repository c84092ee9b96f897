"""``fss-export``: a checkpoint's encoder as a verified ONNX (and TensorRT) bundle.

Exit status: 0 bundle written; 1 the exported encoder is beyond tolerance (nothing written);
2 a user error (bad checkpoint, output path, arguments, missing TensorRT / CUDA), one line on stderr.
"""

import argparse
import sys
from pathlib import Path

from fss.cli_args import add_size_arg, check_input_size, positive_int

PROG = "fss-export"
# The flags that are export_bundle's keyword arguments of the same names.
BUNDLE_SETTINGS = ("trt", "fp16", "size", "max_batch", "opset", "verify_images")


def parse_args(argv):
    from fss.export.build import DEFAULT_MAX_BATCH
    from fss.export.onnx import DEFAULT_OPSET

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a checkpoint's encoder as a bundle that fss-run --bundle and fss.load_model(DIR) "
        "load, verified against eager PyTorch.",
    )
    p.add_argument(
        "--ckpt", required=True, type=Path, metavar="C", help="official PANet snapshot or fss checkpoint"
    )
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="bundle directory (default: <C stem>-bundle beside C)"
    )
    p.add_argument(
        "--onnx", action="store_true", help="ONNX encoder (always written: TensorRT builds from it)"
    )
    p.add_argument(
        "--trt", action="store_true", help="also a TensorRT engine (needs TensorRT and a CUDA GPU)"
    )
    p.add_argument("--fp16", action="store_true", help="float16 TensorRT engine (ONNX stays float32)")
    add_size_arg(p)
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help="largest TensorRT batch",
    )
    p.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, metavar="N", help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    p.add_argument(
        "--verify-images",
        type=Path,
        nargs="+",
        default=(),
        metavar="IMG",
        help="real images to verify on as well",
    )
    p.add_argument(
        "--int8",
        type=Path,
        metavar="PHOTOS",
        help="also an int8 encoder (opt-in; fss-run --int8), statically quantised with ONNX Runtime and "
        "calibrated on up to 64 photos of this folder (real photos like the ones you will segment)",
    )
    p.add_argument(
        "--triton-repo",
        type=Path,
        metavar="DIR",
        help="also write a Triton Inference Server model repository for the bundle (see docs/serving.md)",
    )
    args = p.parse_args(argv)
    check_input_size(p, args.size)
    return args


def print_report(out: Path, manifest: dict) -> None:
    print(f"{PROG}: wrote {out} ({', '.join(manifest['files'])})")
    for backend in ("onnxruntime", "onnxruntime_int8", "tensorrt"):
        report = manifest["verification"].get(backend)
        if report is None:
            continue
        print(f"  {backend} ({report['precision']}) vs {manifest['verification']['reference']}:")
        for name, errors in report["inputs"].items():
            print(
                f"    {name:<8} batch {errors['batch']}  max abs error {errors['max_abs_error']:.2e}  "
                f"relative {errors['relative_error']:.2e}  (tolerance {report['tolerance']:.0e})"
            )
    head = manifest["verification"].get("head", {}).get("onnxruntime")
    if head is not None:  # a learned head (SST)
        print(
            f"  head ({manifest['head']['file']}) vs eager PyTorch: relative error "
            f"{head['max_relative_error']:.2e} (tolerance {head['tolerance']:.0e})"
        )


def export_main(args) -> int:
    from fss.export.build import export_bundle
    from fss.export.quantize import calibration_photos

    if args.triton_repo is not None:
        from fss.export.triton_repo import check_repo_replaceable

        check_repo_replaceable(args.triton_repo)  # before the export, not after
    int8_photos = calibration_photos(args.int8) if args.int8 is not None else ()
    settings = {name: getattr(args, name) for name in BUNDLE_SETTINGS}

    def log(line: str) -> None:
        print(f"{PROG}: {line}", file=sys.stderr)

    out, manifest = export_bundle(args.ckpt, args.out, **settings, int8_photos=int8_photos, log=log)
    print_report(out, manifest)
    if args.triton_repo is not None:
        from fss.export.triton_repo import write_triton_repo

        repo = write_triton_repo(out, args.triton_repo, max_batch=args.max_batch)  # errors: run_command
        print(f"{PROG}: wrote the Triton model repository {repo}")
    return 0


def main(argv=None) -> int:
    from fss.command import run_command
    from fss.export.verify import VerificationError

    args = parse_args(argv)
    return run_command(PROG, lambda: export_main(args), exit_codes={VerificationError: 1})


if __name__ == "__main__":
    sys.exit(main())
