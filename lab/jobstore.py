"""The job store (the queue): every change of a job's state, used alike by the page, the CLI, the API, the workers
and the job processes: submit, claim (atomic), heartbeat, progress, finish, cancel, reprioritise, reap stale jobs.

States: queued -> running -> completed | failed | cancelled, and queued -> cancelled. Rows are never deleted:
the history is a feature. Every state change is one guarded UPDATE, so two processes can never both move a job.
How a job ended is decided by lab.outcome; this module writes what it decided.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import and_, false, or_, select, text, true, update

from lab import outcome
from lab.db import is_sqlite, read_session, session
from lab.diagnosis import Failure
from lab.errors import LabError
from lab.settings import Settings, mask, secret_values
from lab.tables import TERMINAL_STATES, Job, utcnow
from lab.tables import Worker as WorkerRow


def enqueue(settings: Settings, *, experiment_id: int, plugin: str, params: dict, model_id: int | None = None,
            dataset_id: int | None = None, priority: int = 0) -> int:
    """Put a job in the queue (inputs already validated) and return its id."""
    return enqueue_many(settings, [{"experiment_id": experiment_id, "plugin": plugin, "params": params,
                                    "model_id": model_id, "dataset_id": dataset_id, "priority": priority}])[0]


ANALYZE_AFTER = 500  # jobs queued at once


def enqueue_many(settings: Settings, jobs: list[dict]) -> list[int]:
    """Queue several jobs (fields of Job) in one transaction: all or none."""
    with session(settings) as s:
        rows = [Job(status="queued", **fields) for fields in jobs]
        s.add_all(rows)
        s.flush()
        ids = [row.id for row in rows]
    if len(jobs) >= ANALYZE_AFTER and not is_sqlite(settings):
        # PostgreSQL plans the claim from table statistics; after a big sweep they are stale until autovacuum
        # comes round (up to a minute), and a stale plan sorts the whole queue on every claim
        with session(settings) as s:
            s.execute(text("ANALYZE jobs"))
    return ids


def has_queued(settings: Settings) -> bool:
    """A cheap read that never takes the write lock: idle workers call it many times a second."""
    with read_session(settings) as s:
        return s.scalar(select(Job.id).where(Job.status == "queued").limit(1)) is not None


def fits(free_devices: int, free_slots: int, owns_devices: bool):
    """The SQL condition for a job that fits in a worker's free resources.

    A job asking for devices=N > 0 needs N free accelerators; devices=0 needs a CPU slot; devices unset needs one
    accelerator per process on a worker that owns accelerators, and a CPU slot on one that owns none.
    """
    cpu = true() if free_slots >= 1 else false()
    if not owns_devices:
        return and_(or_(Job.devices.is_(None), Job.devices == 0), cpu)
    return or_(
        and_(Job.devices.is_(None), Job.processes <= free_devices),
        and_(Job.devices > 0, Job.devices <= free_devices),
        and_(Job.devices == 0, cpu),
    )


def claim_next(settings: Settings, worker_id: str, *, free_devices: int = 0, free_slots: int = 1,
               owns_devices: bool = False, cluster: bool = False) -> Job | None:
    """Move the most urgent queued job that fits the worker's free resources to running for `worker_id`,
    atomically; None when none fits (or the queue is empty).

    One UPDATE ... WHERE id = (SELECT ... LIMIT 1) ... RETURNING, inside a write transaction (BEGIN IMMEDIATE on
    SQLite; FOR UPDATE SKIP LOCKED on PostgreSQL), so a job is never handed to two workers.
    cluster: a worker that hands its jobs to Slurm takes any job (the cluster has the resources); others take only
    single-node jobs that fit.
    """
    now = utcnow()
    fit = true() if cluster else and_(Job.nodes <= 1, fits(free_devices, free_slots, owns_devices))
    pick = (select(Job.id).where(Job.status == "queued", fit)
            .order_by(Job.priority.desc(), Job.id).limit(1))
    if not is_sqlite(settings):
        pick = pick.with_for_update(skip_locked=True)
    stmt = (
        update(Job)
        .where(and_(Job.id == pick.scalar_subquery(), Job.status == "queued"))
        .values(status="running", worker=worker_id, started_at=now, heartbeat_at=now, attempts=Job.attempts + 1)
        .returning(Job.id)
    )
    with session(settings) as s:
        job_id = s.execute(stmt).scalar()
        if job_id is None:
            return None
        return s.get(Job, job_id)


def get(settings: Settings, job_id: int) -> Job:
    with read_session(settings) as s:
        job = s.get(Job, job_id)
    if job is None:
        raise LabError(f"no job {job_id}", "see `lab jobs list`")
    return job


def _update_running(settings: Settings, job_id: int, worker_id: str | None = None, **values) -> bool:
    cond = [Job.id == job_id, Job.status == "running"]
    if worker_id is not None:
        cond.append(Job.worker == worker_id)
    with session(settings) as s:
        return s.execute(update(Job).where(*cond).values(**values)).rowcount == 1


def started(settings: Settings, job_id: int, worker_id: str, pid: int | None, run_dir: str) -> bool:
    """The claimed job's run folder (recorded before its process starts: the process reads it) and its pid."""
    return _update_running(settings, job_id, worker_id, pid=pid, run_dir=run_dir)


