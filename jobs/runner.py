"""Run one job: `python -m jobs.runner JOB_ID`, in its own process group under a worker; the exit code is the truth.

Exit codes: 0 the plugin returned and its outputs exist; 3 cancelled; 4 stopped (SIGTERM) after writing a checkpoint
to resume from; anything else failed (its kind, reason and next step are stored on the job, the traceback is in
log.txt).

SIGTERM (the worker stopping the job) does not kill a training run on the spot: the lab's trainer callback writes a
checkpoint at the next step boundary and then the process exits with 4, so the job resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

from lab import datasets as datasets_mod
from lab import jobspec, jobstore, plugins, registry, runs, trackers
from lab.db import read_session
from lab.diagnosis import diagnose
from lab.errors import CANCELLED_EXIT, INTERRUPTED_EXIT, Diverged, JobCancelled, JobInterrupted, LabError
from lab.jobspec import JobSpec
from lab.sdk import RunContext
from lab.settings import Settings, load, mask, secret_values
from lab.tables import Dataset, Experiment, Model, utcnow
from lab.workspace import checkpoint_step, latest_checkpoint

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "llm-lab")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _watch_parent(parent: int) -> None:
    """Stop this job's whole process group when the worker that started it dies: no orphaned training.
    Under torchrun the worker is the grandparent: it passes its pid as LAB_WORKER_PID."""
    worker = int(os.environ.get("LAB_WORKER_PID") or 0)
    while True:
        time.sleep(1.0)
        if (worker and not jobstore.process_alive(worker)) or (not worker and os.getppid() != parent):
            # no message: the log pipe went away with the worker, and writing to it would raise here
            os.killpg(os.getpgrp(), signal.SIGKILL)


def _die_with_worker() -> None:
    """Get SIGTERM the moment the worker that started this process dies (Linux's parent-death signal): the job
    stops at once, as a stopped job does (an export or import cleans up, a training run starts its checkpoint),
    rather than at the watcher's next look. Under torchrun the parent is torchrun: the watcher alone follows."""
    if int(os.environ.get("LAB_WORKER_PID") or 0) != os.getppid():
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the watcher stops the job within a second


def _model_info(model: Model | None, base: Model | None) -> dict | None:
    if model is None:
        return None
    return {"id": model.id, "name": model.name, "path": model.path, "kind": model.kind, "source": model.source,
            "architecture": model.architecture, "fingerprint": model.fingerprint,
            "base_model_id": model.base_model_id, "base_model": base and base.name, "base_path": base and base.path}


def _dataset_info(settings: Settings, dataset: Dataset, plugin: plugins.Plugin) -> dict:
    """The dataset as this run reads it: an evaluation reads the held-out test split when the dataset keeps one
    (`split` and `rows` say which and how many); training always reads the training rows."""
    found = datasets_mod.info(settings, dataset.name)
    if plugin.kind == "eval" and found.get("test_rows"):
        return {**found, "split": "test", "rows": found["test_rows"], "train_rows": found["rows"]}
    return {**found, "split": "train"}


def named_models(settings: Settings, plugin: plugins.Plugin, params) -> dict:
    """The further models its parameters name (a reward model, a judge, ...), resolved once before the run starts:
    {field: info} (a list of infos for a field of several). The plugin reads them from ctx.models, and job.json
    records each with its path and fingerprint."""
    found = {}
    for field_name, names in plugins.model_names(plugin, params).items():
        infos = [registry.info(settings, n) for n in names]
        widget = plugin.params.model_fields[field_name].json_schema_extra["widget"]
        found[field_name] = infos if widget == "models" else (infos[0] if infos else None)
    return found


def build_context(settings: Settings, job_id: int) -> tuple[RunContext, plugins.Plugin, object]:
    job = jobstore.get(settings, job_id)
    plugin = plugins.get(settings, job.plugin)
    params = plugins.validate_params(plugin, job.params)
    with read_session(settings) as s:
        experiment = s.get(Experiment, job.experiment_id)
        model = s.get(Model, job.model_id) if job.model_id else None
        dataset = s.get(Dataset, job.dataset_id) if job.dataset_id else None
        base = s.get(Model, model.base_model_id) if model and model.base_model_id else None
    if not job.run_dir:
        raise LabError(f"job {job_id} has no run folder: it was not started by a worker")
    ctx = RunContext(
        settings=settings, job_id=job.id, plugin=plugin.id, experiment=experiment.name, run_dir=Path(job.run_dir),
        model=_model_info(model, base),
        dataset=None if dataset is None else _dataset_info(settings, dataset, plugin),
    )
    ctx.models = named_models(settings, plugin, params)
    ctx.report_to, dropped = trackers.for_run(job.report_to, settings.report_to, settings.wandb)
    if dropped and job.report_to is not None:  # asked for by the job: say why it does not happen
        ctx.log(f"[lab] {dropped}")
    if job.attempts > 1 or (ctx.run_dir / "job.json").is_file():  # started before: retried, or its worker stopped
        ctx.resume_from = latest_checkpoint(ctx.checkpoints_dir) if plugin.resumable else None
        step = checkpoint_step(ctx.resume_from) if ctx.resume_from else -1
        if ctx.is_main:
            runs.clear_metrics(settings, job.id, after_step=step)
        ctx.log(f"[lab] started again (attempt {job.attempts} of {job.max_attempts}): " + (
            f"resuming from {ctx.resume_from.name}" if ctx.resume_from else
            "no checkpoint, training starts over" if plugin.resumable
            else f"{plugin.id} cannot resume: it starts over"))
    if ctx.dataset and ctx.dataset["split"] == "test":
        ctx.log(f"[lab] reading the held-out test split of {ctx.dataset['name']} ({ctx.dataset['rows']} rows; "
                f"training reads its other {ctx.dataset['train_rows']})")
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    ctx.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    spec = JobSpec.of(job.spec) if job.spec else runs.spec_of(settings, job.id)
    record = {
        "job_id": job.id, "plugin": plugin.id, "plugin_origin": plugin.origin, "experiment": experiment.name,
        "params": params.model_dump(mode="json"), "seed": getattr(params, "seed", None), "priority": job.priority,
        "model": ctx.model, "models": ctx.models,
        "dataset": ctx.dataset and {k: ctx.dataset[k] for k in ("id", "name", "format", "rows", "split", "fingerprint",
                                                                 "path")},
        "worker": job.worker, "attempt": job.attempts, "processes": job.processes, "devices": job.devices,
        "nodes": job.nodes, "slurm_job_id": job.slurm_job_id,
        "created_at": job.created_at.isoformat(),
        "started_at": (job.started_at or utcnow()).isoformat(), "versions": _versions(), "git_commit": _git_commit(),
        "spec": spec.model_dump(mode="json"), "command": jobspec.command_line(spec),
        "report_to": ctx.report_to,
    }
    if ctx.is_main:  # one writer under torchrun
        text = mask(json.dumps(record, indent=2), secret_values(settings))  # e.g. a token passed as a parameter
        (ctx.run_dir / "job.json").write_text(text + "\n")
    return ctx, plugin, params


def _setup_trackers(ctx: RunContext) -> None:
    """Point the Trainer's tracker integrations at the run folder (lab.trackers)."""
    env = trackers.environment(ctx.report_to, ctx.run_dir, ctx.experiment, f"{ctx.job_id}-{ctx.plugin}",
                               ctx.settings.wandb)
    for key in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_SILENT"):  # a user's own choice in the environment wins
        if key in os.environ and key in env:
            env.pop(key)
    os.environ.update(env)
    if ctx.report_to:
        ctx.log(f"[lab] reporting to {', '.join(ctx.report_to)} (files in {ctx.run_dir})")


def check_finite(folder: Path) -> None:
    """Raise Diverged when a weight saved under `folder` (safetensors files) is NaN or infinite: such an output
    is never registered."""
    import torch
    from safetensors import safe_open

    bad = total = 0
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())  # noqa: SIM118 (a safetensors file is not iterable)
            for name in names:
                tensor = f.get_tensor(name)
                if tensor.is_floating_point():
                    total += tensor.numel()
                    bad += int((~torch.isfinite(tensor)).sum())
    if bad:
        raise Diverged(f"the trained weights hold {bad:,} NaN or infinite values (of {total:,}): the run diverged "
                       "and its output is not registered")


