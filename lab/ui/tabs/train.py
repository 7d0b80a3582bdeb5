"""Train: pick a plugin, its model and dataset, fill the form generated from its Params, see the equivalent
command line and a rough cost, launch into the queue and land on the run. Where the page becomes a job:
`spec_from_form` (the form's named values as a lab.jobspec.JobSpec); the fields beyond method, model, dataset and
parameters are widgets generated from the spec's options (`spec_widget`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from lab import datasets, experiments, jobspec, plugins, preview, registry, runs, trackers
from lab.errors import LabError
from lab.ui import choices, forms
from lab.ui.common import UI, uploaded
from lab.ui.html import error_box, md, ok_box, problems_box

# --- the job's spec fields as widgets (generated from lab.jobspec: a field added there appears here) -----------


def spec_widget(name: str, default_trackers: list[str]) -> gr.components.Component:
    """The widget of a JobSpec field, from its option: label, help, widget kind, choices, default."""
    meta = jobspec.meta(name)
    value = to_widget(name, jobspec.default(name), default_trackers)
    common = {"label": meta["label"], "info": meta["help"], "elem_id": f"train-{name.replace('_', '-')}",
              "scale": 1}
    if meta["widget"] == "checkboxes":
        return gr.CheckboxGroup(meta["choices"], value=value, **common)
    if meta["widget"] == "dropdown":
        return gr.Dropdown(choices=[str(c) for c in meta["choices"]], value=value, **common)
    if meta["widget"] == "text":
        return gr.Textbox(value=value, **common)
    whole = jobspec.value_type(name) is int
    return gr.Number(value=value, precision=0 if whole else None, **common)


def to_widget(name: str, value, default_trackers: list[str]):
    """A field's value as its widget shows it."""
    if name == "devices":
        return "auto" if value is None else str(value)
    if name == "report_to":
        return list(default_trackers) if value is None else trackers.parse(value) or []
    if name == "tags":
        return ", ".join(value or [])
    if jobspec.value_type(name) is str:
        return value or ""
    return value


def from_widget(name: str, raw, default_trackers: list[str]):
    """A widget's value as the field's (None: left at its default). Wrong values are left for JobSpec to name."""
    if name == "report_to":
        chosen = list(raw or [])
        return None if chosen == list(default_trackers) else (",".join(chosen) or "none")
    if name == "devices":  # the dropdown's "auto" or a count
        return int(raw) if isinstance(raw, str) and raw.isdigit() else None if raw in (None, "", "auto") else raw
    if name in ("time_limit_min", "memory_gb"):
        return raw or None  # empty or 0: none
    if raw is None or raw == "":
        return None
    if isinstance(raw, float) and raw.is_integer() and jobspec.value_type(name) is int:
        return int(raw)
    return raw


def section_fields(section: str) -> list[str]:
    return [n for n in jobspec.FIELDS if jobspec.meta(n)["section"] == section]


GENERATED = ("priority", *section_fields(jobspec.RESOURCES), *section_fields(jobspec.CLUSTER),
             *section_fields(jobspec.GROUPING))  # the spec fields the page lays out from their options
NAMED = ("plugin", "model", "dataset", "experiment", "held", "then_eval", "eval_dataset", "eval_params", *GENERATED)


def spec_from_form(v: dict, found: dict[str, plugins.Plugin], forms_of: dict[str, forms.Form],
                   default_trackers: list[str]) -> jobspec.JobSpec:
    """The Train page's named values (plugin, model, dataset, experiment, held: each plugin's form values,
    then_eval, eval_dataset, and the generated fields) as the job's spec, with the parameters that differ from the
    plugin's defaults. Raises LabError on a wrong value."""
    pid = v.get("plugin")
    if pid not in forms_of:
        raise LabError(f"unknown plugin {pid!r}" if pid else "pick a method")
    form = forms_of[pid]
    params = form.values(list((v.get("held") or {}).get(pid) or form.fill({})))
    lines = [line.strip() for line in (v.get("eval_params") or "").splitlines() if line.strip()]
    follow = ({"plugin": v["then_eval"], "dataset": v.get("eval_dataset") or None,
               "params": plugins.parse_sets(lines)} if v.get("then_eval") else None)
    data = {"plugin": pid, "model": v.get("model") or None, "dataset": v.get("dataset") or None,
            "experiment": v.get("experiment") or jobspec.DEFAULT_EXPERIMENT, "params": params, "then_eval": follow,
            **{n: from_widget(n, v.get(n), default_trackers) for n in GENERATED}}
    data["params"] = plugins.validate_params(found[pid], params).model_dump(mode="json", exclude_defaults=True)
    return jobspec.JobSpec.of({k: x for k, x in data.items() if x is not None}, "the form")


