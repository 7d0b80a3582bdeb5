"""Runs as users see them: submit a job (validated before anything is queued), list, show, metrics.

The CLI and the UI both call these; neither touches the queue tables directly.
"""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from datetime import UTC, datetime

from sqlalchemy import delete, exists, func, select

from jobs import queue
from lab import datasets, experiments, formats, plugins, registry
from lab.db import plain_rows, read_session, session
from lab.errors import LabError, ValidationError
from lab.settings import Settings, mask_all, secret_values
from lab.tables import Dataset, Experiment, Job, Metric, Model, utcnow
from lab.workspace import check_name


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


def _follow_up(settings: Settings, then_eval: dict | None) -> dict | None:
    """A checked follow-up evaluation: {plugin, dataset, params}, run on the training run's output."""
    if not then_eval:
        return None
    plugin = then_eval.get("plugin")
    if plugins.get(settings, plugin or "").kind != "eval":
        raise LabError(f"the evaluation to run afterwards must be an eval plugin; {plugin} is not")
    job = prepare(settings, plugin, dataset=then_eval.get("dataset"), params=then_eval.get("params"),
                  model_optional=True)
    return {"plugin": job["plugin"], "dataset": then_eval.get("dataset"), "params": job["params"]}


def submit(settings: Settings, plugin_id: str, *, model: str | None = None, dataset: str | None = None,
           experiment: str = experiments.DEFAULT, params: dict | None = None, priority: int = 0,
           then_eval: dict | None = None, group: str | None = None, tags: list[str] | None = None,
           max_attempts: int = 1, devices: int | None = None, processes: int = 1,
           time_limit_min: float | None = None, report_to: str | list[str] | None = None, nodes: int = 1,
           memory_gb: float | None = None) -> int:
    """Validate everything, then queue the job and return its id (nothing is queued on error).
    then_eval: an evaluation {plugin, dataset, params} queued on the output once the job completes.
    max_attempts: how often the job may start; a killed or lost job is retried from its last checkpoint.
    devices: accelerators the job needs (None: one per process where the worker owns any, else none);
    processes: > 1 runs the plugin data-parallel under torchrun (plugins that support it);
    time_limit_min: minutes one attempt may run (None: no limit); past it the job writes a checkpoint and fails
    as `timeout`; report_to: trackers ('wandb,tensorboard', a list, or 'none'; None: LAB_REPORT_TO);
    nodes: > 1 spreads a data-parallel job over that many nodes (a Slurm worker runs it); memory_gb: the memory
    per node a Slurm job asks for (None: LAB_SLURM_MEMORY_GB or the cluster's default)."""
    return submit_many(settings, plugin_id, model=model, dataset=dataset, experiment=experiment,
                       params_list=[params or {}], priority=priority, then_eval=then_eval, group=group,
                       tags=tags, max_attempts=max_attempts, devices=devices, processes=processes,
                       time_limit_min=time_limit_min, report_to=report_to, nodes=nodes, memory_gb=memory_gb)[0]


def submit_many(settings: Settings, plugin_id: str, *, model: str | None, dataset: str | None, experiment: str,
                params_list: list[dict], priority: int = 0, then_eval: dict | None = None, group: str | None = None,
                tags: list[str] | None = None, max_attempts: int = 1, devices: int | None = None,
                processes: int = 1, time_limit_min: float | None = None,
                report_to: str | list[str] | None = None, nodes: int = 1,
                memory_gb: float | None = None) -> list[int]:
    """Queue one job per parameter set, all or none (a sweep)."""
    from lab import trackers

    chosen = trackers.parse(report_to)
    chosen = trackers.parse(settings.report_to, "LAB_REPORT_TO") if chosen is None else chosen
    _check_whole(priority, "priority")
    _check_time_limit(time_limit_min)
    _check_whole(max_attempts, "max attempts", 1, 20)
    if group is not None:
        check_name(group, "group")
    for tag in tags or []:
        check_name(tag, "tag")
    _check_resources(devices, processes)
    _check_whole(nodes, "nodes", 1, 1024)
    _check_memory(memory_gb)
    plugin = plugins.get(settings, plugin_id)
    if nodes > 1 and not plugin.distributed:
        raise LabError(f"plugin {plugin_id} runs in one process: it cannot spread over nodes={nodes}",
                       "leave nodes at 1; sft, pretrain and classify run data-parallel over nodes")
    if processes > 1 and not plugin.distributed:
        raise LabError(f"plugin {plugin_id} runs in one process: it cannot use processes={processes}",
                       "leave processes at 1; sft, pretrain and classify run data-parallel")
    if max_attempts > 1 and not plugin.resumable:
        raise LabError(f"plugin {plugin_id} cannot resume from a checkpoint (its trainer has no resume), so a retry "
                       f"would start over: max attempts must be 1, not {max_attempts}",
                       "leave max attempts at 1 and launch the job again if it is interrupted")
    jobs = [prepare(settings, plugin_id, model=model, dataset=dataset, params=p) for p in params_list]
    follow = _follow_up(settings, then_eval)
    if follow and jobs[0]["kind"] != "train":
        raise LabError("only a training run can have an evaluation queued after it")
    experiment_id = experiments.get_or_create(settings, experiment)
    return queue.enqueue_many(settings, [
        {"experiment_id": experiment_id, "plugin": j["plugin"], "params": j["params"], "model_id": j["model_id"],
         "dataset_id": j["dataset_id"], "priority": priority, "group_name": group, "tags": list(tags or []),
         "follow_up": follow, "max_attempts": max_attempts, "devices": devices, "processes": processes,
         "time_limit_s": None if time_limit_min is None else float(time_limit_min) * 60,
         "report_to": trackers.stored(chosen), "nodes": nodes, "memory_gb": memory_gb}
        for j in jobs])


