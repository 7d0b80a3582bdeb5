"""Datasets: upload and validate a file, browse a dataset page by page, and see a row as a model will see it."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from lab import datasets, formats, preview, registry
from lab.errors import LabError
from lab.ui.common import UI, user_errors
from lab.ui.html import error_box, md, ok_box, problems_box
from lab.workspace import inside

COLUMNS = ["name", "format", "rows", "columns", "created_at"]
PAGE = 10


def table(ui: UI) -> pd.DataFrame:
    rows = datasets.list_all(ui.settings)
    return pd.DataFrame([{**{c: r[c] for c in COLUMNS}, "columns": ", ".join(r["columns"])} for r in rows],
                        columns=COLUMNS)


def names(ui: UI, accepts: tuple[str, ...] | None = None) -> list[str]:
    return [d["name"] for d in datasets.list_all(ui.settings) if accepts is None or d["format"] in accepts]


CELL_CHARS = 160


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


def page_frame(ui: UI, name: str, page: int) -> tuple[pd.DataFrame, str]:
    info = datasets.info(ui.settings, name)
    pages = max(1, -(-info["rows"] // PAGE))
    page = min(max(1, int(page or 1)), pages)
    rows = datasets.preview(ui.settings, name, PAGE, (page - 1) * PAGE)
    frame = pd.DataFrame([{"row": (page - 1) * PAGE + i + 1, **{c: _cell(r.get(c, "")) for c in info["columns"]}}
                          for i, r in enumerate(rows)], columns=["row", *info["columns"]])
    summary = (f"**{md(name)}**: {info['format']} ({formats.FORMATS[info['format']]}), {info['rows']} rows, "
               f"columns {md(', '.join(info['columns']))}. Page {page} of {pages}; long texts are cut at "
               f"{CELL_CHARS} characters. Fingerprint `{info['fingerprint'][:12]}`")
    return frame, summary


def uploaded(file) -> Path:
    """The path of a file that arrived through an upload to this server. Anything else (a plain path, a dict
    naming a server file) is refused: reading the server's own files is a command-line matter."""
    from gradio.utils import get_upload_folder

    if not file:
        raise LabError("choose a file to upload")
    path = file.get("path") if isinstance(file, dict) else getattr(file, "path", file)
    if not isinstance(path, str):
        raise LabError("the file must be uploaded with the request (gradio_client: handle_file(PATH))")
    if not inside(Path(get_upload_folder()), Path(path)) or not Path(path).is_file():
        raise LabError("only a file uploaded with the request can be imported here, not a path on the server",
                       "upload it (gradio_client: handle_file(PATH)), or on the server run `lab datasets add NAME "
                       "PATH`")
    return Path(path).resolve()


def import_file(ui: UI, file, name: str, fmt: str) -> dict:
    """Validate and register an uploaded file (shared with the `upload_dataset` API)."""
    path = uploaded(file)
    name = (name or "").strip() or path.stem.replace(" ", "-")
    return datasets.add(ui.settings, name, path, None if fmt in (None, "", "auto") else fmt,
                        source=f"upload {path.name}")