def heartbeat(settings: Settings, job_id: int, worker_id: str) -> bool:
    """Refresh the job's heartbeat; False when the job is no longer this worker's (e.g. reaped)."""
    return _update_running(settings, job_id, worker_id, heartbeat_at=utcnow())


def progress(settings: Settings, job_id: int, step: int, total: int | None) -> None:
    _update_running(settings, job_id, step=step, total_steps=total)


PHASES = {"loading": "loading the model and data", "training": "training", "evaluating": "evaluating",
          "saving": "saving", "checking": "checking the saved weights", "registering": "registering the output",
          "generating": "generating answers", "slurm_pending": "queued in Slurm",
          # tool jobs (exports, imports)
          "building": "building llama.cpp", "merging": "merging the adapter", "converting": "converting",
          "quantizing": "quantizing", "exporting": "exporting", "archiving": "archiving", "importing": "importing"}


def set_phase(settings: Settings, job_id: int, phase: str) -> None:
    """What the running job does now, one of PHASES (shown with its progress)."""
    assert phase in PHASES, phase
    _update_running(settings, job_id, phase=phase)


def _masked(settings: Settings, text: str | None) -> str | None:
    """Text about to be stored, with the lab's secrets hidden (an exception message may quote one)."""
    return None if text is None else mask(text, secret_values(settings))


def record_error(settings: Settings, job_id: int, failure: Failure) -> None:
    """The job process states why it is failing (kind, reason, next step); the worker keeps it when it records
    the outcome."""
    _update_running(settings, job_id, error=_masked(settings, failure.reason)[:4000], failure=failure.kind,
                    next_step=_masked(settings, failure.next_step)[:1000])


def finish(settings: Settings, job_id: int, worker_id: str, status: str, *, exit_code: int | None,
           failure: Failure | None = None, log_tail: str | None = None, on_complete=None) -> bool | list[str]:
    """Record the outcome (lab.outcome.decide) of a running job owned by `worker_id`.
    on_complete(session, job) adds what a completed job leaves (its output model, a follow-up) in the same
    transaction and returns lines for the log; then those lines are returned instead of True."""
    assert status in TERMINAL_STATES
    with session(settings) as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "running" or job.worker != worker_id:
            return False
        notes = on_complete(s, job) if on_complete is not None and status == "completed" else None
        job.status = status
        job.exit_code = exit_code
        job.finished_at = utcnow()
        job.log_tail = _masked(settings, log_tail)
        job.error = _masked(settings, failure and failure.reason)
        job.failure = failure.kind if failure is not None and status == "failed" else None
        job.next_step = _masked(settings, failure.next_step) if failure is not None and status == "failed" else None
        if status == "completed" and job.total_steps:
            job.step = job.total_steps
        return True if notes is None else notes


def requeue(settings: Settings, job_id: int, worker_id: str, note: str, uses_attempt: bool = True) -> bool:
    """Put a running job back in the queue (a retry, or its worker was stopped); it keeps its run folder and its
    place. uses_attempt=False: this start does not count against max_attempts (the worker was stopped)."""
    with session(settings) as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "running" or job.worker != worker_id:
            return False
        job.status, job.worker, job.pid, job.heartbeat_at = "queued", None, None, None
        job.started_at, job.step, job.total_steps, job.error = None, 0, None, note
        job.failure, job.next_step, job.phase = None, None, None
        job.slurm_job_id, job.slurm_state, job.node_list = None, None, None  # a retry is a new Slurm job
        if not uses_attempt:
            job.attempts = max(0, job.attempts - 1)
        return True


def cancel(settings: Settings, job_id: int) -> str:
    """Cancel a queued job at once, or ask the worker to stop a running one. Returns the job's status after."""
    with session(settings) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LabError(f"no job {job_id}", "see `lab jobs list`")
        if job.status == "queued":
            job.status = "cancelled"
            job.finished_at = utcnow()
            job.error = "cancelled before it started"
            return "cancelled"
        if job.status == "running":
            job.cancel_requested = True
            return "cancelling"
        raise LabError(f"job {job_id} is already {job.status}")


def cancel_requested(settings: Settings, job_id: int) -> bool:
    with read_session(settings) as s:
        return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def set_priority(settings: Settings, job_id: int, priority: int) -> None:
    with session(settings) as s:
        if s.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(priority=priority)).rowcount:
            return
        job = s.get(Job, job_id)
    if job is None:
        raise LabError(f"no job {job_id}", "see `lab jobs list`")
    raise LabError(f"job {job_id} is {job.status}: only queued jobs can change priority")