def missing(found: dict, spec: jobspec.JobSpec) -> None:
    """The page's words for an empty pick (the queue's own message speaks of command-line options)."""
    p = found.get(spec.plugin)
    if p is not None and p.needs_model is True and not spec.model:
        raise LabError("pick a base model", "a registered model or an earlier run's output")
    if p is not None and p.needs_dataset and not p.dataset_optional and not spec.dataset:
        raise LabError("pick a dataset", f"only datasets this method reads are listed ({', '.join(p.accepts)}); "
                       "import one on the Datasets page")


def filled(spec: jobspec.JobSpec, forms_of: dict[str, forms.Form], default_trackers: list[str],
           held: dict | None) -> dict[str, Any]:
    """Named values that put `spec` in the form (Clone, a loaded config): the chosen plugin's form gets its
    parameters, the other plugins' forms are left as they are."""
    if spec.plugin not in forms_of:
        raise LabError(f"plugin {spec.plugin!r} is not a method of the Train page here",
                       "exports and imports start again from the Models page; any other plugin must be installed")
    values = forms_of[spec.plugin].fill(dict(spec.params))
    follow = spec.then_eval
    return {"plugin": spec.plugin, "model": spec.model, "dataset": spec.dataset,
            "then_eval": follow.plugin if follow else "", "eval_dataset": follow.dataset if follow else None,
            "eval_params": "\n".join(f"{k}={x if isinstance(x, str) else json.dumps(x)}"
                                     for k, x in (follow.params if follow else {}).items()),
            **{n: to_widget(n, getattr(spec, n), default_trackers) for n in GENERATED},
            "held": {**(held or {}), spec.plugin: values}, "form": values}


@dataclass
class TrainPage:
    """The Train page's components by name, laid out by `build`; the handlers below (module-level functions of the
    page and named values, testable without a browser) read and answer by these names. `w` holds the spec's
    widgets (NAMED); `parts` the rest: command, estimate, message, grid, config_out, load_config, description, each
    plugin's form as "form:ID" and its fields as "ID.FIELD". Any other name is a component another tab put on the
    UI (tabs, run_job, compare_group, ...)."""
    ui: UI
    found: dict[str, plugins.Plugin]
    forms: dict[str, forms.Form]
    default_trackers: list[str]
    w: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, Any] = field(default_factory=dict)

    @property
    def fields(self) -> list[gr.components.Component]:
        """Every form's fields, in form order."""
        return [c for f in self.forms.values() for c in f.components]

    def component(self, name: str):
        for where in (self.w, self.parts):
            if name in where:
                return where[name]
        return self.ui[name]

    @functools.cached_property
    def names(self) -> dict[gr.blocks.Block, str]:
        """Every component's name (the page's own first), built at the first event: by then every tab has put its
        components on the UI."""
        return {c: name for name, c in (*self.ui.c.items(), *self.parts.items(), *self.w.items())
                if isinstance(c, gr.blocks.Block)}

    def named(self, data: dict) -> dict[str, Any]:
        """A handler's {component: value} by name. Where the handler was sent the forms' fields themselves (Launch,
        sweep, save), they win over `held`, whose update may still wait behind another event."""
        v = {self.names[c]: value for c, value in data.items() if c in self.names}
        fields = self.fields
        if fields and fields[0] in data:
            v["held"] = {fid: [data[c] for c in form.components] for fid, form in self.forms.items()}
        return v

    def answer(self, out: dict[str, Any]) -> dict:
        """A handler's {name: value} as Gradio's {component: value}."""
        return {self.component(n): x for n, x in out.items()}

    def event(self, handler: Callable[[TrainPage, dict], dict], inputs: list[str], outputs: list[str],
              with_fields: bool = False) -> tuple[Callable, set, list]:
        """(fn, inputs, outputs) for a Gradio event that runs `handler(page, named values) -> {name: value}`;
        with_fields: every form's fields are sent too."""
        def run(data: dict) -> dict:
            return self.answer(handler(self, self.named(data)))

        run.__name__ = handler.__name__  # Gradio names the event by it

        sent = {self.component(n) for n in inputs} | (set(self.fields) if with_fields else set())
        return run, sent, [self.component(n) for n in outputs]

    def on(self, trigger, handler, inputs: list[str], outputs: list[str], with_fields: bool = False, **kwargs):
        return trigger(*self.event(handler, inputs, outputs, with_fields), **kwargs)

    def spec(self, v: dict) -> jobspec.JobSpec:
        return spec_from_form(v, self.found, self.forms, self.default_trackers)

    def filled_names(self) -> list[str]:
        """What `fill` may update: the spec's widgets and every form's fields."""
        return [*NAMED, *(f"{fid}.{n}" for fid, form in self.forms.items() for n in form.names)]

    def fill(self, spec: jobspec.JobSpec, held: dict | None) -> dict:
        return fill(self, spec, held)

    def open_with(self, plugin: str, dataset: str, model: str | None) -> dict:
        return open_with(self, plugin, dataset, model)

    def after_plugin(self) -> tuple[Callable, set, list]:
        """`choose_plugin` as an event, for a page that sets the method itself: `.success(*page.after_plugin())`
        (rather than on `change`, which could read the model and dataset before that update reached them)."""
        return self.event(choose_plugin, ["plugin", "dataset", "model"],
                          ["description", "dataset", "model", *(f"form:{fid}" for fid in self.forms)])


