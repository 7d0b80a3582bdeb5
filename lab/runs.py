"""Runs as users see them: submit a job (validated before anything is queued), list, show, metrics.

The CLI and the UI both call these; neither touches the queue tables directly.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import delete, exists, func, select

from lab import datasets, experiments, formats, jobstore, plugins, preview, registry
from lab.db import plain_rows, read_session, session
from lab.errors import LabError, ValidationError
from lab.jobspec import FollowUp, JobSpec
from lab.settings import Settings, mask_all, secret_values
from lab.tables import Dataset, Experiment, Job, Metric, Model, utcnow


def prepare(settings: Settings, plugin_id: str, *, model: str | None = None, dataset: str | None = None,
            params: dict | None = None, model_optional: bool = False) -> dict:
    """Validate plugin, parameters, model and dataset; the job's fields, ready to queue. Raises on any problem.
    model_optional: the model is not known yet (a follow-up evaluation gets the run's output)."""
    plugin = plugins.get(settings, plugin_id)
    resolved = plugins.validate_params(plugin, params or {})
    model_id = dataset_id = None
    model_info = dataset_info = None
    if plugin.needs_model is True and not model and not model_optional:
        raise LabError(f"plugin {plugin.id} needs a model", "pass --model NAME (see `lab models list`)")
    if plugin.needs_model is False and model:
        raise LabError(f"plugin {plugin.id} takes no model")
    if model:
        model_info = registry.info(settings, model)
        model_id = model_info["id"]
    if plugin.needs_dataset and (dataset or not plugin.dataset_optional):
        if not dataset:
            raise LabError(f"plugin {plugin.id} needs a dataset", "pass --dataset NAME (see `lab datasets list`)")
        ds = datasets.get(settings, dataset)
        if ds.format not in plugin.accepts:
            raise LabError(*_wrong_format(plugin, ds))
        dataset_id = ds.id
        dataset_info = datasets.info(settings, ds.name)
    elif dataset:
        raise LabError(f"plugin {plugin.id} takes no dataset")
    if model_info is not None or not model_optional:
        problems = plugin.check_inputs(resolved, model_info, dataset_info, settings)
        if problems:
            raise ValidationError(f"cannot run {plugin.id} on these inputs:", problems)
    return {"plugin": plugin.id, "params": resolved.model_dump(mode="json"), "model_id": model_id,
            "dataset_id": dataset_id, "kind": plugin.kind}


def _follow_up(settings: Settings, then_eval: FollowUp | None) -> dict | None:
    """A checked follow-up evaluation: {plugin, dataset, params}, run on the training run's output."""
    if not then_eval:
        return None
    if plugins.get(settings, then_eval.plugin or "").kind != "eval":
        raise LabError(f"the evaluation to run afterwards must be an eval plugin; {then_eval.plugin} is not")
    job = prepare(settings, then_eval.plugin, dataset=then_eval.dataset, params=then_eval.params,
                  model_optional=True)
    return {"plugin": job["plugin"], "dataset": then_eval.dataset, "params": job["params"]}


def _spec(spec: JobSpec | dict | str, fields: dict) -> JobSpec:
    """submit(settings, spec) or, for scripts and tests, submit(settings, "sft", model=..., params=...)."""
    if isinstance(spec, str):
        return JobSpec.of({"plugin": spec, **fields})
    spec = JobSpec.of(spec)
    return JobSpec.of({**spec.model_dump(), **fields}) if fields else spec


def submit(settings: Settings, spec: JobSpec | dict | str, **fields) -> int:
    """Validate everything, then queue the job and return its id (nothing is queued on error). The spec's fields are
    documented on lab.jobspec.JobSpec; keyword arguments set or override them."""
    return submit_many(settings, _spec(spec, fields), [{}])[0]


TOOLS_EXPERIMENT = "tools"  # exports and imports: apart from the runs an experiment compares
TOOL_PRIORITY = 10  # ahead of queued training: an export or an import is short next to a run
TOOL_OUTPUTS = ("export.json", "import.json", "merge.json")  # what a tool job's output/ says it made


def submit_tool(settings: Settings, plugin: str, *, model: str | None = None, params: dict | None = None) -> int:
    """Queue an export or an import (a plugin of kind tool: export-gguf, export-hf, import-gguf) in the tools
    experiment, ahead of queued training. Refused like any job, before anything is queued."""
    if plugins.get(settings, plugin).kind != "tool":
        raise LabError(f"{plugin} is not a tool (an export or an import)")
    return submit(settings, plugin, model=model, params=params or {}, experiment=TOOLS_EXPERIMENT,
                  priority=TOOL_PRIORITY)


def tool_result(settings: Settings, job_id: int) -> dict:
    """What a completed tool job made: its output/export.json, import.json or merge.json (with `output_model`, the
    model registered from its output, if any)."""
    job = get_job(settings, job_id)
    folder = Path(job["run_dir"] or ".") / "output"
    for name in TOOL_OUTPUTS:
        if (folder / name).is_file():
            return {**json.loads((folder / name).read_text()), "output_model": job["output_model"]}
    raise LabError(f"job {job_id} left no {' or '.join(TOOL_OUTPUTS)} in {folder}")


def submit_many(settings: Settings, spec: JobSpec | dict, variants: list[dict]) -> list[int]:
    """Queue one job per parameter set (each laid over the spec's params), all or none (a sweep)."""
    from lab import trackers

    spec = JobSpec.of(spec)
    chosen = trackers.parse(spec.report_to)
    chosen = trackers.parse(settings.report_to, "LAB_REPORT_TO") if chosen is None else chosen
    plugin = plugins.get(settings, spec.plugin)
    if spec.nodes > 1 and not plugin.distributed:
        raise LabError(f"plugin {plugin.id} runs in one process: it cannot spread over nodes={spec.nodes}",
                       "leave nodes at 1; sft, pretrain and classify run data-parallel over nodes")
    if spec.processes > 1 and not plugin.distributed:
        raise LabError(f"plugin {plugin.id} runs in one process: it cannot use processes={spec.processes}",
                       "leave processes at 1; sft, pretrain and classify run data-parallel")
    if spec.max_attempts > 1 and not plugin.resumable:
        raise LabError(f"plugin {plugin.id} cannot resume from a checkpoint (its trainer has no resume), so a retry "
                       f"would start over: max attempts must be 1, not {spec.max_attempts}",
                       "leave max attempts at 1 and launch the job again if it is interrupted")
    specs = [spec.model_copy(update={"params": {**spec.params, **v}}) for v in variants]
    jobs = [prepare(settings, s.plugin, model=s.model, dataset=s.dataset, params=s.params) for s in specs]
    # what the spec keeps of the parameters: the ones given, as the plugin reads them ("2" from a command line is 2)
    specs = [s.model_copy(update={"params": _as_read(s.params, j["params"])})
             for j, s in zip(jobs, specs, strict=True)]
    for s, j in zip(specs, jobs, strict=True):
        problem = preview.does_not_fit(settings, s, j["params"])
        if problem is not None:
            raise problem
    follow = _follow_up(settings, spec.then_eval)
    if follow and jobs[0]["kind"] != "train":
        raise LabError("only a training run can have an evaluation queued after it")
    if follow:
        then_eval = spec.then_eval.model_copy(update={"params": _as_read(spec.then_eval.params, follow["params"])})
        specs = [s.model_copy(update={"then_eval": then_eval}) for s in specs]
    experiment_id = experiments.get_or_create(settings, spec.experiment)
    return jobstore.enqueue_many(settings, [
        {"experiment_id": experiment_id, "plugin": j["plugin"], "params": j["params"], "model_id": j["model_id"],
         "dataset_id": j["dataset_id"], "priority": s.priority, "group_name": s.group, "tags": list(s.tags),
         "follow_up": follow, "max_attempts": s.max_attempts, "devices": s.devices, "processes": s.processes,
         "time_limit_s": None if s.time_limit_min is None else s.time_limit_min * 60,
         "report_to": trackers.stored(chosen), "nodes": s.nodes, "memory_gb": s.memory_gb,
         "spec": s.model_dump(mode="json")}
        for j, s in zip(jobs, specs, strict=True)])


def _as_read(given: dict, resolved: dict) -> dict:
    """The parameters given, with the values the plugin read them as ("2" from a command line is 2)."""
    return {k: resolved.get(k, v) for k, v in given.items()}


def spec_of(settings: Settings, job_id: int) -> JobSpec:
    """The spec a job was queued with (what Clone puts back in the Train form); for a job queued before specs were
    stored, read back from its columns."""
    with read_session(settings) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LabError(f"no job {job_id}", "see `lab jobs list`")
        if job.spec:
            return JobSpec.of(job.spec)
        names = _names(s)
        follow = job.follow_up
        return JobSpec.of({
            "plugin": job.plugin, "model": names["model"].get(job.model_id),
            "dataset": names["dataset"].get(job.dataset_id), "experiment": names["experiment"][job.experiment_id],
            "params": job.params, "priority": job.priority, "max_attempts": job.max_attempts,
            "time_limit_min": None if job.time_limit_s is None else job.time_limit_s / 60,
            "processes": job.processes, "devices": job.devices, "report_to": job.report_to, "nodes": job.nodes,
            "memory_gb": job.memory_gb, "group": job.group_name, "tags": job.tags or [],
            "then_eval": follow and {"plugin": follow["plugin"], "dataset": follow.get("dataset"),
                                     "params": follow.get("params") or {}}})


def _wrong_format(plugin, ds) -> tuple[str, str]:
    """The message for a dataset a plugin cannot read: what it has, which columns are missing, how to convert."""
    have = set(ds.columns)
    wants = "; ".join(f"{f} (missing {', '.join(c for c in formats.REQUIRED[f] if c not in have)})"
                      for f in plugin.accepts)
    message = (f"dataset {ds.name} is in {ds.format} format (columns {', '.join(ds.columns)}); plugin {plugin.id} "
               f"accepts {', '.join(plugin.accepts)}: {wants}")
    target = next((f for f in plugin.accepts if (ds.format, f) in formats.CONVERSIONS), None)
    if target:
        return message, f"convert it: lab datasets convert {ds.name} {ds.name}-{target} --to {target}"
    return message, f"see `lab plugins show {plugin.id}`"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") if t else None


def _duration_s(job: Job) -> float | None:
    if not job.started_at:
        return None
    return ((job.finished_at or utcnow()) - job.started_at).total_seconds()


def _eta_s(job: Job) -> float | None:
    if job.status != "running" or not job.step or not job.total_steps or not job.started_at:
        return None
    elapsed = (utcnow() - job.started_at).total_seconds()
    return max(0.0, elapsed / job.step * (job.total_steps - job.step))


def _row(job: Job, names: dict, positions: dict[int, int]) -> dict:
    return {
        "id": job.id, "experiment": names["experiment"].get(job.experiment_id), "plugin": job.plugin,
        "model": names["model"].get(job.model_id), "dataset": names["dataset"].get(job.dataset_id),
        "status": job.status, "priority": job.priority, "step": job.step, "total_steps": job.total_steps,
        "progress": round(job.step / job.total_steps, 4) if job.total_steps else None,
        "eta_s": _eta_s(job), "queue_position": positions.get(job.id), "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at), "duration_s": _duration_s(job),
        "cancel_requested": job.cancel_requested, "error": job.error, "failure": job.failure,
        "next_step": job.next_step, "worker": job.worker,
        "group": job.group_name, "tags": job.tags or [], "phase": job.phase if job.status == "running" else None,
        "slurm_job_id": job.slurm_job_id, "slurm_state": job.slurm_state, "node_list": job.node_list,
    }


def _names(s) -> dict[str, dict[int, str]]:
    return {
        "experiment": dict(s.execute(select(Experiment.id, Experiment.name)).all()),
        "model": dict(s.execute(select(Model.id, Model.name)).all()),
        "dataset": dict(s.execute(select(Dataset.id, Dataset.name)).all()),
    }


def _positions(s) -> dict[int, int]:
    queued = s.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.priority.desc(), Job.id))
    return {job_id: n for n, job_id in enumerate(queued, start=1)}