def _on_sigterm(ctx_box: list):
    """SIGTERM from the worker: a training run finishes its step and checkpoints (the lab's callback), anything
    else stops here and now."""

    def handler(signum, frame):
        ctx = ctx_box[0] if ctx_box else None
        if ctx is not None and ctx.training:
            if not ctx.stop_requested.is_set():
                ctx.stop_requested.set()
                print("[lab] stop requested: the run stops at the end of this step, after a checkpoint", flush=True)
            return
        raise JobInterrupted("stopped by its worker (SIGTERM)")

    return handler


def _record_peak_memory(settings: Settings, ctx: RunContext, wait_s: float = 5.0) -> None:
    """The job's peak memory, at its last step, as metrics (the Run page and Compare show them) and in the log. A
    figure to show, never a reason to fail or to wait: a database busy for longer than `wait_s` goes without it."""
    from lab.speed import peak_memory

    try:
        found = peak_memory()
    except Exception as exc:
        ctx.log(f"[lab] peak memory not measured: {exc}")
        return
    ctx.log("[lab] peak memory: " + ", ".join(f"{k.removesuffix('_mb')} {v:,.0f} MiB" for k, v in found.items()))

    def write() -> None:
        try:
            ctx.log_metrics(jobstore.get(settings, ctx.job_id).step or 0, found)
        except Exception as exc:
            ctx.log(f"[lab] peak memory not recorded: {exc}")

    writer = threading.Thread(target=write, daemon=True)  # the process exits without waiting for it (os._exit)
    writer.start()
    writer.join(wait_s)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_id = int(argv[0])
    settings = load()
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    ctx_box: list = []
    signal.signal(signal.SIGTERM, _on_sigterm(ctx_box))
    _die_with_worker()
    try:
        ctx, plugin, params = build_context(settings, job_id)
        ctx_box.append(ctx)
        ctx.log(f"[lab] job {job_id}: {plugin.id} in experiment {ctx.experiment}; folder {ctx.run_dir}")
        if ctx.world_size > 1:
            print(f"[lab] rank {ctx.rank} of {ctx.world_size} started (pid {os.getpid()})", flush=True)
        _setup_trackers(ctx)
        ctx.set_phase("loading")
        plugin.run(ctx, params)
        if not ctx.is_main:
            print(f"[lab] rank {ctx.rank} of {ctx.world_size} finished", flush=True)
            return 0
        if not ctx.output_dir.is_dir() or not any(ctx.output_dir.iterdir()):
            raise LabError(f"plugin {plugin.id} returned but wrote nothing to {ctx.output_dir}")
        ctx.set_phase("checking")
        check_finite(ctx.output_dir)
        # the worker registers the output and queues a follow-up with the outcome, in one transaction
    except JobCancelled as exc:
        print(f"[lab] {exc}", flush=True)
        return CANCELLED_EXIT
    except JobInterrupted as exc:
        print(f"[lab] {exc}", flush=True)
        return INTERRUPTED_EXIT
    except BaseException as exc:  # the plugin's own failure: keep the traceback in the log, the diagnosis on the job
        traceback.print_exc()
        run_dir = Path(jobstore.get(settings, job_id).run_dir or ".")
        failure = diagnose(exc, [run_dir, run_dir / "checkpoints", settings.workspace])
        print(f"[lab] failed ({failure.kind}): {failure.reason}\n[lab] next step: {failure.next_step}", flush=True)
        jobstore.record_error(settings, job_id, failure)
        return 1
    finally:
        if ctx_box and ctx_box[0].is_main:
            _record_peak_memory(settings, ctx_box[0])
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()  # flush the offline run before the hard exit below
    print(f"[lab] job {job_id} finished; outputs in {ctx.output_dir}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit skips interpreter teardown, where stray non-daemon threads (W&B, dataloaders) can hang the exit
    os._exit(code)