def build(ui: UI) -> TrainPage:
    """The page's layout; `wire` connects its events to the handlers."""
    found, broken = plugins.discover(ui.settings)
    found = {k: p for k, p in found.items() if p.kind != "tool"}  # exports and imports start on the Models page
    ids = list(found)
    first = "sft" if "sft" in found else (ids[0] if ids else None)  # the method most people start with
    page = TrainPage(ui, found, {}, trackers.parse(ui.settings.report_to) or [])
    w, parts = page.w, page.parts
    w["experiment"] = ui["experiment"]
    with gr.Row():
        w["plugin"] = gr.Dropdown(label=jobspec.meta("plugin")["label"], choices=[
            (f"{p.id}: {p.description}", p.id) for p in found.values()], value=first, scale=3)
        w["priority"] = spec_widget("priority", page.default_trackers)
    parts["description"] = gr.Markdown(value=_describe(found[first]) if first else "No plugins are installed.")
    with gr.Row():
        w["model"] = gr.Dropdown(label="Base model: a registered model or an earlier run's output", choices=[],
                                 value=None, scale=1, elem_id="train-model", allow_custom_value=True)
        # their choices change with the method (and from other pages): an event may carry the old value with the
        # new choices, which must not be an error toast; what is launched is checked by the queue
        w["dataset"] = gr.Dropdown(label="Dataset (only formats this method accepts)", choices=[], value=None,
                                   scale=1, elem_id="train-dataset", allow_custom_value=True)
    for pid, p in found.items():
        with gr.Column(visible=pid == first) as group:
            page.forms[pid] = forms.build(p)
        parts[f"form:{pid}"] = group
        parts.update({f"{pid}.{n}": c for n, c in zip(page.forms[pid].names, page.forms[pid].components,
                                                      strict=True)})
    # each form's current values, per session: a form's own changes update its entry (sending that form alone),
    # and the estimate reads the chosen plugin's entry; Launch, the sweep and saving a config are sent the fields
    # themselves, as a click can reach the server before the change that typed its last value
    w["held"] = gr.State({fid: form.fill({}) for fid, form in page.forms.items()})
    with gr.Row(equal_height=True):
        with gr.Column(scale=3):
            parts["command"] = gr.Code(label="The same job from the command line", language="shell",
                                       interactive=False, elem_id="train-command", wrap_lines=True, lines=1)
        with gr.Column(scale=2):
            parts["estimate"] = gr.Markdown(elem_id="train-estimate")
    evaluators = [p for p in found.values() if p.kind == "eval"]
    with gr.Accordion("Evaluate after training, sweeps and groups", open=False):
        with gr.Row():
            w["then_eval"] = gr.Dropdown(label=jobspec.meta("then_eval")["label"], choices=[("none", "")] + [
                (f"{p.id}: {p.description}", p.id) for p in evaluators], value="", scale=2)
            w["eval_dataset"] = gr.Dropdown(label="Its dataset", choices=[], value=None, scale=1)
            w["eval_params"] = gr.Textbox(label="Its parameters: one `key=value` per line", lines=2, scale=1,
                                          placeholder="limit=200", elem_id="train-eval-params")
        with gr.Row():
            for name in section_fields(jobspec.GROUPING):
                w[name] = spec_widget(name, page.default_trackers)
        with gr.Row():
            parts["grid"] = gr.Textbox(label="Sweep grid: one `parameter=value1,value2` per line; every combination "
                                       "is queued as one group", lines=3, scale=3,
                                       placeholder="learning_rate=1e-4,2e-4\nlora_r=8,16")
            parts["sweep"] = gr.Button("Launch sweep", scale=1, elem_id="launch-sweep")
    for section in (jobspec.RESOURCES, jobspec.CLUSTER):
        with gr.Accordion(section, open=False), gr.Row():
            for name in section_fields(section):
                w[name] = spec_widget(name, page.default_trackers)
    with gr.Accordion("Run config file (YAML)", open=False), gr.Row():
        parts["save_config"] = gr.Button("Save this form as a run config", scale=1, elem_id="train-save-config")
        parts["config_out"] = gr.File(label="Run config (`lab run --config FILE`)", interactive=False, scale=2,
                                      elem_id="train-config-file")
        parts["load_config"] = gr.File(label="Load a run config", file_types=[".yaml", ".yml", ".json"],
                                       type="filepath", scale=2, elem_id="train-load-config")
    parts["launch"] = gr.Button("Launch", variant="primary", elem_id="launch")
    parts["message"] = gr.HTML(elem_id="train-message")
    if broken:
        gr.Markdown("Plugins that failed to load: " + "; ".join(md(b) for b in broken))
    assert set(w) == set(NAMED), set(w) ^ set(NAMED)
    wire(page)
    return page


