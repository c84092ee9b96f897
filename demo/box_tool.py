"""The page's box tool: a support shot's mask from boxes (typed, or the box around a brush stroke), filled
or refined by GrabCut exactly as ``fss-run --box-supports`` makes it (:mod:`fss.io.boxes`)."""

import numpy as np
from PIL import Image

from fss.demo.session import DemoError
from fss.io.boxes import boxes_mask, checked_box, text_rows

BOX_MODES = {"GrabCut": "grabcut", "box": "mask"}  # the page's words -> fss-run's --box-supports


def painted_box(layers: list, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1) around everything painted on the editor's layers, at the image's
    ``size`` (the canvas may differ from it by rounding); None where nothing is painted."""
    painted = np.zeros((size[1], size[0]), bool)
    for layer in layers:
        alpha = np.asarray(layer)[..., 3] > 0
        if alpha.shape != painted.shape:
            alpha = np.asarray(Image.fromarray(alpha).resize(size, Image.NEAREST))
        painted |= alpha
    if not painted.any():
        return None
    rows, cols = np.flatnonzero(painted.any(1)), np.flatnonzero(painted.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_mask(image: Image.Image, layers: list, text: str, mode: str) -> tuple[np.ndarray, str]:
    """(mask, what was boxed) of the boxes typed in ``text`` (a box file's lines), else of the box
    around the paint; ``mode``: a key of :data:`BOX_MODES`."""
    if mode not in BOX_MODES:
        raise DemoError(f"box as {mode!r}: choose one of {', '.join(BOX_MODES)}")
    rows = text_rows(text or "")
    if rows:
        boxes = [checked_box(number, row, "the box field") for number, row in enumerate(rows, 1)]
    else:
        found = painted_box(layers, image.size)
        if found is None:
            raise DemoError("type a box (x0 y0 x1 y1) or drag the brush across the object first")
        boxes = [found]
    mask = boxes_mask(image, boxes, BOX_MODES[mode], "the box field")
    return mask, "; ".join(" ".join(f"{v:g}" for v in box) for box in boxes)


def components(gr) -> dict:
    """The box tool's controls, below the mask file."""
    with gr.Row():
        box_text = gr.Textbox(
            label="...or boxes: x0 y0 x1 y1 per line (empty: the box around your brush stroke)",
            placeholder="e.g. 40 30 310 260",
            lines=1,
            scale=3,
            elem_id="box-text",
        )
        box_mode = gr.Radio(list(BOX_MODES), value="GrabCut", label="Box as", scale=1, elem_id="box-mode")
    return dict(box_text=box_text, box_mode=box_mode, box=gr.Button("Use box", elem_id="use-box"))


def handler(guard, ui, editor_value):
    """**Use box**: the pending image's mask from the box tool, shown in the editor (paint adds to it)."""

    @guard
    def on_box(session, value, text, mode):
        image = session.pending
        if image is None:
            raise DemoError("load a support image before drawing its box")
        mask, boxed = box_mask(image, (value or {}).get("layers") or [], text, mode)
        session.pending_mask = mask
        pixels = int(mask.sum())
        return {
            ui.editor: editor_value(image, mask),
            ui.status: f"Box {boxed} as {mode}: {pixels} pixels; paint to add to it, or **Add shot**.",
        }

    return on_box


def connect(ui, on_box) -> None:
    ui.box.click(on_box, [ui.state, ui.editor, ui.box_text, ui.box_mode], [ui.state, ui.status, ui.editor])