def queue_position(settings: Settings, job_id: int) -> int | None:
    """1 for the next job to start; None when the job is not queued."""
    with read_session(settings) as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "queued":
            return None
        ahead = select(Job.id).where(
            Job.status == "queued",
            (Job.priority > job.priority) | ((Job.priority == job.priority) & (Job.id < job.id)),
        )
        return len(s.scalars(ahead).all()) + 1


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(settings: Settings) -> list[int]:
    """Fail (or, when attempts remain, requeue) running jobs whose heartbeat is older than the lease and whose
    process is gone; their ids.

    A job process on another machine cannot be checked, so there the lease alone decides.
    """
    cutoff = utcnow() - timedelta(seconds=settings.lease_s)
    host = socket.gethostname()
    reaped = []
    with session(settings) as s:
        # a job in Slurm goes on without its worker: another Slurm worker takes over following it (adopt_slurm)
        stale = s.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff,
                                            Job.slurm_job_id.is_(None))).all()
        for job in stale:
            same_host = (job.worker or "").split(":")[0] == host
            if same_host and process_alive(job.pid):
                continue  # its process still runs: it notices its lost worker and stops itself
            silent = (utcnow() - job.heartbeat_at).total_seconds()
            ended = outcome.decide(outcome.Ending(silent_s=silent, lease_s=settings.lease_s), job, None)
            job.error = ended.failure.reason
            if ended.status == "queued":  # retried: back in the queue, in its place, with its folder
                job.status, job.worker, job.pid, job.heartbeat_at, job.started_at = "queued", None, None, None, None
                job.failure, job.next_step = None, None
            else:
                job.status, job.finished_at = ended.status, utcnow()
                job.failure, job.next_step = ended.failure.kind, ended.failure.next_step
            reaped.append(job.id)
    return reaped


# --- jobs in Slurm ---------------------------------------------------------------------------------------------


def slurm_submitted(settings: Settings, job_id: int, worker_id: str, slurm_id: str, run_dir: str) -> bool:
    """The claimed job is in Slurm now, as job `slurm_id`."""
    return _update_running(settings, job_id, worker_id, slurm_job_id=slurm_id, run_dir=run_dir, pid=None,
                           slurm_state="PENDING", phase="slurm_pending")


def slurm_seen(settings: Settings, job_id: int, worker_id: str, state: str, nodes: str | None,
               pending: bool) -> bool:
    """What squeue or sacct said of the job: its state (e.g. "PENDING (Resources)") and node list. While it waits in
    Slurm's queue its phase says so; once it runs, the job's own phases (loading, training, ...) take over."""
    with session(settings) as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "running" or job.worker != worker_id:
            return False
        job.slurm_state = state[:64]
        if nodes and nodes not in ("None", "(null)"):
            job.node_list = nodes
        if pending and job.phase in (None, "slurm_pending"):
            job.phase = "slurm_pending"
        elif not pending and job.phase == "slurm_pending":
            job.phase = None
        return True


def adopt_slurm(settings: Settings, worker_id: str) -> list[Job]:
    """Take over following jobs in Slurm whose worker is gone (no heartbeat within the lease, its row says stopped,
    or, on this machine, its process is dead). The jobs go on in Slurm; returns those now followed by `worker_id`."""
    cutoff = utcnow() - timedelta(seconds=settings.lease_s)
    host = socket.gethostname()
    taken = []
    with session(settings) as s:
        candidates = s.scalars(select(Job).where(Job.status == "running", Job.slurm_job_id.is_not(None),
                                                 Job.worker != worker_id)).all()
        stopped = {w.id for w in s.scalars(select(WorkerRow).where(WorkerRow.status == "stopped"))}
        for job in candidates:
            old = job.worker or ""
            parts = old.split(":")
            dead_here = len(parts) >= 2 and parts[0] == host and parts[1].isdigit() and not process_alive(
                int(parts[1]))
            if not (job.heartbeat_at is None or job.heartbeat_at < cutoff or old in stopped or dead_here):
                continue
            moved = s.execute(update(Job).where(Job.id == job.id, Job.status == "running", Job.worker == old)
                              .values(worker=worker_id, heartbeat_at=utcnow())).rowcount
            if moved:
                taken.append(job.id)
        s.flush()
        return [s.get(Job, job_id) for job_id in taken]


# --- workers ---------------------------------------------------------------------------------------------------


def worker_seen(settings: Settings, worker_id: str, status: str, job_id: int | None = None,
                capacity: str | None = None) -> None:
    """Create or refresh a worker's row (its own heartbeat, shown in the UI and used by `lab run --wait`)."""
    host, pid = worker_id.split(":")[:2]
    with session(settings) as s:
        row = s.get(WorkerRow, worker_id)
        if row is None:
            s.add(WorkerRow(id=worker_id, host=host, pid=int(pid), status=status, job_id=job_id, capacity=capacity))
        else:
            row.status, row.job_id, row.heartbeat_at = status, job_id, utcnow()
            if capacity is not None:
                row.capacity = capacity


def live_workers(settings: Settings) -> list[WorkerRow]:
    """Workers that heartbeat within the lease (and, on this machine, whose process exists)."""
    cutoff = utcnow() - timedelta(seconds=settings.lease_s)
    host = socket.gethostname()
    with read_session(settings) as s:
        rows = s.scalars(select(WorkerRow).where(WorkerRow.status != "stopped", WorkerRow.heartbeat_at >= cutoff))
        return [w for w in rows if w.host != host or process_alive(w.pid)]
