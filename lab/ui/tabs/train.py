"""Train: pick a plugin, its model and dataset, fill the form generated from its Params, see the equivalent
command line and a rough cost, launch into the queue and land on the run. Where the page becomes a job:
`spec_from_form` (the form's named values as a lab.jobspec.JobSpec); the fields beyond method, model, dataset and
parameters are widgets generated from the spec's options (`spec_widget`)."""

from __future__ import annotations

import json
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


def build(ui: UI) -> None:
    found, broken = plugins.discover(ui.settings)
    found = {k: p for k, p in found.items() if p.kind != "tool"}  # exports and imports start on the Models page
    ids = list(found)
    first = "sft" if "sft" in found else (ids[0] if ids else None)  # the method most people start with
    default_trackers = trackers.parse(ui.settings.report_to) or []
    w: dict[str, gr.components.Component] = {"experiment": ui["experiment"]}  # the spec's widgets, by field name
    with gr.Row():
        w["plugin"] = gr.Dropdown(label=jobspec.meta("plugin")["label"], choices=[
            (f"{p.id}: {p.description}", p.id) for p in found.values()], value=first, scale=3)
        w["priority"] = spec_widget("priority", default_trackers)
    description = gr.Markdown(value=_describe(found[first]) if first else "No plugins are installed.")
    with gr.Row():
        w["model"] = gr.Dropdown(label="Base model: a registered model or an earlier run's output", choices=[],
                                 value=None, scale=1, elem_id="train-model", allow_custom_value=True)
        # their choices change with the method (and from other pages): an event may carry the old value with the
        # new choices, which must not be an error toast; what is launched is checked by the queue
        w["dataset"] = gr.Dropdown(label="Dataset (only formats this method accepts)", choices=[], value=None,
                                   scale=1, elem_id="train-dataset", allow_custom_value=True)
    form_of: dict[str, forms.Form] = {}
    groups = []
    for pid, p in found.items():
        with gr.Column(visible=pid == first) as group:
            form_of[pid] = forms.build(p)
        groups.append(group)
    all_fields = [c for f in form_of.values() for c in f.components]
    # each form's current values, per session: a form's own changes update its entry (sending that form alone),
    # and the estimate reads the chosen plugin's entry; Launch, the sweep and saving a config are sent the fields
    # themselves, as a click can reach the server before the change that typed its last value
    w["held"] = gr.State({fid: form.fill({}) for fid, form in form_of.items()})
    with gr.Row(equal_height=True):
        with gr.Column(scale=3):
            command = gr.Code(label="The same job from the command line", language="shell", interactive=False,
                              elem_id="train-command", wrap_lines=True, lines=1)
        with gr.Column(scale=2):
            estimate = gr.Markdown(elem_id="train-estimate")
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
                w[name] = spec_widget(name, default_trackers)
        with gr.Row():
            grid = gr.Textbox(label="Sweep grid: one `parameter=value1,value2` per line; every combination is queued "
                              "as one group", lines=3, placeholder="learning_rate=1e-4,2e-4\nlora_r=8,16", scale=3)
            sweep = gr.Button("Launch sweep", scale=1, elem_id="launch-sweep")
    for section in (jobspec.RESOURCES, jobspec.CLUSTER):
        with gr.Accordion(section, open=False), gr.Row():
            for name in section_fields(section):
                w[name] = spec_widget(name, default_trackers)
    with gr.Accordion("Run config file (YAML)", open=False), gr.Row():
        save_config = gr.Button("Save this form as a run config", scale=1, elem_id="train-save-config")
        config_out = gr.File(label="Run config (`lab run --config FILE`)", interactive=False, scale=2,
                             elem_id="train-config-file")
        load_config = gr.File(label="Load a run config", file_types=[".yaml", ".yml", ".json"], type="filepath",
                              scale=2, elem_id="train-load-config")
    launch = gr.Button("Launch", variant="primary", elem_id="launch")
    message = gr.HTML(elem_id="train-message")
    if broken:
        gr.Markdown("Plugins that failed to load: " + "; ".join(md(b) for b in broken))
    assert set(w) == set(NAMED), set(w) ^ set(NAMED)
    ui.c.update(train_plugin=w["plugin"], train_model=w["model"], train_dataset=w["dataset"])
    ui["train_forms"] = form_of
    ui["train_pickers"] = [p for form in form_of.values() for p in form.model_pickers]
    pickers = [c for c, _ in ui["train_pickers"]]

    def refresh(v: dict) -> dict:
        models, fitting = refresh_choices(ui, v[w["plugin"]])
        return {w["model"]: models, w["dataset"]: fitting, **dict(zip(pickers, picker_updates(ui), strict=True))}

    ui.on_refresh(refresh, [w["model"], w["dataset"], *pickers], inputs=[w["plugin"]])
    inputs = set(w.values())

    def named(data: dict) -> dict:
        """The handler's dict of component -> value, by field name. Where the handler was sent the forms' fields
        themselves (Launch, sweep, save), they win over `held`, whose update may still wait behind another event."""
        v = {name: data[c] for name, c in w.items() if c in data}
        if all_fields[0] in data:
            v["held"] = {fid: [data[c] for c in form.components] for fid, form in form_of.items()}
        return v

    def spec_of_form(data: dict) -> jobspec.JobSpec:
        return spec_from_form(named(data), found, form_of, default_trackers)

    for fid, form in form_of.items():
        def capture(held, *vals, fid=fid):
            return {**(held or {}), fid: list(vals)}

        gr.on([c.change for c in form.components], capture, [w["held"], *form.components], [w["held"]],
              show_progress="hidden", concurrency_id="train-form", queue=True)

    def on_plugin(pid, ds_name, model_name):
        p = found[pid]
        fitting = choices.datasets(ui, p.accepts)
        models = model_choices(ui, p)
        names = [name for _, name in models]
        return ([gr.update(visible=fid == pid) for fid in form_of]
                + [_describe(p), gr.update(choices=fitting, value=_kept_or_only(ds_name, fitting),
                                           visible=p.needs_dataset),
                   gr.update(visible=bool(p.needs_model), label=_model_label(p), choices=models,
                             value=_kept_or_only(model_name, names))])

    # on the user's choice; a page that sets the method itself runs this after its own update (`ui["train_after"]`)
    # rather than on `change`, which could read the model and dataset before that update reached them
    after = (on_plugin, [w["plugin"], w["dataset"], w["model"]], [*groups, description, w["dataset"], w["model"]])
    w["plugin"].input(*after)
    ui["train_after"] = after

    def on_preview(data: dict):
        """The command line and the estimate for the form as it is. It leaves the launch message alone: a late
        estimate must not wipe out the answer to a launch made after it."""
        if not named(data).get("plugin"):
            return "", ""
        try:
            spec = spec_of_form(data)
        except LabError as exc:
            return "", error_box(str(exc))
        return jobspec.command_line(spec), estimate_text(ui, found, spec)

    gr.on([c.change for c in w.values()], on_preview, inputs, [command, estimate], trigger_mode="always_last",
          show_progress="hidden")
    ui["train_preview"] = (on_preview, inputs, [command, estimate])

    def refused(exc: LabError) -> str:
        return problems_box(exc, "Nothing was queued.")

    def on_launch(data: dict):
        try:
            spec = spec_of_form(data)
            missing(found, spec)
            job_id = runs.submit(ui.settings, spec)
        except LabError as exc:
            return refused(exc), gr.update(), gr.update()
        return "", gr.update(selected="run"), job_id

    launch.click(on_launch, {*inputs, *all_fields}, [message, ui["tabs"], ui["run_job"]], concurrency_id="train-form")

    def on_sweep(data: dict):
        try:
            spec = spec_of_form(data)
            missing(found, spec)
            axes = runs.parse_grid([line for line in (data[grid] or "").splitlines() if line.strip()])
            group_name, ids = runs.sweep(ui.settings, spec, axes)
        except LabError as exc:
            return refused(exc), gr.update(), gr.update(), gr.update()
        options = [(f"#{i} {spec.plugin} {spec.model or ''}".strip(), str(i)) for i in ids]
        return ("", gr.update(selected="compare"), gr.update(choices=["all", group_name], value=group_name),
                gr.update(choices=options, value=[v for _, v in options]))

    sweep.click(on_sweep, {*inputs, *all_fields, grid}, [message, ui["tabs"], ui["compare_group"], ui["compare_runs"]],
                concurrency_id="train-form")

    def on_save_config(data: dict):
        import tempfile

        try:
            spec = spec_of_form(data)
            axes = runs.parse_grid([line for line in (data[grid] or "").splitlines() if line.strip()])
        except LabError as exc:
            return refused(exc), None
        folder = Path(tempfile.mkdtemp(prefix="lab-config-"))
        name = f"{spec.plugin}-{spec.model or 'model'}-{spec.dataset or 'data'}.yaml".replace("/", "-")
        (folder / name).write_text(jobspec.to_config(spec, axes or None))
        return "", str(folder / name)

    save_config.click(on_save_config, {*inputs, *all_fields, grid}, [message, config_out])

    fill_outputs = [w[n] for n in NAMED] + all_fields

    def fill(spec: jobspec.JobSpec, held: dict | None) -> dict:
        """Component updates that put `spec` in the form (Clone on the Jobs page, a loaded config)."""
        values = filled(spec, form_of, default_trackers, held)
        out = {w[n]: gr.update(value=values[n]) for n in NAMED if n not in ("experiment", "eval_dataset")}
        out[w["eval_dataset"]] = on_evaluator(values["then_eval"], values["eval_dataset"])
        out.update(zip(form_of[spec.plugin].components, (gr.update(value=v) for v in values["form"]), strict=True))
        active = active_experiments()
        if spec.experiment in active:  # the run lands where the job did; else in the current experiment
            out[w["experiment"]] = gr.update(choices=active, value=spec.experiment)
        return out

    def active_experiments() -> list[str]:
        return [e["name"] for e in experiments.list_all(ui.settings) if not e["archived"]]

    ui["train_fill"] = (fill, fill_outputs, w["held"])

    def on_load_config(file, held):
        """The form filled from a run config: method, model, dataset, parameters, resources, follow-up."""
        from lab import run_config

        if not file:
            return {message: ""}
        try:
            path = uploaded(file)
            cfg = run_config.load(path)
            pid = cfg.spec.get("plugin")
            if pid not in found:
                raise LabError(f"{path.name} names the plugin {pid!r}, which this lab does not have"
                               if pid else f"{path.name} names no plugin")
            spec = jobspec.JobSpec.of(cfg.spec, path.name)
            plugins.validate_params(found[pid], dict(spec.params))
        except LabError as exc:
            return {message: problems_box(exc, "The form was not changed.")}
        lines = [f"{k}={','.join(map(str, v))}" for k, v in (cfg.grid or {}).items()]
        elsewhere = ("" if spec.experiment in active_experiments() else
                     f" Its experiment {spec.experiment} is not an active one here: the run goes into the current "
                     "experiment.")
        return {message: ok_box(f"Loaded {path.name}: check the form, then Launch.{elsewhere}"), **fill(spec, held),
                **({grid: "\n".join(lines)} if lines else {})}

    load_config.upload(on_load_config, [load_config, w["held"]], [message, *fill_outputs, grid]).success(*after)

    def on_evaluator(evaluator, current=None):
        accepts = found[evaluator].accepts if evaluator in found else ()
        fitting = choices.datasets(ui, accepts) if evaluator else []
        return gr.update(choices=fitting, value=current if current in fitting else None)

    # on the user's choice only: a fill (Clone, a loaded config) sets the dataset with the evaluator itself
    w["then_eval"].input(on_evaluator, [w["then_eval"], w["eval_dataset"]], [w["eval_dataset"]])


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
        est = preview.estimate(ui.settings, model_name, ds_name, resolved.model_dump())
    except Exception as exc:  # an estimate is a courtesy: never block the form
        return f"No estimate: {md(exc)}"
    gb = est["memory_gb"]
    memory = f"{gb:.1f} GB" if gb >= 1 else f"{gb * 1000:.0f} MB"
    rows = "pairs (chosen and rejected)" if pid in preview.PAIR_METHODS else "rows"
    text = (f"**Rough estimate**: about **{memory}** of memory, "
            f"**{est['tokens_per_step']:,} tokens per step** ({rows} average {est['mean_row_tokens']:.0f} "
            f"tokens), {est['trainable_parameters']:,} trainable of {est['parameters']:,} parameters.")
    return text + truncation_warning(ui, pid, model_name, ds_name, resolved.model_dump())


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


def picker_updates(ui: UI) -> list:
    """Fresh choices for the form fields that name a model of some kind (e.g. a PPO run's reward model)."""
    models = registry.list_all(ui.settings)
    return [gr.update(choices=([] if getattr(c, "multiselect", False) else [""])
                      + [m["name"] for m in models if kind is None or m["kind"] in kind.split("|")])
            for c, kind in ui["train_pickers"]]


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
