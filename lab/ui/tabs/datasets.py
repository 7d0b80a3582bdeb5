"""Datasets: upload and validate a file, browse a dataset page by page, and see a row as a model will see it."""

from __future__ import annotations

import json

import gradio as gr
import pandas as pd

from lab import datasets, formats, mapping, preview, registry, sources
from lab.errors import LabError
from lab.ui import choices
from lab.ui.common import UI, uploaded, user_errors
from lab.ui.html import error_box, md, ok_box, problems_box

COLUMNS = ["name", "format", "rows", "held out", "columns", "created_at"]
PAGE = 10


def table(ui: UI) -> pd.DataFrame:
    rows = datasets.list_all(ui.settings)
    return pd.DataFrame([{**{c: r.get(c) for c in COLUMNS}, "columns": ", ".join(r["columns"]),
                          "held out": r["test_rows"] or ""} for r in rows], columns=COLUMNS)


CELL_CHARS = 160


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(value, column: str = "") -> str:
    if column == "candidates" and isinstance(value, list):  # each answer numbered, with its model, cut on its own
        return "  ‖  ".join(f"{i}. [{c.get('model') or '?'}] {_cut(str(c.get('text', '')), 90)}" if isinstance(c, dict)
                            else f"{i}. {_cut(str(c), 90)}" for i, c in enumerate(value, 1))
    return _cut(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False), CELL_CHARS)


