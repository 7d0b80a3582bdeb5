"""The supervision of one job: start its process, tee its output to log.txt, heartbeat, stop it on cancel or when
the worker stops, and record the true outcome (with the failure's kind, reason and next step).

Each job runs as `python -m jobs.runner JOB_ID` (or torchrun starting one runner per process) in its own process
group, with an argument list, never a shell. A cancelled job gets SIGTERM and `cancel_grace_s` to exit; a job whose
worker stops gets SIGTERM and `stop_grace_s` to finish its step and write a checkpoint, then goes back to the queue
and resumes from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from sqlalchemy.exc import OperationalError

from jobs import outputs
from lab import jobstore
from lab.db import read_session
from lab.diagnosis import oom_kills
from lab.errors import LabError
from lab.outcome import Ending, Outcome, decide
from lab.settings import MASK, Settings
from lab.tables import Experiment, Job, Model
from lab.workspace import log_tail, new_run_dir


class Link(Protocol):
    """What a job's supervision uses of the worker that claimed it (jobs.worker.Worker), and nothing more."""
    settings: Settings
    id: str  # the worker's id, which owns the job's row while it runs
    secrets: dict[str, str]  # given to local job processes, masked (`masks`) in what they print
    masks: list[bytes]
    echo: bool  # copy the job's output to the worker's own
    stop: threading.Event  # set: the worker stops; its jobs checkpoint and go back to the queue

    def say(self, message: str) -> None: ...

    def db(self, fn, *args, patient: bool = False, **kwargs):
        """fn(*args, **kwargs), retried while the database is locked or away (patient: an outcome to record)."""

    def seen_after(self, job_id: int) -> None:
        """The worker's row once the job has ended: busy with another job, or idle."""


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def copy_masked(fd: int, masks: list[bytes], write) -> None:
    """Copy what a process writes to `fd` through write(bytes) until it closes, with every secret in `masks`
    replaced by [secret]."""
    keep = max((len(m) for m in masks), default=1) - 1  # a secret may straddle two reads
    held = b""
    while True:
        chunk = os.read(fd, 65536)
        data = held + chunk
        for secret in masks:  # a job that prints a secret does not write it to its log
            data = data.replace(secret, MASK.encode())
        # hold back a tail that could be the start of a secret until the next read (or the end); secrets hold
        # no newline, so everything up to the last one is safe and a finished line is never held
        cut = len(data) if not chunk else max(len(data) - keep, data.rfind(b"\n") + 1)
        out, held = data[:cut], data[cut:]
        write(out)
        if not chunk:
            break


def job_environment(settings: Settings) -> dict:
    """What every job process sees, locally or in Slurm: the lab's settings, offline hubs, unbuffered output (the
    caller adds its own keys, and the secrets where they apply)."""
    env = {**os.environ, **settings.env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "PYTHONSAFEPATH": "1"}  # the run folder (the cwd) is not on the job's import path
    env.pop("LAB_WORKER_PID", None)
    return env


def job_command(job: Job, env: dict) -> list[str]:
    """The job process's argument list: the runner, or torchrun starting one runner per process."""
    if job.processes <= 1:
        return [sys.executable, "-m", "jobs.runner", str(job.id)]
    # each rank gets its share of the cores (torchrun would set 1 thread per process otherwise)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // job.processes)))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.processes}",
            "--module", "jobs.runner", str(job.id)]


