"""The supervision of one job handed to Slurm: submit it with sbatch (or take over following one already there),
follow it with squeue, keep its row true (queued in Slurm, running with its Slurm id and nodes), cancel it with
scancel, and record the outcome from Slurm's accounting.

A worker that stops leaves its Slurm jobs running: the next Slurm worker, on any machine, takes over following
them (jobs.queue.adopt_slurm) and records each outcome once.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from sqlalchemy.exc import OperationalError

from jobs import queue
from jobs.supervise import Supervision, _experiment_name, job_environment, outcome
from lab import slurm
from lab.diagnosis import KINDS, OOM_STEP, Failure
from lab.settings import Settings
from lab.workspace import latest_checkpoint, log_tail, new_run_dir

assert "cluster" in KINDS

# how long Slurm may not know a job it was given (a controller that restarted without its state) before the lab
# calls it lost
UNKNOWN_FOR_S = 120.0


def environment(settings: Settings) -> dict:
    """What a Slurm job's processes see (sbatch --export=ALL): the lab's settings and offline hubs; never the
    secrets, which the launcher reads on the node from the workspace's secrets file."""
    return job_environment(settings)


class SlurmSupervision(Supervision):

    def environment(self) -> dict:
        env = environment(self.settings)
        for key in self.worker.secrets:
            env.pop(key, None)
        return env

    def run(self) -> str:
        s, job, w = self.settings, self.job, self.worker
        experiment = w.db(_experiment_name, s, job.experiment_id, patient=True)
        run_dir = Path(job.run_dir) if job.run_dir else new_run_dir(s, experiment, job.id, job.plugin)
        slurm_id = job.slurm_job_id
        if slurm_id is None:
            try:
                slurm_id = slurm.find_by_name(slurm.job_name(s, job.id))  # submitted, but not recorded: follow it
                if slurm_id is None:
                    slurm_id = self._submit(run_dir)
                else:
                    w.say(f"job {job.id}: found it in Slurm as job {slurm_id}, following it")
            except slurm.SlurmError as exc:
                return self.record(run_dir, "failed", Failure("cluster", f"Slurm did not take the job: {exc.message}",
                                                              exc.hint or "check `sinfo` and the worker's options"),
                                   None)
            w.db(queue.slurm_submitted, s, job.id, w.id, slurm_id, str(run_dir), patient=True)
        else:
            w.say(f"job {job.id}: following Slurm job {slurm_id} (taken over from another worker)")
        w.db(queue.worker_seen, s, w.id, "busy", job.id, patient=True)
        seen = self._follow(slurm_id)
        if seen is None:  # the worker stops, or another worker follows the job now
            return "running"
        job = self.job = w.db(queue.get, s, job.id, patient=True)
        w.db(queue.slurm_seen, s, job.id, w.id, seen.label(), seen.nodes, False, patient=True)
        status, failure, retryable = meaning(seen, job, log_tail(run_dir / "log.txt") or "", run_dir,
                                                   slurm.memory_mb(job, s))
        code = -seen.signal if seen.signal else seen.exit_code
        return self.record(run_dir, status, failure, code, retryable=retryable)

    def _submit(self, run_dir: Path) -> str:
        s, job = self.settings, self.job
        script = run_dir / "slurm-batch.py"
        script.write_text(slurm.batch_script(job.id))
        script.chmod(0o700)
        args = slurm.sbatch_args(job, s, run_dir, script)
        with open(run_dir / "log.txt", "a") as log:
            log.write(f"[lab] submitting to Slurm: {shlex.join(args)}\n")
        slurm_id = slurm.submit(args, self.environment())
        self.worker.say(f"job {job.id} ({job.plugin}) submitted to Slurm as job {slurm_id}; log: "
                        f"{run_dir / 'log.txt'}")
        return slurm_id

    def _follow(self, slurm_id: str) -> slurm.Seen | None:
        """Follow the Slurm job until it ends (its last look), or None when this worker stops following it."""
        s, w, job_id = self.settings, self.worker, self.job.id
        last_beat = time.monotonic()
        shown = None
        cancel_sent = killed = None
        unknown_since = None
        while True:
            if w.stop.is_set():
                w.say(f"job {job_id}: Slurm job {slurm_id} goes on; the next Slurm worker follows it")
                return None
            now = time.monotonic()
            try:
                seen = slurm.look(slurm_id)
            except slurm.SlurmError as exc:  # the controller is busy or restarting: ask again
                w.say(f"job {job_id}: {exc}")
                seen = None
            if seen is not None:
                if seen.state == "":
                    unknown_since = unknown_since or now
                    if now - unknown_since > UNKNOWN_FOR_S:
                        return slurm.Seen(state="NODE_FAIL", reason="Slurm no longer knows the job")
                else:
                    unknown_since = None
                    if seen.ended:
                        return seen
                    label = (seen.label(), seen.nodes)
                    if label != shown:
                        try:
                            if not queue.slurm_seen(s, job_id, w.id, seen.label(), seen.nodes,
                                                    seen.state == "PENDING"):
                                return None  # no longer ours
                            shown = label
                        except OperationalError:
                            pass
            try:
                if now - last_beat >= s.heartbeat_s:
                    last_beat = now
                    queue.worker_seen(s, w.id, "busy", job_id)
                    if not queue.heartbeat(s, job_id, w.id):
                        w.say(f"job {job_id}: another worker follows Slurm job {slurm_id} now")
                        return None
                if cancel_sent is None and queue.cancel_requested(s, job_id):
                    slurm.cancel(slurm_id)
                    cancel_sent = now
                    w.say(f"job {job_id}: cancel requested, scancel {slurm_id}")
                elif cancel_sent is not None and killed is None and now - cancel_sent >= s.cancel_grace_s:
                    slurm.cancel(slurm_id, kill=True)
                    killed = now
            except (OperationalError, slurm.SlurmError) as exc:
                w.say(f"job {job_id}: {exc}")
            w.stop.wait(s.slurm_poll_s)