def page_frame(ui: UI, name: str, page: int) -> tuple[pd.DataFrame, str]:
    info = datasets.info(ui.settings, name)
    pages = max(1, -(-info["rows"] // PAGE))
    page = min(max(1, int(page or 1)), pages)
    rows = datasets.preview(ui.settings, name, PAGE, (page - 1) * PAGE)
    frame = pd.DataFrame([{"row": (page - 1) * PAGE + i + 1, **{c: _cell(r.get(c, ""), c) for c in info["columns"]}}
                          for i, r in enumerate(rows)], columns=["row", *info["columns"]])
    summary = (f"**{md(name)}**: {info['format']} ({formats.FORMATS[info['format']]}), {info['rows']} rows, "
               f"columns {md(', '.join(info['columns']))}. Page {page} of {pages}; long texts are cut at "
               f"{CELL_CHARS} characters. Fingerprint `{info['fingerprint'][:12]}`")
    return frame, summary


def _format(fmt: str | None) -> str | None:
    return None if fmt in (None, "", "auto") else fmt


def import_file(ui: UI, file, name: str, fmt: str, columns: str | dict | None = None, encoding: str | None = None,
                split: str | None = None, test_split: str | None = None) -> dict:
    """Validate and register an uploaded file or zipped dataset folder (shared with the `upload_dataset` API)."""
    path = uploaded(file)
    name = (name or "").strip() or path.stem.replace(" ", "-")
    return datasets.add(ui.settings, name, path, _format(fmt), source=f"upload {path.name}", columns=columns,
                        **_options(encoding, split, test_split))


def _options(enc: str | None, sp: str | None, tsp: str | None) -> dict:
    """The page's typed reading options (encoding, split, held-out split) as `datasets.add` takes them."""
    return {"encoding": (enc or "").strip() or None, "split": (sp or "").strip() or None,
            "test_split": (tsp or "").strip() or None}


def mapping_of(fmt: str | None, *chosen) -> dict[str, str]:
    """The mapping the page's column pickers hold for format `fmt` (pickers of other formats are ignored)."""
    fields = formats.fields_of(fmt) if fmt in formats.REQUIRED else ()
    return {f: c for f, c in zip(formats.FIELDS, chosen, strict=True) if f in fields and c and c != f}


def build(ui: UI) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("#### Import a dataset\nJSONL, JSON (ShareGPT too), CSV/TSV, Parquet, plain text, or a "
                        "zipped dataset folder (save_to_disk, or split files). Every row is checked before anything "
                        "is stored.")
            upload = gr.File(label="File", file_types=[".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".zip"],
                             type="filepath", elem_id="dataset-upload")
            name = gr.Textbox(label="Name", placeholder="taken from the file name when empty")
            fmt = gr.Dropdown(label="Format", choices=["auto", *formats.FORMATS, *formats.LAYOUTS], value="auto",
                              info="auto: detected from the columns; pick one to map the columns yourself",
                              elem_id="dataset-format")
            with gr.Accordion("Columns, encoding and splits", open=False) as options:
                found_columns = gr.Markdown(elem_id="dataset-columns")
                pickers = [gr.Dropdown(label=f"Column for {f}", choices=[("(none)", "")], value="",
                                       visible=False, elem_id=f"map-{f}") for f in formats.FIELDS]
                with gr.Row():
                    encoding = gr.Textbox(label="Encoding", placeholder="auto: UTF-8 or UTF-16",
                                          info="for other text files, e.g. latin-1, cp1252",
                                          elem_id="dataset-encoding")
                    split = gr.Textbox(label="Split to train on", placeholder="train", info="a zipped folder's")
                    test_split = gr.Textbox(label="Held-out split", placeholder="test, else validation",
                                            info="`none` keeps none")
                check = gr.Button("Preview the import", elem_id="dataset-check")
                checked = gr.JSON(label="First rows as they would be stored", visible=False, elem_id="dataset-first")
            go = gr.Button("Import", variant="primary")
            report = gr.HTML(elem_id="dataset-report")
        with gr.Column(scale=2):
            ui["ds_table"] = gr.Dataframe(interactive=False, label="Datasets", wrap=True)
    gr.Markdown("#### Browse")
    with gr.Row():
        chosen = gr.Dropdown(label="Dataset", choices=choices.datasets(ui), value=None, scale=2,
                             elem_id="dataset-browse")
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

    read_inputs = [upload, fmt, encoding, split, test_split, *pickers]

    def on_import(file, nm, f, enc, sp, tsp, *chosen_columns):
        try:
            info = import_file(ui, file, nm, f, mapping_of(f, *chosen_columns), enc, sp, tsp)
        except LabError as exc:
            return problems_box(exc, "Nothing was stored."), table(ui), gr.update(), None
        held = f", {info['test_rows']} held out for evaluation" if info["test_rows"] is not None else ""
        msg = (f"Imported {info['name']}: {info['rows']} rows{held}, format {info['format']}, "
               f"columns {', '.join(info['columns'])}" + "".join(f"\nNote: {n}" for n in info["notes"]))
        return ok_box(msg), table(ui), gr.update(choices=choices.datasets(ui), value=info["name"]), None

    # the file box is emptied after each try, ready for the next file; the report names what was tried
    go.click(on_import, [*read_inputs[:1], name, *read_inputs[1:]], [report, ui["ds_table"], chosen, upload])

    def pickers_for(fmt_now: str | None, columns: list[str], given: dict[str, str]) -> list:
        """The column pickers of format `fmt_now`, filled with `given` or a column of the field's own name."""
        fields = formats.fields_of(fmt_now) if fmt_now in formats.REQUIRED else ()
        choices = [("(none)", ""), *[(c, c) for c in columns]]
        return [gr.update(visible=f in fields, choices=choices,
                          value=given.get(f) or (f if f in columns else "")) for f in formats.FIELDS]

    def on_file(file, f, enc, sp, tsp, *_):
        """A new file: its columns, and when its format cannot be told from them, a guessed mapping to check."""
        if not file:
            return ["", gr.update(visible=False), gr.update(), gr.update(open=False), *pickers_for(None, [], {})]
        try:
            src = sources.read(uploaded(file), **_options(enc, sp, tsp))
        except LabError as exc:
            return [f"**The file cannot be read as it is**: {md(exc)}", gr.update(visible=False), gr.update(),
                    gr.update(open=True), *pickers_for(None, [], {})]
        columns = datasets.columns_of(src.train.rows)
        detected = formats.detect(columns)
        text = f"Columns: {md(', '.join(columns) or '(none)')}."
        if _format(f) is None and detected is None:
            guess = mapping.suggest(columns, src.train.rows)
            if guess is None:
                text += " The format cannot be told from them: pick a format and map its fields to the columns."
                return [text, gr.update(visible=False), gr.update(), gr.update(open=True), *pickers_for(None, [], {})]
            text += (f" The format cannot be told from their names; they look like **{guess[0]}**, mapped as "
                     "below: check, then Preview or Import.")
            return [text, gr.update(visible=False), gr.update(value=guess[0]), gr.update(open=True),
                    *pickers_for(guess[0], columns, guess[1])]
        text += f" Format {_format(f) or detected}" + (" (detected)." if _format(f) is None else ".")
        guess = mapping.suggest(columns, src.train.rows) if _format(f) else None
        given = guess[1] if guess and guess[0] == _format(f) else {}
        return [text, gr.update(visible=False), gr.update(), gr.update(),
                *pickers_for(_format(f) or detected, columns, given)]

    def on_upload(file, f, *rest):
        """A new file starts from a detected format: a format guessed for the previous file does not stick."""
        out = on_file(file, "auto", *rest)
        return [*out[:2], gr.update(value="auto") if out[2] == gr.update() else out[2], *out[3:]]

    upload.change(on_upload, read_inputs, [found_columns, checked, fmt, options, *pickers])
    def on_option(*args):
        """An option typed: the file read again with it. The preview shown is left alone: leaving the field by
        clicking Preview must not hide the preview that click asks for."""
        out = on_file(*args)
        return [out[0], *out[2:]]

    # typed options are read when the field is left or Enter is pressed, not at every key
    gr.on([e for box in (encoding, split, test_split) for e in (box.submit, box.blur)], on_option, read_inputs,
          [found_columns, fmt, options, *pickers])

    def on_format(file, f, enc, sp, tsp, *_):
        """Another format picked: its fields' pickers, over the file's columns (read with the options typed, so a
        file in another encoding keeps its columns)."""
        columns: list[str] = []
        if file:
            try:
                columns = datasets.columns_of(sources.read(uploaded(file), **_options(enc, sp, tsp)).train.rows)
            except LabError:
                columns = []
        return pickers_for(_format(f), columns, {})

    fmt.input(on_format, read_inputs, pickers)

    def on_check(file, f, enc, sp, tsp, *chosen_columns):
        try:
            found = datasets.check(uploaded(file), _format(f), columns=mapping_of(f, *chosen_columns),
                                   **_options(enc, sp, tsp))
        except LabError as exc:
            return problems_box(exc, "Nothing was stored."), gr.update(visible=False)
        held = f", {found['test_rows']} held out for evaluation" if found["test_rows"] is not None else ""
        msg = (f"Would import {found['rows']} rows{held} as {found['format']}, columns "
               f"{', '.join(found['columns'])}" + "".join(f"\nNote: {n}" for n in found["notes"]))
        return ok_box(msg), gr.update(value=found["first"], visible=True)

    check.click(on_check, read_inputs, [report, checked])

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
                gr.update(choices=choices.datasets(ui)))

    show_conv.click(on_preview_conversion, [chosen, target], [conv_report, conv_rows])
    do_conv.click(on_convert, [chosen, target, new_name], [conv_report, ui["ds_table"], chosen])
    ui.on_refresh(lambda _: {ui["ds_table"]: table(ui), chosen: gr.update(choices=choices.datasets(ui)),
                             model: gr.update(choices=choices.models(ui))},
                  [ui["ds_table"], chosen, model])

