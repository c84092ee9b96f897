"""What the demo page shows and downloads for a session, written with the same ``fss.io`` writers as
``fss-run`` (palette PNGs, overlays, ``results.json``): the zip is what ``fss-run`` writes for the zip's
``support/`` folder and the same queries."""

import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from fss.demo.session import DemoError, Session
from fss.io.outputs import overlay_image, write_json, write_label_png, write_overlay
from fss.models.base import method_of
from fss.runtime.cli import fractions

DISPLAY_SIDE = 1024  # overlays on the page are drawn at most this large (the zip keeps full size)
GALLERY_SIDE = 200  # about the side of a cell of the page's gallery: legends are drawn to be read there


def rounded(values) -> str:
    """A normalisation's mean or std as people write it (0.485, not 0.48500001430511475)."""
    if not isinstance(values, (list, tuple)):
        return "?"
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def model_line(engine) -> str:
    meta = engine.meta
    norm = meta.get("normalisation") or {}
    return (
        f"Model: `{engine.model_name}` ({method_of(meta).name}, {meta.get('encoder', '?')}, "
        f"input {engine.size} px, mean {rounded(norm.get('mean'))}, std {rounded(norm.get('std'))}) "
        f"on {engine.where}."
    )


def results(session: Session) -> dict:
    """``results.json`` as ``fss-run`` writes it, for the zip's ``support/`` folder."""
    entries = []
    for query in session.queries.values():
        if query.error is not None:
            entries.append({"file": query.name, "error": query.error})
        elif query.labels is not None:
            entries.append(
                {
                    "file": query.name,
                    "size": [query.image.width, query.image.height],
                    "fractions": fractions(query.labels, session.names),
                    "score": query.scores,
                    "time_s": round(query.encode_s + query.segment_s, 4),
                }
            )
    return {
        "classes": {str(k): name for k, name in enumerate(session.names)},
        "model": session.engine.model_name,
        "input_size": session.engine.size,
        "support": {
            "folder": "support",
            "classes": session.classes,
            "shots": [len(session.shots[n]) for n in session.classes],
        },
        "queries": entries,
    }


def overlays(session: Session) -> list[tuple[Image.Image, str]]:
    """(overlay, caption) per segmented query, drawn as ``fss-run`` draws them.

    Photos larger than ``DISPLAY_SIDE`` are shown scaled down (image bilinear, labels nearest)
    before drawing, to keep the page light, and the legend is drawn to be read at the gallery's size;
    the zip has full size, drawn as ``fss-run`` draws it.
    """
    out = []
    for query in session.queries.values():
        if query.labels is None:
            continue
        image, labels = query.image, query.labels
        scale = DISPLAY_SIDE / max(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.BILINEAR)
            labels = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
        caption = f"{query.name}: {1000 * (query.encode_s + query.segment_s):.0f} ms"
        legend_scale = max(1.0, max(image.size) / GALLERY_SIDE)
        out.append((overlay_image(image, labels, session.classes, legend_scale=legend_scale), caption))
    return out


def table(session: Session) -> list[list]:
    """One row per query: file, each class's pixel fraction, presence scores, time in ms, or the error."""
    rows = []
    for query in session.queries.values():
        if query.error is not None:
            rows.append([query.name, *[""] * len(session.names), "", f"error: {query.error}"])
        elif query.labels is not None:
            frac = fractions(query.labels, session.names)
            timing = f"{1000 * query.encode_s:.0f} + {1000 * query.segment_s:.0f}"
            scores = ", ".join(f"{name} {score:.2f}" for name, score in (query.scores or {}).items())
            rows.append([query.name, *[f"{frac[n]:.3f}" for n in session.names], scores, timing])
        else:
            rows.append([query.name, *[""] * len(session.names), "", "waiting for a support shot"])
    return rows


def write_zip(session: Session) -> Path:
    """Every mask, overlay, ``results.json`` and the support folder (``fss-run`` layout) as one zip."""
    with session.lock:
        if not any(q.labels is not None for q in session.queries.values()):
            raise DemoError("nothing to download yet: add a support shot and a query")
        root = Path(session.tmp.name) / "zip"
        shutil.rmtree(root, ignore_errors=True)
        for name in session.classes:
            for k, shot in enumerate(session.shots[name], start=1):
                folder = root / "support" / name
                folder.mkdir(parents=True, exist_ok=True)
                shot.image.save(folder / f"shot{k:02d}.png")  # lossless: fss-run reads the same pixels
                write_label_png(folder / f"shot{k:02d}_mask.png", shot.mask)
        for query in session.queries.values():
            if query.labels is not None:
                stem = Path(query.name).stem
                write_label_png(root / f"{stem}.png", query.labels)
                write_overlay(root / "overlays" / f"{stem}.jpg", query.image, query.labels, session.classes)
        write_json(root / "results.json", results(session))
        path = Path(session.tmp.name) / "fss-demo-results.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(root.rglob("*")):
                if file.is_file():
                    zf.write(file, file.relative_to(root).as_posix())
        return path


def shots_view(session: Session) -> list[tuple[Image.Image, str]]:
    """Thumbnails of the shots, each with its class and number."""
    items = []
    for name in session.classes:
        for k, shot in enumerate(session.shots[name], start=1):
            thumb = overlay_image(shot.image, shot.mask.clip(0, 1), [name])
            thumb.thumbnail((256, 256))
            items.append((thumb, f"{name} #{k}"))
    return items
