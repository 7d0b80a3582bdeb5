"""Train: pick a plugin, its model and dataset, fill the form generated from its Params, see the equivalent
command line and a rough cost, launch into the queue and land on the run."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from lab import datasets, plugins, preview, registry, runs, trackers
from lab.errors import LabError
from lab.ui import forms
from lab.ui.common import UI
from lab.ui.html import error_box, md, ok_box, problems_box
from lab.ui.tabs import datasets as datasets_tab
from lab.ui.tabs import models as models_tab


def build(ui: UI) -> None:
    found, broken = plugins.discover(ui.settings)
    ids = list(found)
    first = "sft" if "sft" in found else (ids[0] if ids else None)  # the method most people start with
    with gr.Row():
        plugin = gr.Dropdown(label="Method (plugin)", choices=[(f"{p.id}: {p.description}", p.id)
                                                                for p in found.values()], value=first, scale=3)
        priority = gr.Number(label="Priority", value=0, precision=0, info="higher runs first", scale=1)
    description = gr.Markdown(value=_describe(found[first]) if first else "No plugins are installed.")
    with gr.Row():
        model = gr.Dropdown(label="Base model: a registered model or an earlier run's output", choices=[],
                            value=None, scale=1, elem_id="train-model", allow_custom_value=True)
        # their choices change with the method (and from other pages): an event may carry the old value with the
        # new choices, which must not be an error toast; what is launched is checked by the queue
        dataset = gr.Dropdown(label="Dataset (only formats this method accepts)", choices=[], value=None, scale=1,
                              elem_id="train-dataset", allow_custom_value=True)
    form_of: dict[str, forms.Form] = {}
    groups = []
    for pid, p in found.items():
        with gr.Column(visible=pid == first) as group:
            form_of[pid] = forms.build(p)
        groups.append(group)
    all_fields = [c for f in form_of.values() for c in f.components]
    # each form's current values, per session: a form's own changes update its entry (sending that form alone),
    # and the estimate, Launch and the sweep read the chosen plugin's entry: no event sends every form's fields
    values_of = gr.State({fid: form.fill({}) for fid, form in form_of.items()})
    with gr.Row(equal_height=True):
        with gr.Column(scale=3):
            command = gr.Code(label="The same job from the command line", language="shell", interactive=False,
                              elem_id="train-command", wrap_lines=True, lines=1)
        with gr.Column(scale=2):
            estimate = gr.Markdown(elem_id="train-estimate")
    evaluators = [p for p in found.values() if p.kind == "eval"]
    with gr.Accordion("Evaluate after training, and sweeps", open=False):
        with gr.Row():
            then_eval = gr.Dropdown(label="Evaluation to queue on the output when the run completes",
                                    choices=[("none", "")] + [(f"{p.id}: {p.description}", p.id) for p in evaluators],
                                    value="", scale=2)
            eval_dataset = gr.Dropdown(label="Its dataset", choices=[], value=None, scale=1)
        with gr.Row():
            grid = gr.Textbox(label="Sweep grid: one `parameter=value1,value2` per line; every combination is queued",
                              lines=3, placeholder="learning_rate=1e-4,2e-4\nlora_r=8,16", scale=3)
            group = gr.Textbox(label="Group name (optional)", scale=1)
            sweep = gr.Button("Launch sweep", scale=1, elem_id="launch-sweep")
    with gr.Accordion("Resources and retries", open=False), gr.Row():
        processes = gr.Number(label="Processes", value=1, precision=0, minimum=1, maximum=64, scale=1,
                              info="more than 1: data-parallel under torchrun (sft, pretrain, classify)")
        devices = gr.Dropdown(label="Accelerators", choices=[("auto", "auto")] + [(str(n), str(n))
                                                                                 for n in range(9)],
                              value="auto", scale=1,
                              info="auto: one per process on a worker with GPUs (`lab worker --gpus`), else CPU")
        attempts = gr.Number(label="Attempts", value=1, precision=0, minimum=1, maximum=20, scale=1,
                             info="a killed or lost job is retried from its last checkpoint")
        time_limit = gr.Number(label="Time limit (minutes)", value=None, minimum=0, scale=1,
                               info="0: none; past it the job writes a checkpoint and stops (`timeout`)")
        default_trackers = trackers.parse(ui.settings.report_to) or []
        report_to = gr.CheckboxGroup(list(trackers.TRACKERS), value=default_trackers, label="Report to", scale=2,
                                     elem_id="train-report-to",
                                     info="experiment trackers beside the lab's own charts; files in the run folder")
    with gr.Accordion("Cluster (Slurm)", open=False), gr.Row():
        nodes = gr.Number(label="Nodes", value=1, precision=0, minimum=1, maximum=1024, scale=1,
                          info="more than 1: data-parallel over that many nodes; a Slurm worker runs it "
                               "(`lab worker --executor slurm`)")
        memory = gr.Number(label="Memory per node (GB)", value=None, minimum=0, scale=1,
                           info="a Slurm job's --mem; empty: LAB_SLURM_MEMORY_GB or the cluster's default")
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
    ui.c.update(train_plugin=plugin, train_model=model, train_dataset=dataset, train_priority=priority)
    ui["train_fields"], ui["train_forms"] = all_fields, form_of
    ui["train_pickers"] = [p for form in form_of.values() for p in form.model_pickers]

    def split(pid: str, held: dict) -> dict:
        """The chosen plugin's parameter values, as its form holds them."""
        if pid not in form_of:
            raise LabError(f"unknown plugin {pid!r}")
        return form_of[pid].values(list((held or {}).get(pid) or form_of[pid].fill({})))

    for fid, form in form_of.items():
        def capture(held, *vals, fid=fid):
            return {**(held or {}), fid: list(vals)}

        gr.on([c.change for c in form.components], capture, [values_of, *form.components], [values_of],
              show_progress="hidden", concurrency_id="train-form", queue=True)

    def on_plugin(pid, ds_name, model_name):
        p = found[pid]
        fitting = datasets_tab.names(ui, p.accepts)
        models = model_choices(ui, p)
        names = [name for _, name in models]
        return ([gr.update(visible=fid == pid) for fid in form_of]
                + [_describe(p), gr.update(choices=fitting, value=_kept_or_only(ds_name, fitting),
                                           visible=p.needs_dataset),
                   gr.update(visible=bool(p.needs_model), label=_model_label(p), choices=models,
                             value=_kept_or_only(model_name, names))])

    # on the user's choice; a page that sets the method itself runs this after its own update (`ui["train_after"]`)
    # rather than on `change`, which could read the model and dataset before that update reached them
    plugin.input(on_plugin, [plugin, dataset, model], [*groups, description, dataset, model])
    ui["train_after"] = (on_plugin, [plugin, dataset, model], [*groups, description, dataset, model])

    def on_preview(n_processes, n_devices, n_attempts, n_minutes, tracked, n_nodes, n_memory, evaluator, eval_ds,
                   pid, model_name, ds_name, prio, experiment, values):
        """The command line and the estimate for the form as it is. It leaves the launch message alone: a late
        estimate must not wipe out the answer to a launch made after it."""
        if not pid:
            return "", ""
        try:
            params = split(pid, values)
            resolved = plugins.validate_params(found[pid], params)
        except LabError as exc:
            return "", error_box(str(exc))
        changed = resolved.model_dump(mode="json", exclude_defaults=True)
        try:
            extra = resources(n_processes, n_devices, n_attempts, n_minutes, tracked, n_nodes, n_memory)
        except (TypeError, ValueError):
            extra = {}
        cmd = runs.command_line(pid, changed, model_name, ds_name, experiment or "default", int(prio or 0),
                                then_eval=follow_up(evaluator, eval_ds), **extra)
        plan = getattr(found[pid].module, "plan", None) if pid in found else None
        if plan is not None and (ds_name or found[pid].dataset_optional):  # a job that trains nothing says what it
            try:  # will do instead
                return cmd, plan(resolved, datasets.info(ui.settings, ds_name) if ds_name else None)
            except Exception as exc:  # a courtesy, like the estimate
                return cmd, f"No estimate: {md(exc)}"
        if not (model_name and ds_name):
            return cmd, "Pick a model and a dataset to see the estimate."
        try:
            est = preview.estimate(ui.settings, model_name, ds_name, resolved.model_dump())
        except Exception as exc:  # an estimate is a courtesy: never block the form
            return cmd, f"No estimate: {md(exc)}"
        gb = est["memory_gb"]
        memory = f"{gb:.1f} GB" if gb >= 1 else f"{gb * 1000:.0f} MB"
        rows = "pairs (chosen and rejected)" if pid in preview.PAIR_METHODS else "rows"
        text = (f"**Rough estimate**: about **{memory}** of memory, "
                f"**{est['tokens_per_step']:,} tokens per step** ({rows} average {est['mean_row_tokens']:.0f} "
                f"tokens), {est['trainable_parameters']:,} trainable of {est['parameters']:,} parameters.")
        return cmd, text + truncation_warning(pid, model_name, ds_name, resolved.model_dump())

    def truncation_warning(pid, model_name, ds_name, params) -> str:
        """Rows (sft) or pairs (dpo, kto, reward, orpo) that max_length leaves nothing to learn from, counted by
        the trainer's own preparation."""
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

    preview_inputs = [plugin, model, dataset, priority, ui["experiment"], values_of]
    resource_inputs = [processes, devices, attempts, time_limit, report_to, nodes, memory]
    command_inputs = [*resource_inputs, then_eval, eval_dataset, *preview_inputs]
    gr.on([c.change for c in command_inputs], on_preview, command_inputs,
          [command, estimate], trigger_mode="always_last", show_progress="hidden")
    ui["train_preview"] = (on_preview, command_inputs, [command, estimate])

    def resources(n_processes, n_devices, n_attempts, n_minutes, tracked, n_nodes, n_memory) -> dict:
        chosen = list(tracked or [])
        return {"processes": int(n_processes or 1), "max_attempts": int(n_attempts or 1),
                "time_limit_min": float(n_minutes) if n_minutes else None,  # empty or 0: no limit
                "devices": None if n_devices in (None, "", "auto") else int(n_devices),
                # the settings' default is left unsaid (the command stays short); any other choice is the job's
                "report_to": None if chosen == default_trackers else chosen,
                "nodes": int(n_nodes or 1), "memory_gb": float(n_memory) if n_memory else None}

    def refused(exc: LabError) -> str:
        return problems_box(exc, "Nothing was queued.")

    def follow_up(evaluator, eval_ds):
        return {"plugin": evaluator, "dataset": eval_ds or None, "params": {}} if evaluator else None

    def missing(pid, model_name, ds_name) -> None:
        """The page's words for an empty pick (the queue's own message speaks of command-line options)."""
        p = found.get(pid)
        if p is not None and p.needs_model is True and not model_name:
            raise LabError("pick a base model", "a registered model or an earlier run's output")
        if p is not None and p.needs_dataset and not p.dataset_optional and not ds_name:
            raise LabError("pick a dataset", f"only datasets this method reads are listed ({', '.join(p.accepts)}); "
                           "import one on the Datasets page")

    def on_launch(n_processes, n_devices, n_attempts, n_minutes, tracked, n_nodes, n_memory, evaluator, eval_ds, pid,
                  model_name, ds_name, prio, experiment, values):
        try:
            missing(pid, model_name, ds_name)
            params = split(pid, values)
            job_id = runs.submit(ui.settings, pid, model=model_name or None, dataset=ds_name or None,
                                 experiment=experiment or "default", params=params, priority=int(prio or 0),
                                 then_eval=follow_up(evaluator, eval_ds),
                                 **resources(n_processes, n_devices, n_attempts, n_minutes, tracked, n_nodes,
                                             n_memory))
        except LabError as exc:
            return refused(exc), gr.update(), gr.update()
        return "", gr.update(selected="run"), job_id

    launch.click(on_launch, [*resource_inputs, then_eval, eval_dataset, *preview_inputs],
                 [message, ui["tabs"], ui["run_job"]], concurrency_id="train-form")

    def on_sweep(n_processes, n_devices, n_attempts, n_minutes, tracked, n_nodes, n_memory, axes, name, evaluator,
                 eval_ds, pid, model_name, ds_name, prio, experiment, values):
        try:
            missing(pid, model_name, ds_name)
            base = split(pid, values)
            group_name, ids = runs.sweep(ui.settings, pid, model=model_name or None, dataset=ds_name or None,
                                         experiment=experiment or "default", base=base,
                                         axes=[line for line in (axes or "").splitlines() if line.strip()],
                                         group=(name or "").strip() or None, priority=int(prio or 0),
                                         then_eval=follow_up(evaluator, eval_ds),
                                         **resources(n_processes, n_devices, n_attempts, n_minutes, tracked, n_nodes,
                                             n_memory))
        except LabError as exc:
            return refused(exc), gr.update(), gr.update(), gr.update()
        options = [(f"#{i} {pid} {model_name or ''}".strip(), str(i)) for i in ids]
        return ("", gr.update(selected="compare"), gr.update(choices=["all", group_name], value=group_name),
                gr.update(choices=options, value=[v for _, v in options]))

    sweep.click(on_sweep, [*resource_inputs, grid, group, then_eval, eval_dataset, *preview_inputs],
                [message, ui["tabs"], ui["compare_group"], ui["compare_runs"]], concurrency_id="train-form")

    def on_save_config(n_processes, n_devices, n_attempts, n_minutes, tracked, n_nodes, n_memory, evaluator, eval_ds,
                       pid, model_name, ds_name, prio, experiment, values):
        import tempfile

        from lab import run_config

        try:
            params = plugins.validate_params(found[pid], split(pid, values)).model_dump(mode="json",
                                                                                       exclude_defaults=True)
        except (LabError, KeyError) as exc:
            return refused(LabError(str(exc))), None
        extra = resources(n_processes, n_devices, n_attempts, n_minutes, tracked, n_nodes, n_memory)
        text = run_config.dump({
            "plugin": pid, "model": model_name or None, "dataset": ds_name or None,
            "experiment": experiment or None, "params": params, "priority": int(prio or 0) or None,
            "processes": extra["processes"] if extra["processes"] != 1 else None, "devices": extra["devices"],
            "max_attempts": extra["max_attempts"] if extra["max_attempts"] != 1 else None,
            "time_limit": extra["time_limit_min"], "then_eval": follow_up(evaluator, eval_ds),
            "nodes": extra["nodes"] if extra["nodes"] != 1 else None, "memory_gb": extra["memory_gb"],
            "report_to": None if extra["report_to"] is None else (",".join(extra["report_to"]) or "none")})
        folder = Path(tempfile.mkdtemp(prefix="lab-config-"))
        path = folder / f"{pid}-{model_name or 'model'}-{ds_name or 'data'}.yaml".replace("/", "-")
        path.write_text(text)
        return "", str(path)

    save_config.click(on_save_config, command_inputs, [message, config_out])

    def on_load_config(file, held):
        """The form filled from a run config: method, model, dataset, parameters, resources, follow-up."""
        from lab import run_config

        keep = [gr.update()] * (13 + len(all_fields))
        if not file:
            return ["", *keep, held]
        try:
            path = datasets_tab.uploaded(file)
            cfg = run_config.load(path)
            if cfg.plugin not in found:
                raise LabError(f"{path.name} names the plugin {cfg.plugin!r}, which this lab does not have"
                               if cfg.plugin else f"{path.name} names no plugin")
            plugins.validate_params(found[cfg.plugin], dict(cfg.params))
        except LabError as exc:
            return [problems_box(exc, "The form was not changed."), *keep, held]
        filled = form_of[cfg.plugin].fill(dict(cfg.params))
        updates = []
        for fid, form in form_of.items():
            updates += ([gr.update(value=v) for v in filled] if fid == cfg.plugin
                        else [gr.update()] * len(form.components))
        follow = cfg.then_eval
        return [ok_box(f"Loaded {path.name}: check the form, then Launch."), gr.update(value=cfg.plugin),
                gr.update(value=cfg.model), gr.update(value=cfg.dataset), gr.update(value=cfg.priority or 0),
                gr.update(value=cfg.processes or 1), gr.update(value=str(cfg.devices) if cfg.devices is not None
                                                               else "auto"),
                gr.update(value=cfg.max_attempts or 1), gr.update(value=cfg.time_limit),
                gr.update(value=default_trackers if cfg.report_to is None else trackers.parse(cfg.report_to) or []),
                gr.update(value=cfg.nodes or 1), gr.update(value=cfg.memory_gb),
                gr.update(value=follow.plugin if follow else ""),
                on_evaluator(follow.plugin, follow.dataset) if follow else gr.update(value=None), *updates,
                {**(held or {}), cfg.plugin: filled}]

    load_config.upload(on_load_config, [load_config, values_of],
                       [message, plugin, model, dataset, priority, processes, devices, attempts, time_limit, report_to,
                        nodes, memory, then_eval, eval_dataset, *all_fields, values_of]).success(*ui["train_after"])

    def on_evaluator(evaluator, current=None):
        accepts = found[evaluator].accepts if evaluator in found else ()
        fitting = datasets_tab.names(ui, accepts) if evaluator else []
        return gr.update(choices=fitting, value=current if current in fitting else None)

    then_eval.change(on_evaluator, [then_eval, eval_dataset], [eval_dataset])


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
    return optional + models_tab.choices(ui)


def refresh_choices(ui: UI, pid: str | None):
    """Model and dataset choices for the current plugin (called on page load and after imports)."""
    found, _ = plugins.discover(ui.settings)
    p = found.get(pid)
    models, fitting = model_choices(ui, p), datasets_tab.names(ui, p.accepts if p else None)
    only = {"value": models[0][1]} if len(models) == 1 else {}
    return (gr.update(choices=models, **only),
            gr.update(choices=fitting, **({"value": fitting[0]} if len(fitting) == 1 else {})))


def clone(ui: UI, job: dict) -> list:
    """Values for [plugin, model, dataset, priority, *every form field] that reproduce `job` in the form."""
    form_of: dict[str, forms.Form] = ui["train_forms"]
    if job["plugin"] not in form_of:
        raise LabError(f"plugin {job['plugin']} is not installed here")
    values = []
    for fid, form in form_of.items():
        values += form.fill(job["params"]) if fid == job["plugin"] else [gr.update()] * len(form.components)
    return [job["plugin"], job["model"], job["dataset"], job["priority"], *values]
