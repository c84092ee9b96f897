"""The bundle format as its readers see it: layout, manifest, hashes and validation.

A bundle is a directory::

    manifest.json        what the files are, what they compute and how well (``fss.export.build``)
    encoder.onnx         the encoder, float32, dynamic batch axis
    encoder.onnx.data    its weights (ONNX external data)
    encoder.engine       optional: a TensorRT engine (one GPU model, one TensorRT version)

Every file except the manifest is listed in ``manifest["files"]`` with its sha256; a bundle whose files
do not match, whose format version is unknown, or that was built for another input size is refused
with one line (``FssError``) before any work. Writing bundles is :mod:`fss.export.bundle`'s job.
"""

import hashlib
import json
from pathlib import Path

from fss.errors import FssError

BUNDLE_FORMAT = "fss-bundle"
BUNDLE_VERSION = 1
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "encoder.onnx"
ENGINE_FILE = "encoder.engine"
CONDITIONING_FILE = "conditioning.onnx"  # OSLSM: the support branch (manifest["conditioning"])
DECISION_HEAD_FILE = "decision_head.pt"  # PANet / PRNet's learned decision head (manifest["decision_head"])


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(bundle_dir: Path) -> dict:
    """The manifest of ``bundle_dir``, its format and version checked."""
    if not bundle_dir.is_dir():
        raise FssError("bundle directory not found", bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise FssError(f"not an fss bundle: no {MANIFEST_FILE}", bundle_dir)
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FssError(f"unreadable bundle manifest: {str(exc).splitlines()[0]}", path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise FssError(f"not an fss bundle manifest (format is not {BUNDLE_FORMAT!r})", path)
    version = manifest.get("format_version")
    if version != BUNDLE_VERSION:
        raise FssError(
            f"unknown bundle format version {version!r}: this fss reads version {BUNDLE_VERSION}, "
            "re-export the bundle with this fss",
            path,
        )
    return manifest


def check_files(bundle_dir: Path, manifest: dict) -> None:
    """Every listed file present and matching its sha256."""
    for name, entry in manifest["files"].items():
        path = bundle_dir / name
        if Path(name).name != name:
            raise FssError(f"bundle manifest lists a file outside the bundle: {name!r}", bundle_dir)
        if not path.is_file():
            raise FssError("bundle file missing", path)
        if sha256_file(path) != entry["sha256"]:
            raise FssError(
                "bundle file does not match its sha256 in the manifest (modified or corrupt)", path
            )


def check_input_size(bundle_dir: Path, manifest: dict, input_size: int | None) -> None:
    built_for = manifest["meta"]["input_size"]
    if input_size is not None and int(input_size) != built_for:
        raise FssError(
            f"bundle was built for input size {built_for}, not {input_size}: "
            f"re-export it with fss-export --size {input_size}",
            bundle_dir,
        )


def validate_bundle(bundle_dir, input_size: int | None = None) -> dict:
    """The manifest of a bundle whose version, files and input size are all as expected.

    Raises ``FssError`` (one line naming the file) otherwise; nothing heavy is imported or run.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    check_files(bundle_dir, manifest)
    check_input_size(bundle_dir, manifest, input_size)
    return manifest