def list_jobs(settings: Settings, *, experiment: str | None = None, status: str | None = None,
              group: str | None = None, plugin: str | None = None, limit: int = 200) -> list[dict]:
    """Newest first."""
    with read_session(settings) as s:
        names = _names(s)
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if experiment:
            ids = [i for i, n in names["experiment"].items() if n == experiment]
            if not ids:
                raise LabError(f"no experiment named {experiment!r}")
            query = query.where(Job.experiment_id == ids[0])
        if status:
            query = query.where(Job.status == status)
        if group:
            query = query.where(Job.group_name == group)
        if plugin:
            query = query.where(Job.plugin == plugin)
        positions = _positions(s)
        found = [_row(j, names, positions) for j in s.scalars(query)]
    return mask_all(found, secret_values(settings))


def jobs_by_id(settings: Settings, job_ids: list[int]) -> list[dict]:
    """Several jobs in one query, as list_jobs gives them plus their parameters."""
    with read_session(settings) as s:
        names, positions = _names(s), _positions(s)
        found = [{**_row(j, names, positions), "params": j.params}
                 for j in s.scalars(select(Job).where(Job.id.in_(job_ids)).order_by(Job.id))]
    return mask_all(found, secret_values(settings))


def get_job(settings: Settings, job_id: int) -> dict:
    """Everything about one job: its row, parameters, folders, error and log tail, and its output model (or the
    dataset a data job made)."""
    with read_session(settings) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LabError(f"no job {job_id}", "see `lab jobs list`")
        out = _row(job, _names(s), _positions(s))
        output_model = s.scalar(select(Model.name).where(Model.job_id == job_id).order_by(Model.id).limit(1))
        output_dataset = s.scalar(select(Dataset.name).where(Dataset.job_id == job_id).order_by(Dataset.id).limit(1))
    out.update({"params": job.params, "run_dir": job.run_dir, "exit_code": job.exit_code, "pid": job.pid,
                "attempts": job.attempts, "max_attempts": job.max_attempts, "devices": job.devices,
                "processes": job.processes, "time_limit_min": job.time_limit_s and job.time_limit_s / 60,
                "heartbeat_at": _iso(job.heartbeat_at), "log_tail": job.log_tail, "report_to": job.report_to,
                "output_model": output_model, "output_dataset": output_dataset, "nodes": job.nodes,
                "memory_gb": job.memory_gb})
    out["lineage"] = _lineage(settings, out, output_model)
    return mask_all(out, secret_values(settings))  # a parameter may hold a secret the user pasted