class Supervision:
    """One claimed job run to its end as a local process for the worker behind `link`. devices: the accelerators
    the job may use (CUDA_VISIBLE_DEVICES; [] hides them all), or None on a worker that owns none."""

    def __init__(self, link: Link, job: Job, devices: list[str] | None = None):
        self.worker = link
        self.settings = link.settings
        self.job = job
        self.devices = devices

    def run(self) -> str:
        """Run the job and record its outcome; returns the final status ("queued" when it went back)."""
        s, job, w = self.settings, self.job, self.worker
        experiment = w.db(_experiment_name, s, job.experiment_id, patient=True)
        run_dir = Path(job.run_dir) if job.run_dir else new_run_dir(s, experiment, job.id, job.plugin)
        log_path = run_dir / "log.txt"
        on = f" on devices {','.join(self.devices)}" if self.devices else ""
        w.say(f"job {job.id} ({job.plugin}){on} started; log: {log_path}")
        w.db(jobstore.worker_seen, s, w.id, "busy", job.id, patient=True)
        env = {**job_environment(s), "LAB_WORKER_PID": str(os.getpid()), **w.secrets}
        if self.devices is not None:  # only what was given to this job; a CPU job sees none
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        oom_before = oom_kills()
        # the job process reads its run folder from the row: recorded before it starts (the pid once it has)
        w.db(jobstore.started, s, job.id, w.id, None, str(run_dir), patient=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                job_command(job, env),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=run_dir, env=env,
            )
            w.db(jobstore.started, s, job.id, w.id, proc.pid, str(run_dir), patient=True)
            tee = threading.Thread(target=self._tee, args=(proc, log), daemon=True)
            tee.start()
            stopped_for = self._watch(proc)
            tee.join(timeout=5)
        _kill_group(proc.pid, signal.SIGKILL)  # whatever the job left behind in its group
        oom_after = oom_kills()
        ending = Ending(exit_code=proc.returncode, stopped_for=stopped_for,
                        oom_killed=oom_before is not None and (oom_after or 0) > oom_before)
        return self.record(run_dir, ending)

    def record(self, run_dir: Path, ending: Ending) -> str:
        """Decide (lab.outcome) and record how the job ended: back in the queue (a retry while attempts remain, or
        its worker was stopped), or its final status with the output registered. Returns the status ("queued" when
        it went back)."""
        s, w = self.settings, self.worker
        job = self.job = w.db(jobstore.get, s, self.job.id, patient=True)  # as it is now: its own diagnosis
        log_path = run_dir / "log.txt"
        decided = decide(ending, job, run_dir)
        if decided.status == "queued":
            with open(log_path, "a") as log:
                log.write(f"[lab] {decided.failure.reason}\n")
            # a stopped worker is not the job's fault: that start does not count against its attempts
            w.db(jobstore.requeue, s, job.id, w.id, decided.failure.reason, patient=True,
                 uses_attempt=decided.uses_attempt)
            w.seen_after(job.id)
            w.say(f"job {job.id} back in the queue: {decided.failure.reason}")
            return "queued"
        completion = None
        if decided.status == "completed":
            w.db(jobstore.set_phase, s, job.id, "registering", patient=True)
            try:
                completion = outputs.prepare(s, job, run_dir)
            except LabError as exc:
                decided = decide(replace(ending, registration_error=str(exc)), job, run_dir)
        return self._finish(run_dir, decided, ending, completion)

    def _finish(self, run_dir: Path, decided: Outcome, ending: Ending, completion) -> str:
        s, job, w = self.settings, self.job, self.worker
        status, failure, log_path = decided.status, decided.failure, run_dir / "log.txt"
        exit_code = -ending.signal if ending.signal else ending.exit_code
        recorded = w.db(jobstore.finish, s, job.id, w.id, status, exit_code=exit_code, failure=failure,
                        log_tail=log_tail(log_path), patient=True,
                        on_complete=completion.write if completion else None)
        if isinstance(recorded, list) and recorded:
            if completion is not None and completion.model is not None:
                recorded.append(_write_card(s, job.id))
            with open(log_path, "a") as log:
                log.writelines(f"[lab] {line}\n" for line in recorded)
        w.seen_after(job.id)
        w.say(f"job {job.id} {status}" + (f": {failure.reason}" if failure and status != "completed" else ""))
        return status

    def _tee(self, proc: subprocess.Popen, log) -> None:
        """Copy the job's output to its log (and the worker's stdout when echoing), with the secrets masked."""

        def write(out: bytes) -> None:
            log.write(out)
            log.flush()
            if self.worker.echo:
                sys.stdout.buffer.write(out)
                sys.stdout.flush()

        copy_masked(proc.stdout.fileno(), self.worker.masks, write)

    def _watch(self, proc: subprocess.Popen) -> str | None:
        """Wait for the job process; heartbeat; stop it on cancel, worker stop or its time limit. Returns why it was
        stopped."""
        s, w, job_id = self.settings, self.worker, self.job.id
        last_beat = started = time.monotonic()
        reason = None
        while True:
            try:
                proc.wait(timeout=0.25)
                return reason
            except subprocess.TimeoutExpired:
                pass
            if reason is not None:
                continue
            now = time.monotonic()
            try:
                if now - last_beat >= s.heartbeat_s:
                    last_beat = now
                    jobstore.worker_seen(s, w.id, "busy", job_id)
                    if not jobstore.heartbeat(s, job_id, w.id):
                        reason = "lost"  # the job was taken from us (reaped): stop the process
                if reason is None and jobstore.cancel_requested(s, job_id):
                    reason = "cancel"
            except OperationalError:
                pass  # the database is locked or away: the job goes on, the next beat tries again
            if reason is None and w.stop.is_set():
                reason = "interrupted"
            if reason is None and self.job.time_limit_s is not None and now - started >= self.job.time_limit_s:
                reason = "timeout"
            if reason is not None:  # a stop that keeps the job's work gives it time to write a checkpoint
                self._stop_process(proc, s.stop_grace_s if reason in ("interrupted", "timeout") else s.cancel_grace_s)

    def _stop_process(self, proc: subprocess.Popen, grace_s: float) -> None:
        """SIGTERM the job's group (a training run checkpoints at its next step boundary), SIGKILL after grace_s;
        heartbeats go on meanwhile, so a long last step does not lose the job's lease."""
        _kill_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                proc.wait(timeout=min(self.settings.heartbeat_s, max(0.05, deadline - time.monotonic())))
                return
            except subprocess.TimeoutExpired:
                try:
                    jobstore.heartbeat(self.settings, self.job.id, self.worker.id)
                except OperationalError:
                    pass
        _kill_group(proc.pid, signal.SIGKILL)


def _experiment_name(settings, experiment_id: int) -> str:
    with read_session(settings) as db:
        return db.get(Experiment, experiment_id).name


def _write_card(settings: Settings, job_id: int) -> str:
    """The registered output's README.md: the lab's model card (Hub metadata with a portable base_model, lineage,
    data, parameters) in place of the trainer's template, whose base_model is a path on this machine."""
    from lab import export, registry

    try:
        from sqlalchemy import select

        with read_session(settings) as db:
            name = db.scalar(select(Model.name).where(Model.job_id == job_id).order_by(Model.id).limit(1))
        info = registry.info(settings, name)
        card = export.model_card(settings, name, adapter=info["kind"] == "adapter")
        (Path(info["path"]) / "README.md").write_text(card)
    except Exception as exc:  # a card is a courtesy: the run completed and its output is registered
        return f"no model card written for the output: {type(exc).__name__}: {exc}"
    return f"model card written to {Path(info['path']) / 'README.md'}"
