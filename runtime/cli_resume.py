"""``fss-run``'s resume rules: what ``results.json`` records and when a query counts as done.

Resuming is keyed on content: the settings that determine the masks (model, encoder path, sizes,
supports, library versions) and, per query, the sha256 of the query file and of its outputs. A file in
``--out`` that fss-run did not write is never replaced without ``--overwrite``.
"""

import json
from pathlib import Path

import numpy as np

from fss.errors import FssError
from fss.io.outputs import file_sha256, journal_outputs

RESULTS_FORMAT = "fss-run-results"
RESULTS_VERSION = 2
RESULTS_FILE = "results.json"
OVERLAYS = "overlays"
FRAME_DIGITS = 6  # a video's masks: <out>/<stem>/000123.png


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
    "min_score": "another --min-score",
    "instances": "another --instances / --min-area",
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


def kept_videos(previous: dict | None, settings: dict) -> list:
    """The ``videos`` entries (:mod:`fss.runtime.cli_video`) of a previous run of these settings."""
    videos = previous.get("videos") if previous is not None else None
    same = isinstance(videos, list) and settings_difference(previous, settings) is None
    return [v for v in videos if isinstance(v, dict) and isinstance(v.get("file"), str)] if same else []


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
            entries[entry_key(entry)] = entry
    return entries


def frame_key(stem: str, index: int) -> str:
    """The name of a video frame's outputs: ``<video stem>/<frame index, zero-padded>``."""
    return f"{stem}/{index:0{FRAME_DIGITS}d}"


def entry_key(entry: dict) -> str:
    """The name of a results entry's outputs: a query's stem, or a video frame's :func:`frame_key`."""
    stem = Path(entry["file"]).stem
    frame = entry.get("frame")
    return frame_key(stem, frame) if isinstance(frame, int) and frame >= 0 else stem


def output_paths(key: str, overlays: bool) -> list[tuple[str, str]]:
    """(path relative to --out, key of its sha256 in a results entry) of a query's outputs (a video
    frame has its mask only: its overlay is a frame of the video's overlay)."""
    paths = [(f"{key}.png", "mask_sha256")]
    return paths + [(f"{OVERLAYS}/{key}.jpg", "overlay_sha256")] if overlays and "/" not in key else paths


def check_no_foreign_outputs(out: Path, queries: list[Path], previous: dict | None, overlays: bool) -> None:
    """Refuse an output path of these queries that holds a file fss-run did not write: one whose
    sha256 neither ``results.json`` nor the folder's journal records there (a user's file, or an
    output edited or damaged since: either may be someone's work)."""
    entries, written = valid_entries(previous), journal_outputs(out)
    for path in queries:
        entry = entries.get(path.stem, {})
        for name, key in output_paths(path.stem, overlays):
            check_ours(out, name, {entry.get(key), written.get(name)})


def check_ours(out: Path, name: str, recorded: set) -> None:
    """Refuse ``out / name`` unless it is absent or a file whose sha256 is among ``recorded`` (the
    hashes fss-run recorded for it; None entries are ignored)."""
    target = out / name
    if not (target.exists() or target.is_symlink()):
        return
    recorded = {sha for sha in recorded if isinstance(sha, str)}
    if target.is_file() and not target.is_symlink() and file_sha256(target) in recorded:
        return
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
    for name, key in output_paths(entry_key(entry), overlays):
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


def resumed_backend(previous: dict | None, overwrite: bool) -> str | None:
    """The encoder path of the results this run resumes: ``auto`` keeps it, so that one path makes
    every mask of the folder (the first run of a new checkpoint may have taken torch)."""
    settings = previous.get("settings") if previous is not None and not overwrite else None
    return settings.get("backend") if isinstance(settings, dict) else None


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