def _lineage(settings: Settings, job: dict, output_model: str | None, chain_of=None) -> str:
    """The chain of models this run stands in, e.g. 'tiny → sft #5 → dpo #8' (this run last). chain_of: how a
    model's chain is found (registry.lineage; a cached one for many runs)."""
    chain_of = chain_of or (lambda name: registry.lineage(settings, name))
    if output_model:
        return registry.lineage_text(chain_of(output_model))
    uses = {k: job["params"][k] for k in registry.SIDE_INPUTS if job["params"].get(k)}
    here = [{"plugin": job["plugin"], "job_id": job["id"], "uses": uses}]
    before = chain_of(job["model"]) if job["model"] else []
    return registry.lineage_text(before + here)


def lineages(settings: Settings, jobs: list[dict]) -> dict[int, str]:
    """The lineage of each of `jobs` (as jobs_by_id gives them; the same text as get_job's), read together: a
    model's chain is followed once for all."""
    from functools import cache

    outputs: dict[int, str] = {}
    with read_session(settings) as s:
        for job_id, name in s.execute(select(Model.job_id, Model.name).where(Model.job_id.in_([j["id"] for j in jobs]))
                                      .order_by(Model.id.desc())):
            outputs[job_id] = name  # the first output model wins, as in get_job
    chain_of = cache(lambda name: registry.lineage(settings, name))
    return {j["id"]: _lineage(settings, j, outputs.get(j["id"]), chain_of) for j in jobs}