def _signal_name(sig: int) -> str:
    import signal

    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def meaning(seen: slurm.Seen, job, log_tail: str, run_dir: Path, mem_mb: int | None = None
            ) -> tuple[str, Failure | None, bool]:
    """What an ended Slurm job means for the lab: (status, failure, retryable).

    completed only on exit 0 with outputs present; the states the cluster ends a job with (out of memory, time
    limit, node failure, preemption, a signal) are named as the reason. The caller requeues a retryable one while
    attempts remain; it then resumes from its last checkpoint.
    """
    state, where = seen.state, f" on {seen.nodes}" if seen.nodes and seen.nodes not in ("None", "(null)") else ""
    mem = mem_mb
    if state == "CANCELLED":
        if job.cancel_requested:
            return "cancelled", Failure("killed", "cancelled by the user (scancel)", ""), False
        by = f" by uid {seen.cancelled_by}" if seen.cancelled_by else ""
        return "cancelled", Failure("killed", f"cancelled in Slurm{by} (scancel from outside the lab)", ""), False
    killed_for_memory = (seen.signal == 9 or state == "FAILED") and any(m in log_tail for m in slurm.OOM_MARKS)
    if state == "OUT_OF_MEMORY" or killed_for_memory:
        limit = f" of {mem / 1024:g} GB" if mem else ""
        return "failed", Failure("oom", f"Slurm stopped the job{where}: it used more than its memory limit{limit}",
                                 "give it more memory (`--memory-gb`, the Train page's Resources, or "
                                 f"LAB_SLURM_MEMORY_GB), or {OOM_STEP.split(', or give')[0]}"), False
    if state in ("TIMEOUT", "DEADLINE"):
        last = latest_checkpoint(run_dir / "checkpoints")
        saved = f"; its last checkpoint is {last.name}" if last else " before it wrote a checkpoint"
        return "failed", Failure("timeout", f"Slurm stopped the job{where} at its time limit ({state}){saved}",
                                 "raise the time limit (`--time-limit MINUTES`, or LAB_SLURM_TIME_LIMIT_MIN) or "
                                 "shorten the run (max_steps, epochs)"), False
    if state == "NODE_FAIL":
        return "failed", Failure("lost", f"the node{where.replace(' on', '')} failed under the job (NODE_FAIL)",
                                 slurm.RETRY_STEP), True
    if state in ("PREEMPTED", "BOOT_FAIL"):
        what = "preempted by Slurm (a job of higher priority took its nodes)" if state == "PREEMPTED" \
            else f"its node{where.replace(' on', '')} did not boot (BOOT_FAIL)"
        return "failed", Failure("killed", what, slurm.RETRY_STEP), True
    if seen.signal:
        name = _signal_name(seen.signal)
        return "failed", Failure("killed", f"Slurm reports the job{where} ended by {name}",
                                 "see the end of the run's log.txt; with --max-attempts N it resumes from its last "
                                 "checkpoint"), False
    if state == "COMPLETED":
        status, failure = outcome(seen.exit_code, None, run_dir)
        return status, failure, False
    status, failure = outcome(seen.exit_code or 1, None, run_dir)
    return status, failure, False