def build(ui: UI) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("#### Import a dataset\nJSONL, JSON, CSV, Parquet or plain text. Every row is checked "
                        "before anything is stored.")
            upload = gr.File(label="File", file_types=[".jsonl", ".json", ".csv", ".parquet", ".txt"],
                             type="filepath", elem_id="dataset-upload")
            name = gr.Textbox(label="Name", placeholder="taken from the file name when empty")
            fmt = gr.Dropdown(label="Format", choices=["auto", *formats.FORMATS], value="auto",
                              info="auto: detected from the columns")
            go = gr.Button("Import", variant="primary")
            report = gr.HTML(elem_id="dataset-report")
        with gr.Column(scale=2):
            ui["ds_table"] = gr.Dataframe(interactive=False, label="Datasets", wrap=True)
    gr.Markdown("#### Browse")
    with gr.Row():
        chosen = gr.Dropdown(label="Dataset", choices=names(ui), value=None, scale=2, elem_id="dataset-browse")
        page = gr.Number(label="Page", value=1, precision=0, minimum=1, scale=1)
    summary = gr.Markdown()
    rows = gr.Dataframe(interactive=False, wrap=True, label="Rows", max_height=420, visible=False)
    with gr.Accordion("Convert to another format", open=False):
        gr.Markdown("E.g. hh-rlhf transcripts into prompt/chosen/rejected, alpaca into plain text for pretraining. "
                    "Preview first; Convert stores the result as a new dataset.")
        with gr.Row():
            target = gr.Dropdown(label="To format", choices=list(formats.FORMATS), value="preference", scale=1)
            new_name = gr.Textbox(label="New dataset name", scale=2)
            show_conv = gr.Button("Preview", scale=1)
            do_conv = gr.Button("Convert", variant="primary", scale=1)
        conv_report = gr.HTML()
        conv_rows = gr.JSON(label="First converted rows", visible=False)
    gr.Markdown("#### As the model sees it\nComputed by the training code itself (TRL's own tokenization, masking "
                "and truncation), as `sft` trains on a row and `dpo` on a preference pair: "
                "<span class='tok-train'>learned tokens</span> count towards the loss, "
                "<span class='tok-mask'>masked prompt tokens</span> do not, "
                "<span class='tok-cut'>tokens past max_length</span> are never seen.")
    with gr.Row():
        model = gr.Dropdown(label="Model (its tokenizer and chat template)", choices=[], value=None, scale=2,
                            elem_id="ds-model")
        row_no = gr.Number(label="Row", value=1, precision=0, minimum=1, scale=1, elem_id="sample-row")
        completion_only = gr.Checkbox(label="Learn only the reply (completion_only)", value=True, scale=1)
        max_len = gr.Number(label="Token limit as in training (0: none)", value=0, precision=0, minimum=0,
                            maximum=131072,
                            scale=1, elem_id="sample-max-length")
        show = gr.Button("Show", scale=1)
    sample = gr.HTML(elem_id="token-sample")
    ui["ds_chosen"], ui["ds_model"] = chosen, model

    def on_import(file, nm, f):
        try:
            info = import_file(ui, file, nm, f)
        except LabError as exc:
            return problems_box(exc, "Nothing was stored."), table(ui), gr.update(), None
        msg = (f"Imported {info['name']}: {info['rows']} rows, format {info['format']}, "
               f"columns {', '.join(info['columns'])}")
        return ok_box(msg), table(ui), gr.update(choices=names(ui), value=info["name"]), None

    # the file box is emptied after each try, ready for the next file; the report names what was tried
    go.click(on_import, [upload, name, fmt], [report, ui["ds_table"], chosen, upload])

    @user_errors
    def on_browse(nm, pg):
        if not nm:
            return gr.update(visible=False), "Pick a dataset to see its rows."
        frame, text = page_frame(ui, nm, pg)
        return gr.update(value=frame, visible=True), text

    chosen.change(on_browse, [chosen, page], [rows, summary])
    page.change(on_browse, [chosen, page], [rows, summary])

    @user_errors
    def on_show(nm, model_name, n, only, limit):
        if not nm or not model_name:
            raise LabError("pick a dataset and a model")
        ds = datasets.info(ui.settings, nm)
        found = datasets.preview(ui.settings, nm, 1, max(0, int(n or 1) - 1))
        if not found:
            raise LabError(f"{nm} has {ds['rows']} rows")
        model_path = registry.info(ui.settings, model_name)["path"]
        if ds["format"] == "preference":  # as dpo trains on it: each answer after the shared prompt
            pair = preview.preference_row(model_path, found[0], int(limit or 0) or None)
            return "".join(f"<h4>{side}</h4>" + preview.sample_html(pair[side]) for side in ("chosen", "rejected"))
        return preview.sample_html(preview.tokenize_row(model_path, ds["format"], found[0], bool(only),
                                                         int(limit or 0) or None))

    show.click(on_show, [chosen, model, row_no, completion_only, max_len], [sample])

    def on_preview_conversion(nm, to):
        try:
            rows = datasets.converted_rows(ui.settings, nm or "", to, 3)
        except LabError as exc:
            return error_box(str(exc)), gr.update(visible=False)
        return "", gr.update(value=rows, visible=True)

    def on_convert(nm, to, new):
        try:
            info = datasets.convert(ui.settings, nm or "", (new or "").strip(), to)
        except LabError as exc:
            return error_box(f"{exc}\nNothing was stored."), gr.update(), gr.update()
        return (ok_box(f"Stored {info['name']}: {info['rows']} rows, format {info['format']}"), table(ui),
                gr.update(choices=names(ui)))

    show_conv.click(on_preview_conversion, [chosen, target], [conv_report, conv_rows])
    do_conv.click(on_convert, [chosen, target, new_name], [conv_report, ui["ds_table"], chosen])