def clear_metrics(settings: Settings, job_id: int, after_step: int = -1) -> int:
    """Drop a job's metric points after `after_step` (a retry redoes those steps); returns how many went."""
    with session(settings) as s:
        return s.execute(delete(Metric).where(Metric.job_id == job_id, Metric.step > after_step)).rowcount


def metric_names(s, job_ids: list[int]) -> list[str]:
    """The names of the metrics the runs logged, sorted, without reading their points: the workspace's metric
    names are few and its points many, so each name is found with one step through the (key, ...) index (a loose
    index scan, as a recursive query) and kept when one of the runs has a point under it."""
    from sqlalchemy.orm import aliased

    later = aliased(Metric)
    names = select(func.min(Metric.key).label("key")).cte("names", recursive=True)
    names = names.union_all(select(select(func.min(later.key)).where(later.key > names.c.key).scalar_subquery())
                            .where(names.c.key.is_not(None)))
    logged = exists().where(Metric.key == names.c.key, Metric.job_id.in_(job_ids))
    return list(s.scalars(select(names.c.key).where(names.c.key.is_not(None), logged).order_by(names.c.key)))


class Points:
    """One run's logged points, {key: array of (step, value) rows} in step order (NaN where NaN was logged), kept up
    to date by reading only what was logged since the last read (the run view's tick on a run of 50,000 points
    reads a few rows, not all of them). Points dropped since (a retry redoing steps) make the next read start again
    from nothing. Arrays, not Python lists: a page that holds 50,000 points must not slow the garbage collector."""

    def __init__(self, job_id: int):
        import threading

        self.job_id, self.by_key, self.last_id, self.count = job_id, {}, 0, 0
        self._lock = threading.Lock()  # a page's tick and its other events may read at the same time

    def update(self, settings: Settings) -> int:
        """Read what is new; returns how many points that was (all of them after a fresh start)."""
        with self._lock:
            return self._update(settings)

    def _update(self, settings: Settings) -> int:
        import numpy as np

        def table(rows) -> np.ndarray:
            return np.array(rows, dtype=float).reshape(-1, 2)  # NULL (a logged NaN) -> NaN

        mine = Metric.job_id == self.job_id
        with read_session(settings) as s:
            if self.last_id and s.scalar(select(func.count()).where(mine, Metric.id <= self.last_id)) != self.count:
                self.by_key, self.last_id, self.count = {}, 0, 0  # some were dropped: read them all again
            if not self.last_id:  # all of them: each metric in step order from the (key, job, step, value) index
                last = s.scalar(select(func.max(Metric.id)).where(mine))
                if last is None:
                    return 0
                self.by_key = {key: table(plain_rows(s, select(Metric.step, Metric.value)
                                                     .where(Metric.key == key, mine, Metric.id <= last)
                                                     .order_by(Metric.step)))
                               for key in metric_names(s, [self.job_id])}
                self.last_id, self.count = last, sum(len(v) for v in self.by_key.values())
                return self.count
            rows = plain_rows(s, select(Metric.id, Metric.key, Metric.step, Metric.value)
                              .where(mine, Metric.id > self.last_id).order_by(Metric.id))
        new: dict[str, list] = {}
        for _, key, step, value in rows:
            new.setdefault(key, []).append((step, value))
        for key, found in new.items():
            line = np.concatenate([self.by_key[key], table(found)]) if key in self.by_key else table(found)
            if (np.diff(line[:, 0]) < 0).any():  # logged out of step order (rare): keep equal steps' order
                line = line[np.argsort(line[:, 0], kind="stable")]
            self.by_key[key] = line
        if rows:
            self.last_id, self.count = rows[-1][0], self.count + len(rows)
        return len(rows)


