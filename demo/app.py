"""The Gradio page: paint support masks, drop queries, see overlays, download the masks.

Every handler takes the tab's :class:`Session` (a ``gr.State``, freed by Gradio's session clean-up
after the tab closes) and returns updates for the components it changes; a bad input becomes a
message in the status line and under the control that caused it, where the user is looking.
"""

import logging
import os
from functools import wraps
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from fss.demo import box_tool, outputs
from fss.demo.editor import BRUSH, mask_from_layers, mask_layer
from fss.demo.session import (
    DemoError,
    Engine,
    Session,
    check_class_name,
    read_mask_file,
    read_uploaded_image,
)
from fss.errors import FssError
from fss.io.folders import find_support_pairs, scan_folder

SESSION_TTL_S = 6 * 3600  # an idle tab's shots and features are freed after this
log = logging.getLogger("fss.demo")

HELP = """**1.** Pick an example or upload a support image, paint the object with the brush (eraser
and clear in the editor's toolbar) or upload a mask file (painting adds to it); name its class and
**Add shot**. Or box it: type the box, or drag the brush across the object, then **Use box**. Add more
shots or classes at any time. **2.** Drop query images: each is encoded once, and every change of the
shots updates all of them."""


def example_supports(root: Path | None) -> list[tuple[str, str]]:
    """(image path, class name) of ``root/<class>/<image>`` (the support-folder layout), sorted."""
    if root is None or not root.is_dir():
        return []
    try:
        pairs = find_support_pairs(root)
    except FssError:
        return []
    return [(str(image), name) for name, shots in pairs.items() for image, _ in shots]


def build_app(engine: Engine, examples: Path | None = None):
    """The page for ``engine``'s model; ``examples``: a folder with ``support/<class>/`` and ``query/``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # also when built without fss-demo
    import gradio as gr

    supports = example_supports(examples / "support" if examples else None)
    query_folder = examples / "query" if examples else None
    example_queries = (
        [str(p) for p in scan_folder(query_folder)[0]] if query_folder and query_folder.is_dir() else []
    )
    with gr.Blocks(title="fss demo", analytics_enabled=False) as app:
        state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=lambda s: s and s.close())
        gr.Markdown(f"## fss: few-shot segmentation\n{HELP}\n\n{outputs.model_line(engine)}")
        status = gr.Markdown("Start with a support image.", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                ui = SimpleNamespace(state=state, status=status, **support_column(gr, supports))
            with gr.Column(scale=2):
                ui.__dict__.update(query_column(gr, example_queries))
        handlers = {
            **support_handlers(gr, engine, ui, supports),
            **query_handlers(engine, ui, example_queries),
        }
        connect(ui, handlers)
    app.queue(default_concurrency_limit=4)
    return app


def message(gr, elem_id: str):
    return gr.Markdown("", elem_id=elem_id, elem_classes=["fss-message"])


def support_column(gr, supports: list[tuple[str, str]]) -> dict:
    """The left column's components: support image, examples, mask editor, class, shots."""
    gr.Markdown("### Supports")
    return dict(
        support_file=gr.File(
            label="Support image",
            file_types=["image"],
            type="filepath",
            height=110,
            elem_id="support-file",
        ),
        support_message=message(gr, "support-message"),
        example_gallery=gr.Gallery(
            value=[(p, n) for p, n in supports],
            label="Examples (click one)",
            columns=4,
            height=140,
            allow_preview=False,
            fit_columns=False,
            visible=bool(supports),
            elem_id="example-supports",
        ),
        editor=gr.ImageEditor(
            label="Paint the object",
            type="numpy",
            image_mode="RGBA",
            sources=[],
            brush=gr.Brush(colors=[("#{:02x}{:02x}{:02x}".format(*BRUSH), 0.6)], color_mode="fixed"),
            eraser=gr.Eraser(),
            layers=False,
            transforms=[],
            format="png",
            height=420,
            elem_id="editor",
        ),
        mask_input=gr.File(
            label="...or a mask file (fss-run's conventions)",
            file_types=["image"],
            height=110,
            elem_id="mask-file",
        ),
        mask_message=message(gr, "mask-message"),
        **box_tool.components(gr),
        class_name=gr.Textbox(label="Class", placeholder="e.g. bus", elem_id="class-name"),
        add=gr.Button("Add shot", variant="primary", elem_id="add-shot"),
        add_message=message(gr, "add-shot-message"),
        shots=gr.Gallery(
            label="Shots (click one to select)",
            columns=4,
            height=160,
            allow_preview=False,
            object_fit="contain",
            fit_columns=False,
            elem_id="shots",
        ),
        remove=gr.Button("Remove selected shot", elem_id="remove-shot"),
        shots_message=message(gr, "shots-message"),
    )