def wire(page: TrainPage) -> None:
    """The page's events, each a handler below by the names it reads and answers."""
    ui, w, parts = page.ui, page.w, page.parts
    pickers = [c for form in page.forms.values() for c, _ in form.model_pickers]

    def refresh(v: dict) -> dict:
        models, fitting = refresh_choices(ui, v[w["plugin"]])
        return {w["model"]: models, w["dataset"]: fitting, **dict(zip(pickers, picker_updates(page), strict=True))}

    ui.on_refresh(refresh, [w["model"], w["dataset"], *pickers], inputs=[w["plugin"]])
    for fid, form in page.forms.items():
        gr.on([c.change for c in form.components], functools.partial(hold, fid), [w["held"], *form.components],
              [w["held"]], show_progress="hidden", concurrency_id="train-form", queue=True)
    w["plugin"].input(*page.after_plugin())  # on the user's choice
    page.on(functools.partial(gr.on, [c.change for c in w.values()]), command_and_estimate,
            list(NAMED), ["command", "estimate"],
            trigger_mode="always_last", show_progress="hidden")
    page.on(parts["launch"].click, launch, list(NAMED), ["message", "tabs", "run_job"], with_fields=True,
            concurrency_id="train-form")
    ui["compare_after"](page.on(parts["sweep"].click, sweep, [*NAMED, "grid"],
                                ["message", "tabs", "compare_group", "compare_runs"], with_fields=True,
                                concurrency_id="train-form"))
    page.on(parts["save_config"].click, save_config, [*NAMED, "grid"], ["message", "config_out"], with_fields=True)
    page.on(parts["load_config"].upload, load_config, ["load_config", "held"],
            ["message", *page.filled_names(), "grid"]).success(*page.after_plugin())
    # on the user's choice only: a fill (Clone, a loaded config) sets the dataset with the evaluator itself
    page.on(w["then_eval"].input, choose_evaluator, ["then_eval", "eval_dataset"], ["eval_dataset"])


# --- handlers: (page, named values) -> {name: value} --------------------------------------------------------------


def hold(fid: str, held: dict | None, *values) -> dict:
    """A form's own change: its entry in `held` (the chosen plugin's is what the estimate reads)."""
    return {**(held or {}), fid: list(values)}