def _check_whole(value, what: str, low: int | None = None, high: int | None = None) -> None:
    """A whole number (not a bool), within [low, high] when they are given."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or (low is not None and not low <= value <= high):
        within = f" from {low} to {high}" if low is not None else ""
        raise LabError(f"{what} must be a whole number{within}, got {value!r}")


MAX_MEMORY_GB = 1 << 16


def _check_memory(gb) -> None:
    good = isinstance(gb, (int, float)) and not isinstance(gb, bool) and gb == gb and 0 < gb <= MAX_MEMORY_GB
    if gb is not None and not good:
        raise LabError(f"memory must be a number of GB above 0 and at most {MAX_MEMORY_GB}, got {gb!r}")


MAX_TIME_LIMIT_MIN = 60 * 24 * 30  # 30 days


def _check_time_limit(minutes) -> None:
    good = isinstance(minutes, (int, float)) and not isinstance(minutes, bool) and 0 < minutes <= MAX_TIME_LIMIT_MIN
    if minutes is not None and not (good and minutes == minutes):
        raise LabError(f"the time limit must be a number of minutes above 0 and at most {MAX_TIME_LIMIT_MIN:,} "
                       f"(30 days), got {minutes!r}", "leave it empty for no limit")


def _check_resources(devices, processes) -> None:
    _check_whole(processes, "processes", 1, 64)
    if devices is not None:
        _check_whole(devices, "devices", 0, 64)
    if devices and processes > 1 and devices != processes:
        raise LabError(f"a data-parallel job runs one process per device: devices={devices} but "
                       f"processes={processes}", "give the same number for both, or devices=0 to run on CPU")


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


def command_line(plugin: str, params: dict, model: str | None, dataset: str | None, experiment: str,
                 priority: int = 0, processes: int = 1, devices: int | None = None, max_attempts: int = 1,
                 time_limit_min: float | None = None, then_eval: dict | None = None,
                 report_to: str | list[str] | None = None, nodes: int = 1, memory_gb: float | None = None) -> str:
    """The `lab run` command that queues the same job (pass only the parameters that differ from defaults), with
    its follow-up evaluation."""
    parts = ["lab", "run", plugin]
    if model:
        parts += ["--model", model]
    if dataset:
        parts += ["--dataset", dataset]
    parts += ["--experiment", experiment]
    for key, value in params.items():
        parts += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    if priority:
        parts += ["--priority", str(priority)]
    if processes != 1:
        parts += ["--processes", str(processes)]
    if devices is not None:
        parts += ["--devices", str(devices)]
    if nodes != 1:
        parts += ["--nodes", str(nodes)]
    if memory_gb is not None:
        parts += ["--memory-gb", f"{memory_gb:g}"]
    if max_attempts != 1:
        parts += ["--max-attempts", str(max_attempts)]
    if time_limit_min is not None:
        parts += ["--time-limit", f"{time_limit_min:g}"]
    if report_to is not None:
        chosen = report_to if isinstance(report_to, str) else ",".join(report_to)
        parts += ["--report-to", chosen or "none"]
    if then_eval:
        parts += ["--then-eval", then_eval["plugin"]]
        if then_eval.get("dataset"):
            parts += ["--eval-dataset", then_eval["dataset"]]
        for key, value in (then_eval.get("params") or {}).items():
            parts += ["--eval-set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return shlex.join(parts)


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


def grid(items: list[str]) -> list[dict[str, str]]:
    """`key=v1,v2` strings as the list of every combination, e.g. lr=1e-4,2e-4 and r=8,16 give four."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not options:
            raise LabError(f"--grid expects key=value1,value2,..., got {item!r}")
        if key.strip() in dict(axes):
            raise LabError(f"--grid {key.strip()} is given twice")
        axes.append((key.strip(), options))
    combos: list[dict[str, str]] = [{}]
    for key, options in axes:
        combos = [{**c, key: v} for c in combos for v in options]
    if len(combos) > 256:
        raise LabError(f"the grid has {len(combos)} configurations; 256 at most")
    return combos


def sweep(settings: Settings, plugin_id: str, *, model: str | None, dataset: str | None, experiment: str,
          base: dict, axes: list[str], group: str | None = None, priority: int = 0,
          then_eval: dict | None = None, **resources) -> tuple[str, list[int]]:
    """Queue every combination of the grid as one group; returns the group name and the job ids.
    resources: max_attempts, devices, processes, time_limit_min, as for submit()."""
    with read_session(settings) as s:
        taken = set(s.scalars(select(Job.group_name).where(Job.group_name.is_not(None)).distinct()))
    if group in taken:
        raise LabError(f"the group {group!r} already exists", "pick another --group")
    if group is None:  # a fresh name: the plugin, the time, and a number if that is taken already
        stem = group = f"{plugin_id}-sweep-{utcnow():%Y%m%d-%H%M%S}"
        n = 2
        while group in taken:
            group, n = f"{stem}-{n}", n + 1
    combos = grid(axes)
    ids = submit_many(settings, plugin_id, model=model, dataset=dataset, experiment=experiment,
                      params_list=[{**base, **c} for c in combos], priority=priority, then_eval=then_eval,
                      group=group, **resources)
    return group, ids