def query_column(gr, example_queries: list[str]) -> dict:
    """The right column's components: queries, their overlays and table, the zip."""
    gr.Markdown("### Queries")
    components = dict(
        queries=gr.File(
            label="Query images (drop many)",
            file_count="multiple",
            file_types=["image"],
            type="filepath",
            height=130,
            elem_id="queries",
        )
    )
    with gr.Row():
        components["add_examples"] = gr.Button("Add the example queries", visible=bool(example_queries))
        components["clear"] = gr.Button("Clear queries", elem_id="clear-queries")
    components["queries_message"] = message(gr, "queries-message")
    components["gallery"] = gr.Gallery(
        label="Segmented queries",
        columns=3,
        height=420,
        object_fit="contain",
        fit_columns=False,
        elem_id="results",
    )
    components["table"] = gr.Dataframe(
        label="Pixel fraction per class", interactive=False, visible=False, elem_id="table"
    )
    with gr.Row():
        components["zip_button"] = gr.Button("Download masks + results.json (zip)", elem_id="zip")
        components["zip_file"] = gr.File(label="Results zip", interactive=False, elem_id="zip-file")
    components["zip_message"] = message(gr, "zip-message")
    return components


def guarded(engine: Engine, ui):
    """A decorator: run a handler with the tab's session; a user error (or a bug) becomes a status message,
    also shown in the ``near`` component (``@guard(near=...)``: the line under the handler's control)."""

    def guard(handler=None, *, near=None):
        if handler is None:
            return lambda handler: guard(handler, near=near)

        @wraps(handler)
        def run(session, *args):
            session = session or Session(engine)
            try:
                updates = handler(session, *args)
            except FssError as err:  # DemoError and fss's own (unreadable file, ...)
                updates = {ui.status: f"**Error:** {err}"}
            except Exception as err:  # never a dead page: say what failed, keep the session
                log.exception("fss-demo handler %s failed", handler.__name__)
                updates = {ui.status: f"**Error:** internal error in {handler.__name__}: {err}"}
            if near is not None and ui.status in updates:
                updates[near] = updates[ui.status]
            return {ui.state: session, **updates}

        return run

    return guard


def results_view(ui, session: Session) -> dict:
    import gradio as gr
    import pandas as pd

    headers = ["file", *session.names, "presence score", "ms (encode + match)"]
    table = pd.DataFrame(outputs.table(session), columns=headers)
    return {
        ui.gallery: outputs.overlays(session),
        ui.table: gr.update(value=table, visible=not table.empty),  # an empty one shows headers "1 2 3"
        ui.shots: outputs.shots_view(session),
        ui.zip_file: None,  # a zip of the previous state would be stale
    }


def editor_value(image: Image.Image, mask: np.ndarray | None = None) -> dict:
    """The editor shows a mask file's mask drawn into its background (Gradio's editor misplaces
    layers set from the server), so the mask file is kept as is and paint adds to it."""
    if mask is not None:
        image = Image.alpha_composite(image.convert("RGBA"), Image.fromarray(mask_layer(mask, alpha=153)))
    return {"background": image, "layers": [], "composite": None}


def support_handlers(gr, engine: Engine, ui, supports: list[tuple[str, str]]) -> dict:
    """Handlers of the supports: load an image (file or example), a mask file, add and remove shots."""
    guard, max_pixels = guarded(engine, ui), engine.max_pixels

    def load_support(session: Session, image: Image.Image, source: str) -> dict:
        session.pending, session.pending_mask = image, None
        session.selected = None
        size = f"{image.width}x{image.height}"
        return {
            ui.editor: editor_value(image),
            ui.status: f"Loaded {source} ({size}): paint the object, then **Add shot**.",
            ui.mask_message: "",  # the messages of the previous image
            ui.add_message: "",
        }

    @guard(near=ui.support_message)
    def on_support_file(session, path):
        if not path:
            return {}
        return {
            **load_support(session, read_uploaded_image(path, max_pixels), Path(path).name),
            ui.support_file: None,
        }

    @guard(near=ui.support_message)
    def on_example(session, evt: gr.SelectData):
        path, name = supports[evt.index]
        return {
            **load_support(session, read_uploaded_image(path, max_pixels), Path(path).name),
            ui.class_name: name,
        }

    @guard(near=ui.mask_message)
    def on_mask_file(session, path):
        if not path:
            return {}
        image = session.pending
        if image is None:
            raise DemoError("load a support image before its mask")
        mask = read_mask_file(path, image.size, max_pixels)
        session.pending_mask = mask
        return {
            ui.editor: editor_value(image, mask),
            ui.mask_input: None,
            ui.status: "Mask loaded: paint to add to it, or **Add shot**.",
        }

    @guard(near=ui.add_message)
    def on_add_shot(session, value, name):
        image = session.pending
        if image is None:
            raise DemoError("load a support image first (upload one or pick an example)")
        name = check_class_name(name)
        mask = mask_from_layers((value or {}).get("layers") or [], image.size, session.pending_mask)
        message = session.add_shot(name, image, mask)
        session.pending_mask, session.editor_stale = None, True  # the same shot is not added twice
        added = f"Added shot {len(session.shots[name])} of **{name}** ({int((mask == 1).sum())} pixels)."
        return {**results_view(ui, session), ui.status: f"{added} {message}", ui.mask_message: ""}

    def on_added(session):
        """After **Add shot**: the editor shows the image unpainted (another object may be painted on it)."""
        stale, session.editor_stale = session.editor_stale, False
        return editor_value(session.pending) if stale else gr.skip()

    return {
        "support_file": on_support_file,
        "example": on_example,
        "mask_file": on_mask_file,
        "add_shot": on_add_shot,
        "box": box_tool.handler(guard, ui, editor_value),
        "added": on_added,
        **shot_list_handlers(gr, guard, ui),
    }