def choose_plugin(page: TrainPage, v: dict) -> dict:
    """The method's form shown, its description, and the models and datasets it takes (a value kept when still
    offered, or the only choice)."""
    p = page.found[v["plugin"]]
    fitting = choices.datasets(page.ui, p.accepts)
    models = model_choices(page.ui, p)
    names = [name for _, name in models]
    return {**{f"form:{fid}": gr.update(visible=fid == p.id) for fid in page.forms}, "description": _describe(p),
            "dataset": gr.update(choices=fitting, value=_kept_or_only(v.get("dataset"), fitting),
                                 visible=p.needs_dataset),
            "model": gr.update(visible=bool(p.needs_model), label=_model_label(p), choices=models,
                               value=_kept_or_only(v.get("model"), names))}


def command_and_estimate(page: TrainPage, v: dict) -> dict:
    """The command line and the estimate for the form as it is. It leaves the launch message alone: a late
    estimate must not wipe out the answer to a launch made after it."""
    if not v.get("plugin"):
        return {"command": "", "estimate": ""}
    try:
        spec = page.spec(v)
    except LabError as exc:
        return {"command": "", "estimate": error_box(str(exc))}
    return {"command": jobspec.command_line(spec), "estimate": estimate_text(page.ui, page.found, spec)}


def refused(exc: LabError) -> dict:
    return {"message": problems_box(exc, "Nothing was queued.")}


def launch(page: TrainPage, v: dict) -> dict:
    """The form queued as one job; the page then opens its run."""
    try:
        spec = page.spec(v)
        missing(page.found, spec)
        job_id = runs.submit(page.ui.settings, spec)
    except LabError as exc:
        return refused(exc)
    return {"message": "", "tabs": gr.update(selected="run"), "run_job": job_id}


def _grid(v: dict) -> dict:
    return runs.parse_grid([line for line in (v.get("grid") or "").splitlines() if line.strip()])


def sweep(page: TrainPage, v: dict) -> dict:
    """Every combination of the grid queued as one group; the page then compares them."""
    try:
        spec = page.spec(v)
        missing(page.found, spec)
        group_name, ids = runs.sweep(page.ui.settings, spec, _grid(v))
    except LabError as exc:
        return refused(exc)
    options = [(f"#{i} {spec.plugin} {spec.model or ''}".strip(), str(i)) for i in ids]
    return {"message": "", "tabs": gr.update(selected="compare"),
            "compare_group": gr.update(choices=["all", group_name], value=group_name),
            "compare_runs": gr.update(choices=options, value=[x for _, x in options])}


def save_config(page: TrainPage, v: dict) -> dict:
    """The form (and its sweep grid) as a run config file to download."""
    import tempfile

    try:
        spec = page.spec(v)
        p = page.found[spec.plugin]  # the grid's values typed (and checked) by the plugin's parameters
        axes = {k: [getattr(plugins.validate_params(p, {**spec.params, k: x}), k) for x in xs]
                for k, xs in _grid(v).items()}
    except LabError as exc:
        return {**refused(exc), "config_out": None}
    folder = Path(tempfile.mkdtemp(prefix="lab-config-"))
    name = f"{spec.plugin}-{spec.model or 'model'}-{spec.dataset or 'data'}.yaml".replace("/", "-")
    (folder / name).write_text(jobspec.to_config(spec, axes or None))
    return {"message": "", "config_out": str(folder / name)}


def fill(page: TrainPage, spec: jobspec.JobSpec, held: dict | None) -> dict:
    """Updates that put `spec` in the form (Clone on the Jobs page, a loaded config), by the names of FILLED and
    the chosen form's fields."""
    values = filled(spec, page.forms, page.default_trackers, held)
    out = {n: gr.update(value=values[n]) for n in NAMED if n not in ("experiment", "eval_dataset")}
    out["eval_dataset"] = choose_evaluator(page, {"then_eval": values["then_eval"],
                                                  "eval_dataset": values["eval_dataset"]})["eval_dataset"]
    form = page.forms[spec.plugin]
    out.update({f"{spec.plugin}.{n}": gr.update(value=x) for n, x in zip(form.names, values["form"], strict=True)})
    active = active_experiments(page.ui)
    if spec.experiment in active:  # the run lands where the job did; else in the current experiment
        out["experiment"] = gr.update(choices=active, value=spec.experiment)
    return out


