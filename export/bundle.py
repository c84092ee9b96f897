"""Writing bundles (the format: :mod:`fss.backends.bundle_format`): file entries, the manifest, atomic
publication. A refused or failed export leaves nothing behind, and a reader never sees half a bundle.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from fss.backends.bundle_format import MANIFEST_FILE, sha256_file
from fss.errors import FssError


def file_entries(directory: Path) -> dict:
    """``{name: {"sha256", "bytes"}}`` for every file of ``directory`` but the manifest."""
    return {
        path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST_FILE
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def check_replaceable(out: Path, marker: str = MANIFEST_FILE, what: str = "an fss bundle") -> None:
    """``out`` may be written: absent, an empty directory, or ``what`` (holding ``marker``), which is
    replaced as a whole. Anything else is the user's, never replaced."""
    if out.exists() and not out.is_dir():
        raise FssError("output path exists and is not a directory", out)
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise FssError(f"output directory exists and is not {what}; refusing to replace it", out)


@contextlib.contextmanager
def staged_bundle(out: Path):
    """Yield an empty directory beside ``out``; it becomes the bundle ``out`` when the block succeeds."""
    check_replaceable(out)
    with staged_directory(out, "bundle") as staging:
        yield staging


@contextlib.contextmanager
def staged_directory(out: Path, what: str):
    """Yield an empty directory beside ``out``; it becomes ``out`` when the block succeeds, else vanishes.

    A refused or failed write therefore leaves nothing behind, and a reader never sees half of it.
    ``what`` names the directory in the error when it cannot be created.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as exc:
        raise FssError(f"cannot create the {what}: {exc.strerror}", out) from None
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private; what is written is meant to be shared
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