def shot_list_handlers(gr, guard, ui) -> dict:
    """Handlers of the shot list: select a shot, remove it."""

    @guard(near=ui.shots_message)
    def on_select_shot(session, evt: gr.SelectData):
        index = 0
        for name in session.classes:
            for k in range(len(session.shots[name])):
                if index == evt.index:
                    session.selected = (name, k)
                    return {ui.status: f"Selected {name} #{k + 1}: **Remove selected shot** deletes it."}
                index += 1
        return {}

    @guard(near=ui.shots_message)
    def on_remove_shot(session):
        selected = session.selected
        if selected is None:
            raise DemoError("click a shot in the list first")
        session.selected = None
        message = session.remove_shot(*selected)
        return {
            **results_view(ui, session),
            ui.status: f"Removed {selected[0]} #{selected[1] + 1}. {message}",
        }

    return {"select_shot": on_select_shot, "remove_shot": on_remove_shot}


def query_handlers(engine: Engine, ui, example_queries: list[str]) -> dict:
    """Handlers of the queries: add (files or the examples), clear, download the zip."""
    guard = guarded(engine, ui)

    @guard(near=ui.queries_message)
    def on_queries(session, paths):
        if not paths:
            return {}
        problems = session.add_queries(paths)
        waiting = "" if session.shots else " Add a support shot to segment them."
        lines = [f"{len(paths)} file(s) added.{waiting}", *[f"- {p}" for p in problems]]
        return {**results_view(ui, session), ui.queries: None, ui.status: "\n".join(lines)}

    @guard(near=ui.queries_message)
    def on_example_queries(session):
        return on_queries.__wrapped__(session, example_queries)

    @guard(near=ui.queries_message)
    def on_clear_queries(session):
        session.clear_queries()
        return {**results_view(ui, session), ui.status: "Queries cleared."}

    @guard(near=ui.zip_message)
    def on_zip(session):
        return {
            ui.zip_file: str(outputs.write_zip(session)),
            ui.status: "Zip ready: masks, overlays, results.json, support/.",
        }

    return {
        "queries": on_queries,
        "example_queries": on_example_queries,
        "clear_queries": on_clear_queries,
        "zip": on_zip,
    }


def connect(ui, on: dict) -> None:
    """Each component's event to its handler, with the components the handler reads and updates."""
    results = [ui.state, ui.status, ui.shots, ui.gallery, ui.table, ui.zip_file]
    loaded = [ui.state, ui.status, ui.editor, ui.support_message, ui.mask_message, ui.add_message]
    ui.support_file.upload(on["support_file"], [ui.state, ui.support_file], [*loaded, ui.support_file])
    ui.example_gallery.select(on["example"], [ui.state], [*loaded, ui.class_name])
    ui.mask_input.upload(
        on["mask_file"],
        [ui.state, ui.mask_input],
        [ui.state, ui.status, ui.editor, ui.mask_input, ui.mask_message],
    )
    # The editor is no output of the click (its loading overlay would swallow the next brush stroke):
    # it is reset afterwards, without the overlay.
    added = [*results, ui.add_message, ui.mask_message]
    ui.add.click(on["add_shot"], [ui.state, ui.editor, ui.class_name], added).then(
        on["added"], [ui.state], [ui.editor], show_progress="hidden"
    )
    box_tool.connect(ui, on["box"])
    ui.shots.select(on["select_shot"], [ui.state], [ui.state, ui.status, ui.shots_message])
    ui.remove.click(on["remove_shot"], [ui.state], [*results, ui.shots_message])
    query_results = [*results, ui.queries, ui.queries_message]
    ui.queries.upload(on["queries"], [ui.state, ui.queries], query_results)
    ui.add_examples.click(on["example_queries"], [ui.state], query_results)
    ui.clear.click(on["clear_queries"], [ui.state], [*results, ui.queries_message])
    ui.zip_button.click(on["zip"], [ui.state], [ui.state, ui.status, ui.zip_file, ui.zip_message])