def active_experiments(ui: UI) -> list[str]:
    return [e["name"] for e in experiments.list_all(ui.settings) if not e["archived"]]


def load_config(page: TrainPage, v: dict) -> dict:
    """The form filled from an uploaded run config: method, model, dataset, parameters, resources, follow-up."""
    from lab import run_config

    if not v.get("load_config"):
        return {"message": ""}
    try:
        path = uploaded(v["load_config"])
        cfg = run_config.load(path)
        pid = cfg.spec.get("plugin")
        if pid not in page.found:
            raise LabError(f"{path.name} names the plugin {pid!r}, which this lab does not have"
                           if pid else f"{path.name} names no plugin")
        spec = jobspec.JobSpec.of(cfg.spec, path.name)
        plugins.validate_params(page.found[pid], dict(spec.params))
    except LabError as exc:
        return {"message": problems_box(exc, "The form was not changed.")}
    lines = [f"{k}={','.join(map(str, x))}" for k, x in (cfg.grid or {}).items()]
    elsewhere = ("" if spec.experiment in active_experiments(page.ui) else
                 f" Its experiment {spec.experiment} is not an active one here: the run goes into the current "
                 "experiment.")
    return {"message": ok_box(f"Loaded {path.name}: check the form, then Launch.{elsewhere}"),
            **fill(page, spec, v.get("held")), **({"grid": "\n".join(lines)} if lines else {})}


def choose_evaluator(page: TrainPage, v: dict) -> dict:
    """The follow-up evaluation's datasets: those its plugin reads."""
    evaluator = v.get("then_eval")
    accepts = page.found[evaluator].accepts if evaluator in page.found else ()
    fitting = choices.datasets(page.ui, accepts) if evaluator else []
    current = v.get("eval_dataset")
    return {"eval_dataset": gr.update(choices=fitting, value=current if current in fitting else None)}


def open_with(page: TrainPage, plugin: str, dataset: str, model: str | None) -> dict:
    """The Train page opened on `plugin` with `dataset` (and `model` where it is registered), from another page
    (Rank, Playground): the choices go with the values, as a value outside its dropdown's choices is an error on
    the next event. Follow it with `page.after_plugin()`."""
    fitting = choices.datasets(page.ui, page.found[plugin].accepts) if plugin in page.found else [dataset]
    models = [m["name"] for m in registry.list_all(page.ui.settings)]
    return {"tabs": gr.update(selected="train"), "plugin": plugin,
            "dataset": gr.update(choices=fitting, value=dataset),
            "model": gr.update(choices=choices.models(page.ui), value=model) if model in models else gr.update()}


def estimate_text(ui: UI, found: dict, spec: jobspec.JobSpec) -> str:
    """The rough cost of a spec (or what a job that trains nothing will do instead), as Markdown."""
    pid, model_name, ds_name = spec.plugin, spec.model, spec.dataset
    resolved = plugins.validate_params(found[pid], spec.params)
    plan = getattr(found[pid].module, "plan", None)
    if plan is not None and (ds_name or found[pid].dataset_optional):  # a job that trains nothing says what it
        try:  # will do instead
            return plan(resolved, datasets.info(ui.settings, ds_name) if ds_name else None)
        except Exception as exc:  # a courtesy, like the estimate
            return f"No estimate: {md(exc)}"
    if not (model_name and ds_name):
        return "Pick a model and a dataset to see the estimate."
    try:
        est = preview.estimate(ui.settings, model_name, ds_name, resolved.model_dump(), method=pid)
    except Exception as exc:  # an estimate is a courtesy: never block the form
        return f"No estimate: {md(exc)}"
    return memory_text(est, pid) + truncation_warning(ui, pid, model_name, ds_name, resolved.model_dump())


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def memory_text(est: dict, pid: str) -> str:
    """Whether the run fits this machine's memory, with its numbers: the parts of the estimate, the worst step it
    was made for, and what to change when it is tight."""
    from lab.memory import NAMES

    parts = ", ".join(f"{NAMES[k]} {_size(v)}" for k, v in est["parts"].items() if v)
    label = {"fits": "Fits", "tight": "Tight", "does not fit": "Does not fit", "unknown": "Memory"}[est["verdict"]]
    of = f" of {_size(est['available_gb'] * 1e9)} available" if est["available_gb"] else ""
    how = " with gradient checkpointing (an estimate not measured yet)" if est["checkpointing"] else ""
    text = (f"**{label}**: about **{_size(est['memory_gb'] * 1e9)}**{of} at the worst step ({est['worst_step']})"
            f"{how}: {parts}.")
    if est["verdict"] in ("tight", "does not fit") and est["remedies"]:
        text += " To need less: " + "; ".join(est["remedies"]) + "."
    if est["verdict"] == "does not fit" and est["total_gb"] and est["memory_gb"] <= est["total_gb"]:
        text += (f" It would fit this machine's {_size(est['total_gb'] * 1e9)} once other programs and jobs free "
                 "theirs: Launch queues it.")
    rows = "pairs (chosen and rejected)" if pid in preview.PAIR_METHODS else "rows"
    return text + (f"\n\n**{est['tokens_per_step']:,} tokens per step** ({rows} average "
                   f"{est['mean_row_tokens']:.0f} tokens), {est['trainable_parameters']:,} trainable of "
                   f"{est['parameters']:,} parameters.")


