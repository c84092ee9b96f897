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
