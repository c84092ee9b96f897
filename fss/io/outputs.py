"""Files out: atomic writes, output-folder locks and their journal, label PNGs, overlays, JSON."""

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fss.constants import voc_palette
from fss.errors import FssError

TEMP_PREFIX = ".fss-partial."  # atomic_write's temporaries: .fss-partial.<name>.<random>.tmp
TEMP_FILE = re.compile(r"^\.fss-partial\..+\.tmp$")
LOCK_FILE = ".fss.lock"  # also the folder's journal: JSON lines, see folder_lock
HASH_WRITTEN = object()  # _atomic_write's sha: hash the file once written

_journals: dict[Path, int] = {}  # locked folder (resolved) -> its journal's file descriptor


def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    _atomic_write(Path(path), write)


def atomic_write_bytes(path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically, verified (the file holds every byte); its sha256.

    Encoders such as Pillow's write to the file descriptor themselves and let a short write pass (a
    file-size limit truncates a JPEG without an error): encode into memory, then write through this.
    """
    sha = hashlib.sha256(data).hexdigest()

    def write(f):
        f.write(data)
        f.flush()
        if os.fstat(f.fileno()).st_size != len(data):
            raise OSError(errno.EIO, f"only part of the {len(data)} bytes were written", str(path))

    _atomic_write(Path(path), write, sha)
    return sha


def atomic_write_hashed(path, write) -> str:
    """:func:`atomic_write` for a writer that streams (a video encoder): the sha256 of the file as
    written, hashed from the temporary and recorded in the journal before it is renamed into place."""
    return _atomic_write(Path(path), write, HASH_WRITTEN)


def _atomic_write(path: Path, write, sha: str | None = None) -> str | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}.tmp"
    journal("temporary", tmp)  # recorded before it exists: a kill at any point leaves it known
    try:
        with open(tmp, "xb") as f:
            write(f)
        if sha is HASH_WRITTEN:
            sha = file_sha256(tmp)
        if sha is not None:
            journal("output", path, sha)  # fss wrote it, even if killed before recording it elsewhere
        os.replace(tmp, path)
        return sha
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # write errors (disk full...) name no file
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def journal(kind: str, path: Path, sha: str | None = None) -> None:
    """Record a ``temporary`` or an ``output`` (with its sha256) in the journal of the locked folder
    holding ``path``, if any."""
    if not _journals:
        return
    parent = path.parent.resolve()
    for folder in (parent, *parent.parents):
        fd = _journals.get(folder)
        if fd is not None:
            record = {kind: str((parent / path.name).relative_to(folder))}
            if sha is not None:
                record["sha256"] = sha
            try:
                os.write(fd, (json.dumps(record) + "\n").encode())
            except OSError as exc:  # a full disk or a file-size limit: say which file
                raise OSError(exc.errno, exc.strerror, str(folder / LOCK_FILE)) from None
            return


def read_journal(folder: Path) -> list[dict]:
    """The records of ``folder``'s journal (lines that are not fss's records are ignored)."""
    try:
        text = (folder / LOCK_FILE).read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        name = record.get("temporary", record.get("output")) if isinstance(record, dict) else None
        if isinstance(name, str) and not Path(name).is_absolute() and ".." not in Path(name).parts:
            records.append(record)
    return records


def journal_outputs(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of the last file fss wrote there, as ``folder``'s journal records."""
    records = read_journal(folder)
    return {r["output"]: r["sha256"] for r in records if "output" in r and isinstance(r.get("sha256"), str)}


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries a killed :func:`atomic_write` left under ``folder`` (hold its lock): only
    files its journal records and named as fss names them; a user's ``.notes.tmp`` stays. The journal
    then keeps one record per output that still exists."""
    fd = _journals.get(folder.resolve())
    if fd is None:
        raise RuntimeError(f"remove_stale_temporaries needs the lock of {folder}")
    removed = []
    for record in read_journal(folder):
        path = folder / record.get("temporary", "")
        if "temporary" in record and TEMP_FILE.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)
    outputs = {name: sha for name, sha in journal_outputs(folder).items() if (folder / name).is_file()}
    os.ftruncate(fd, 0)
    os.write(fd, "".join(json.dumps({"output": n, "sha256": s}) + "\n" for n, s in outputs.items()).encode())
    return removed


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold an exclusive lock on an output folder: a second writer is refused, not interleaved.

    The lock file is also the folder's journal: while the lock is held, :func:`atomic_write` records
    there every temporary it creates under the folder, and :func:`atomic_write_bytes` the sha256 of
    every file it puts in place, so that fss later removes only its own temporaries and knows which
    files it wrote even when killed before recording them elsewhere.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FssError("another fss command is writing into this folder", folder) from None
        _journals[folder.resolve()] = fd
        try:
            yield
        finally:
            del _journals[folder.resolve()]
    finally:
        os.close(fd)


def check_output_folder(folder: Path, what: str, need_bytes: int = 0) -> None:
    """Before any work: ``folder`` is (or can be made) a writable folder with ``need_bytes`` free;
    ``what`` names it in errors (a command names its flag)."""
    if folder.exists() and not folder.is_dir():
        raise FssError(f"{what} is a file, not a folder", folder)
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FssError(f"{what} is inside a file, not a folder", parent)
            break
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}write-probe.", suffix=".tmp")
    os.close(fd)
    Path(probe).unlink(missing_ok=True)  # another process may clean temporaries meanwhile
    check_free_space(folder, need_bytes, what)


def check_output_file(path: Path, what: str) -> None:
    """Before any work: ``path`` can be written as a file (not a folder; its folder writable)."""
    if path.is_dir():
        raise FssError(f"{what} is a folder, not a file", path)
    check_output_folder(path.parent, f"the folder of {what}")


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise FssError(
            f"not enough free space for {what}: {free / 2**20:.0f} MiB free, about "
            f"{need_bytes / 2**20:.0f} MiB needed",
            folder,
        )


def write_json(path, obj) -> str:
    return atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def encoded(img: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, **options)
    return buffer.getvalue()


def write_label_png(path, labels: np.ndarray) -> str:
    """Labels (uint8, 0 background, k class k) as a palette PNG with the VOC colours; its sha256."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    return atomic_write_bytes(path, encoded(img, format="PNG"))