def truncation_warning(ui: UI, pid, model_name, ds_name, params) -> str:
    """Rows (sft) or pairs (dpo, kto, reward, orpo) that max_length leaves nothing to learn from, counted by the
    trainer's own preparation."""
    if pid not in ("sft", *preview.PAIR_METHODS) or "max_length" not in params:
        return ""
    try:
        found = preview.truncation(ui.settings, model_name, ds_name, params, method=pid)
    except Exception as exc:  # a courtesy, like the estimate
        return f"\n\nNo truncation check: {md(exc)}"
    if not found or not found["lost"]:
        return ""
    unit = found["unit"]
    of = (f"{found['checked']:,} {unit} checked (the first of {found['rows']:,})"
          if found["checked"] < found["rows"] else f"{found['rows']:,} {unit}")
    if found["lost"] == found["checked"]:
        return (f"\n\n**Every one of the {unit} loses all its trained tokens to max_length="
                f"{found['max_length']}** ({of}): nothing would be learned. Raise max_length.")
    rows = ", ".join(str(i + 1) for i in found["first_lost"])
    return (f"\n\n**Warning: {found['lost']:,} of {of} lose all their trained tokens to "
            f"max_length={found['max_length']}** and are dropped from training (rows {rows}"
            f"{', ...' if found['lost'] > len(found['first_lost']) else ''}). Raise max_length to keep them.")


def _model_label(p: plugins.Plugin) -> str:
    if p.needs_model == "optional":
        return "Model to continue from (optional: leave empty to start from scratch)"
    return "Base model: a registered model or an earlier run's output"


def _describe(p: plugins.Plugin) -> str:
    accepts = ", ".join(p.accepts) or "no dataset"
    return f"**{md(p.id)}** ({p.kind}): {md(p.description)} Accepts: {md(accepts)}. Example: `{p.example}`"


def picker_updates(page: TrainPage) -> list:
    """Fresh choices for the form fields that name a model of some kind (e.g. a PPO run's reward model)."""
    models = registry.list_all(page.ui.settings)
    return [gr.update(choices=([] if getattr(c, "multiselect", False) else [""])
                      + [m["name"] for m in models if kind is None or m["kind"] in kind.split("|")])
            for form in page.forms.values() for c, kind in form.model_pickers]


def _kept_or_only(value, names: list[str]):
    """A dropdown's value after its choices change: kept when still offered, else the one choice if only one."""
    return value if value in names else (names[0] if len(names) == 1 else None)


def model_choices(ui: UI, p: plugins.Plugin | None) -> list[tuple[str, str]]:
    optional = [("(none: start from scratch)", "")] if p is not None and p.needs_model == "optional" else []
    return optional + choices.models(ui)


def refresh_choices(ui: UI, pid: str | None):
    """Model and dataset choices for the current plugin (called on page load and after imports)."""
    found, _ = plugins.discover(ui.settings)
    p = found.get(pid)
    models, fitting = model_choices(ui, p), choices.datasets(ui, p.accepts if p else None)
    only = {"value": models[0][1]} if len(models) == 1 else {}
    return (gr.update(choices=models, **only),
            gr.update(choices=fitting, **({"value": fitting[0]} if len(fitting) == 1 else {})))
