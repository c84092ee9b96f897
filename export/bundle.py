"""The bundle format: layout, manifest, hashes, validation and atomic publication.

A bundle is a directory::

    manifest.json        what the files are, what they compute and how well (see ``build.build_manifest``)
    encoder.onnx         the encoder, float32, dynamic batch axis
    encoder.onnx.data    its weights (ONNX external data)
    encoder.engine       optional: a TensorRT engine (one GPU model, one TensorRT version)

Every file except the manifest is listed in ``manifest["files"]`` with its sha256; a bundle whose files
do not match, whose format version is unknown, or that was built for another input size is refused
with one line (``FssError``) before any work.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from fss.errors import FssError

BUNDLE_FORMAT = "fss-bundle"
BUNDLE_VERSION = 1
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "encoder.onnx"
ENGINE_FILE = "encoder.engine"
CONDITIONING_FILE = "conditioning.onnx"  # OSLSM: the support branch (manifest["conditioning"])


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(directory: Path) -> dict:
    """``{name: {"sha256", "bytes"}}`` for every file of ``directory`` but the manifest."""
    return {
        path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST_FILE
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


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


def check_replaceable(out: Path) -> None:
    """``out`` may be written: absent, an empty directory, or a bundle (replaced as a whole)."""
    if out.is_dir():
        if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
            raise FssError("output directory exists and is not an fss bundle; refusing to replace it", out)
    elif out.exists():
        raise FssError("output path exists and is not a directory", out)


@contextlib.contextmanager
def staged_bundle(out: Path):
    """Yield an empty directory beside ``out``; it becomes ``out`` when the block succeeds, else vanishes.

    A refused or failed export therefore leaves nothing behind, and a reader never sees half a bundle.
    """
    check_replaceable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as exc:
        raise FssError(f"cannot create the bundle: {exc.strerror}", out) from None
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        previous = staging.with_name(staging.name + ".previous")
        os.replace(out, previous)
        os.replace(staging, out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, out)  # rename(2) replaces an empty directory