def metrics(settings: Settings, job_ids: list[int], keys: list[str] | None = None) -> dict[int, dict[str, list]]:
    """{job_id: {key: [[step, value, unix_time], ...]}} in step order."""
    out: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    with read_session(settings) as s:
        query = select(Metric.job_id, Metric.key, Metric.step, Metric.value, Metric.time).where(
            Metric.job_id.in_(job_ids))
        if keys:
            query = query.where(Metric.key.in_(keys))
        for job_id, key, step, value, t in s.execute(query.order_by(Metric.job_id, Metric.key, Metric.step)):
            out[job_id][key].append([step, value, t.replace(tzinfo=UTC).timestamp()])
    return {j: dict(v) for j, v in out.items()}


MAX_SWEEP = 256


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2` strings (--grid, the Train page's lines) as parameter -> values."""
    axes: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not options:
            raise LabError(f"--grid expects key=value1,value2,..., got {item!r}")
        if key.strip() in axes:
            raise LabError(f"--grid {key.strip()} is given twice")
        axes[key.strip()] = options
    return axes


def combinations(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, e.g. lr=[1e-4, 2e-4] and r=[8, 16] give four."""
    size = math.prod(len(v) for v in grid.values())
    if size > MAX_SWEEP:
        raise LabError(f"the grid has {size} configurations; {MAX_SWEEP} at most")
    combos: list[dict] = [{}]
    for key, options in grid.items():
        combos = [{**c, key: v} for c in combos for v in options]
    return combos


def sweep(settings: Settings, spec: JobSpec | dict, grid: dict[str, list]) -> tuple[str, list[int]]:
    """Queue every combination of the grid over the spec as one group (the spec's group, else a fresh name);
    returns the group name and the job ids."""
    spec = JobSpec.of(spec)
    if not grid:
        raise LabError("a sweep needs a grid: --grid key=v1,v2 (or `grid:` in the config file)")
    with read_session(settings) as s:
        taken = set(s.scalars(select(Job.group_name).where(Job.group_name.is_not(None)).distinct()))
    group = spec.group
    if group in taken:
        raise LabError(f"the group {group!r} already exists", "pick another --group")
    if group is None:  # a fresh name: the plugin, the time, and a number if that is taken already
        stem = group = f"{spec.plugin}-sweep-{utcnow():%Y%m%d-%H%M%S}"
        n = 2
        while group in taken:
            group, n = f"{stem}-{n}", n + 1
    ids = submit_many(settings, spec.model_copy(update={"group": group}), combinations(grid))
    return group, ids