def outline(labels: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """The pixels of ``objects`` (``H x W`` bool) with a 4-neighbour of another label or outside them:
    each object's edge."""
    inner = objects.copy()
    for region in (labels, objects):
        inner[1:] &= region[1:] == region[:-1]
        inner[:-1] &= region[:-1] == region[1:]
        inner[:, 1:] &= region[:, 1:] == region[:, :-1]
        inner[:, :-1] &= region[:, :-1] == region[:, 1:]
    return objects & ~inner


def overlay_image(
    img: Image.Image,
    labels: np.ndarray,
    class_names: list[str],
    alpha: float = 0.5,
    objects=None,
    legend_scale=None,
) -> Image.Image:
    """The image with each class coloured (VOC palette) and a legend of the classes present, drawn
    ``legend_scale`` times its size at 640 px (default: larger on photos over 640 px); where ``objects``
    (``H x W`` bool, the union of the objects' masks) is given, each object outlined."""
    palette = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)
    base = np.asarray(img.convert("RGB"), dtype=np.float32)
    fg = labels > 0
    blended = base.copy()
    blended[fg] = (1 - alpha) * base[fg] + alpha * palette[labels[fg]]
    if objects is not None:
        edge = outline(labels, objects)
        blended[edge] = palette[labels[edge]]
    out = Image.fromarray(blended.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    s = legend_scale or max(1.0, max(img.size) / 640)  # grows with photos over 640 px, to stay readable
    font = ImageFont.load_default() if s == 1 else ImageFont.load_default(size=round(10 * s))
    y = round(4 * s)
    for k, name in enumerate(class_names, start=1):
        if not (labels == k).any():
            continue
        colour = tuple(int(c) for c in palette[k])
        box = [round(4 * s), y, round(18 * s), y + round(12 * s)]
        draw.rectangle(box, fill=colour, outline=(255, 255, 255), width=round(s))
        draw.text(
            (round(23 * s), y),
            name,
            fill=(255, 255, 255),
            font=font,
            stroke_width=round(s),
            stroke_fill=(0, 0, 0),
        )
        y += round(16 * s)
    return out


def write_overlay(path, img: Image.Image, labels: np.ndarray, class_names: list[str], objects=None) -> str:
    """The overlay as a JPEG (objects outlined, see :func:`overlay_image`); its sha256."""
    out = overlay_image(img, labels, class_names, objects=objects)
    return atomic_write_bytes(path, encoded(out, format="JPEG", quality=90))
