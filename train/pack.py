"""A trained checkpoint as a model to ship: weights and metadata only, optionally float16 storage.

    python -m fss.train.pack runs/demo/final.pt fss/assets/demo-panet.pt --fp16

Drops the training state (``last.pt``'s optimizer), stores floating-point weights as float16 when asked
(half the bytes; ``load_model`` computes in float32), and checks the result: it loads, and its features
on a smooth synthetic batch agree with the source's to the stated relative tolerance.
"""

import argparse
import sys
from pathlib import Path

import torch

from fss.checkpoint import atomic_save, checkpoint_dict, load_model
from fss.command import run_command
from fss.errors import FssError

PROG = "python -m fss.train.pack"
FP16_FEATURE_TOLERANCE = 2e-2  # relative to the feature scale: float16 weights keep ~3 decimal digits


def pack(source: Path, target: Path, fp16: bool) -> float:
    """Write ``target`` from ``source``; returns the largest feature difference relative to the scale."""
    source, target = Path(source), Path(target)
    if target.resolve() == source.resolve():
        raise FssError("the packed model must not replace its source", target)
    model = load_model(source)
    ckpt = checkpoint_dict(model)
    if fp16:
        ckpt["state_dict"] = {
            k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()
        }
    atomic_save(ckpt, target)
    packed = load_model(target)
    from fss.export.verify import smooth_images

    size = int(model.meta["input_size"])
    images = smooth_images(2, size, torch.Generator().manual_seed(0), model.meta["normalisation"])
    with torch.inference_mode():
        reference, got = model.encode(images), packed.encode(images)
    error = ((got - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
    tolerance = FP16_FEATURE_TOLERANCE if fp16 else 0.0
    if error > tolerance:
        target.unlink()
        raise FssError(f"packed model differs from its source by {error:.2e} of the feature scale", target)
    return error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Pack a trained checkpoint as a model to ship.")
    p.add_argument("source", type=Path, help="fss checkpoint (final.pt, last.pt, step-N.pt)")
    p.add_argument("target", type=Path, help="packed checkpoint to write")
    p.add_argument("--fp16", action="store_true", help="store floating-point weights as float16")
    args = p.parse_args(argv)

    def work() -> int:
        error = pack(args.source, args.target, args.fp16)
        size = args.target.stat().st_size / 2**20
        print(f"{args.target}: {size:.1f} MB, features within {error:.1e} of the source's scale")
        return 0

    return run_command(PROG, work)


if __name__ == "__main__":
    sys.exit(main())
