"""How a job ended, decided in one place.

An executor (a local process, or a job in Slurm) and the reaper of lost jobs only gather the facts of an ending
(`Ending`: the exit code, why the lab stopped it, what Slurm reports, how long its worker was silent). `decide` turns
those facts and the job's row into its `Outcome`: the status, the failure's kind, reason and next step, and whether
it goes back to the queue to resume from its last checkpoint. The job store writes the outcome as it is given.

The job process's own diagnosis of an exception (lab.diagnosis.diagnose, stored while it ran) wins over what the
worker sees from outside ("exited with code 1").
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from lab.diagnosis import OOM_STEP, TRACEBACK_STEP, Failure
from lab.errors import CANCELLED_EXIT, INTERRUPTED_EXIT
from lab.slurm import OOM_MARKS, RETRY_STEP
from lab.workspace import latest_checkpoint

LOST_STEP = "check that the worker's machine is up and reaches the database; run the job again"


@dataclass(frozen=True)
class Ending:
    """The facts of how a job ended, as its executor (or the reaper) saw them; every field is optional."""
    exit_code: int | None = None  # the process's exit code; negative: the signal that killed it
    stopped_for: str | None = None  # why the lab stopped it: cancel, interrupted, timeout, lost
    oom_killed: bool = False  # the kernel's out-of-memory killer fired while it ran
    cluster_state: str | None = None  # Slurm's final state: COMPLETED, FAILED, OUT_OF_MEMORY, TIMEOUT, NODE_FAIL, ...
    signal: int | None = None  # the signal Slurm says ended it
    nodes: str | None = None  # where it ran in Slurm
    cancelled_by: str | None = None  # the uid Slurm says cancelled it
    log_tail: str = ""  # the end of its log (Slurm's memory-limit words)
    memory_mb: int | None = None  # the memory Slurm gave it
    refused: Failure | None = None  # the executor could not start it (Slurm refused the submission)
    silent_s: float | None = None  # reaped: seconds since its worker's last heartbeat
    lease_s: float | None = None
    registration_error: str | None = None  # it completed, but its output could not be registered


@dataclass(frozen=True)
class Outcome:
    """status: completed, failed or cancelled; or queued: back in the queue, to resume from its last checkpoint."""
    status: str
    failure: Failure | None
    retryable: bool = False  # an ending a new attempt can get past (a lost worker, a node failure, preemption)
    uses_attempt: bool = True  # this start counts against max_attempts (not when its worker was stopped)


def decide(ending: Ending, job, run_dir: Path | None) -> Outcome:
    """The outcome of `job` (its row as it is now: attempts, max_attempts, time_limit_s, cancel_requested, and the
    failure it diagnosed itself) from how it ended."""
    status, failure, retryable = _ended(ending, job, run_dir)
    if status == "interrupted":  # its worker was stopped: not the job's fault, it resumes elsewhere
        return Outcome("queued", failure, retryable=True, uses_attempt=False)
    if retryable and status == "failed" and job.attempts < job.max_attempts:
        again = "it was put back in the queue" if ending.silent_s is not None else \
            "it goes back to the queue and resumes from its last checkpoint"
        return Outcome("queued", Failure(failure.kind, f"attempt {job.attempts} of {job.max_attempts} "
                                         f"{failure.reason}; {again}", ""), retryable=True)
    if status == "failed" and ending.silent_s is None and getattr(job, "failure", None):
        failure = Failure(job.failure, job.error or failure.reason, job.next_step or "")  # its own words win
    return Outcome(status, failure, retryable=retryable)


def _ended(e: Ending, job, run_dir: Path | None) -> tuple[str, Failure | None, bool]:
    if e.refused is not None:
        return "failed", e.refused, False
    if e.silent_s is not None:
        return "failed", Failure("lost", f"lost: no heartbeat from worker {job.worker} for {e.silent_s:.0f} s "
                                 f"(lease {e.lease_s or 0:.0f} s); the worker or its machine stopped", LOST_STEP), True
    if e.cluster_state is not None:
        return _slurm(e, job, run_dir)
    return _process(e, e.exit_code, e.stopped_for, job, run_dir)


def _process(e: Ending, code: int | None, stopped_for: str | None, job, run_dir: Path | None
             ) -> tuple[str, Failure | None, bool]:
    """A job process that exited with `code`, stopped by the lab for `stopped_for` (or None)."""
    if stopped_for == "cancel" or code == CANCELLED_EXIT:
        return "cancelled", Failure("killed", "cancelled by the user", ""), False
    if stopped_for == "interrupted":
        return "interrupted", Failure("killed", "interrupted: its worker was stopped; the job went back to the "
                                      "queue", ""), True
    if stopped_for == "timeout":
        return "failed", Failure("timeout", f"the job ran past its time limit of {_minutes(job.time_limit_s)} and "
                                 f"was stopped{_saved(run_dir)}", "raise the time limit (Resources and retries on the "
                                 "Train page, `--time-limit MINUTES`) or shorten the run (max_steps, epochs)"), False
    if code == INTERRUPTED_EXIT:  # a SIGTERM that did not come from its worker; it left a checkpoint
        return "failed", Failure("killed", "stopped by SIGTERM from outside the lab, after writing a checkpoint",
                                 "run it again with --max-attempts 2 or more to resume from that checkpoint"), True
    if code == 0 and stopped_for is None:
        return _finished(e, run_dir)
    failure = from_exit(code, stopped_for, oom_killed=e.oom_killed)
    return "failed", failure, stopped_for == "lost" or (stopped_for is None and code is not None and code < 0)


def _finished(e: Ending, run_dir: Path | None) -> tuple[str, Failure | None, bool]:
    out = run_dir / "output" if run_dir is not None else None
    if out is None or not out.is_dir() or not any(out.iterdir()):
        return "failed", Failure("no_output", "the job exited normally but wrote nothing to output/",
                                 "the plugin must save its model or results under ctx.output_dir"), False
    if e.registration_error is not None:
        return "failed", Failure("plugin_error", f"the run's output cannot be registered: {e.registration_error}",
                                 "see the run's output/ folder and log.txt"), False
    return "completed", None, False


def from_exit(code: int | None, stopped_for: str | None, *, oom_killed: bool = False) -> Failure | None:
    """What the worker sees of a job process that did not report its own failure. None: not a failure."""
    if stopped_for == "lost":
        return Failure("lost", "the job's lease was lost (no heartbeat in time) and it was stopped", LOST_STEP)
    if code is None or code == 0:
        return None
    if code < 0:
        name = _signal_name(-code)
        if oom_killed and -code == signal.SIGKILL:
            return Failure("oom", f"the job was killed by the system's out-of-memory killer ({name})", OOM_STEP)
        hint = " (a SIGKILL from outside is often the system running out of memory)" if name == "SIGKILL" else ""
        return Failure("killed", f"killed by {name}{hint}",
                       "run the job again; with --max-attempts N an interrupted job resumes from its last checkpoint")
    return Failure("plugin_error", f"exited with code {code}", TRACEBACK_STEP)


def _slurm(e: Ending, job, run_dir: Path | None) -> tuple[str, Failure | None, bool]:
    """An ended Slurm job: completed only on exit 0 with outputs present; the states the cluster ends a job with
    (out of memory, time limit, node failure, preemption, a signal) are named as the reason."""
    state = e.cluster_state
    where = f" on {e.nodes}" if e.nodes and e.nodes not in ("None", "(null)") else ""
    if state == "CANCELLED":
        if getattr(job, "cancel_requested", False):
            return "cancelled", Failure("killed", "cancelled by the user (scancel)", ""), False
        by = f" by uid {e.cancelled_by}" if e.cancelled_by else ""
        return "cancelled", Failure("killed", f"cancelled in Slurm{by} (scancel from outside the lab)", ""), False
    killed_for_memory = (e.signal == 9 or state == "FAILED") and any(m in e.log_tail for m in OOM_MARKS)
    if state == "OUT_OF_MEMORY" or killed_for_memory:
        limit = f" of {e.memory_mb / 1024:g} GB" if e.memory_mb else ""
        return "failed", Failure("oom", f"Slurm stopped the job{where}: it used more than its memory limit{limit}",
                                 "give it more memory (`--memory-gb`, the Train page's Resources, or "
                                 f"LAB_SLURM_MEMORY_GB), or {OOM_STEP.split(', or give')[0]}"), False
    if state in ("TIMEOUT", "DEADLINE"):
        return "failed", Failure("timeout", f"Slurm stopped the job{where} at its time limit ({state})"
                                 f"{_saved(run_dir)}", "raise the time limit (`--time-limit MINUTES`, or "
                                 "LAB_SLURM_TIME_LIMIT_MIN) or shorten the run (max_steps, epochs)"), False
    if state == "NODE_FAIL":
        return "failed", Failure("lost", f"the node{where.replace(' on', '')} failed under the job (NODE_FAIL)",
                                 RETRY_STEP), True
    if state in ("PREEMPTED", "BOOT_FAIL"):
        what = "preempted by Slurm (a job of higher priority took its nodes)" if state == "PREEMPTED" \
            else f"its node{where.replace(' on', '')} did not boot (BOOT_FAIL)"
        return "failed", Failure("killed", what, RETRY_STEP), True
    if e.signal:
        return "failed", Failure("killed", f"Slurm reports the job{where} ended by {_signal_name(e.signal)}",
                                 "see the end of the run's log.txt; with --max-attempts N it resumes from its last "
                                 "checkpoint"), False
    code = (e.exit_code or 0) if state == "COMPLETED" else (e.exit_code or 1)
    status, failure, _ = _process(e, code, None, job, run_dir)
    return status, failure, False


def _saved(run_dir: Path | None) -> str:
    last = latest_checkpoint(run_dir / "checkpoints") if run_dir is not None else None
    return f"; its last checkpoint is {last.name}" if last else " before it wrote a checkpoint"


def _minutes(seconds: float | None) -> str:
    minutes = (seconds or 0) / 60
    return f"{minutes:g} minute" + ("" if minutes == 1 else "s")


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
