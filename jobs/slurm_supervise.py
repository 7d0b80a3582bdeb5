"""The supervision of one job handed to Slurm: submit it with sbatch (or take over following one already there),
follow it with squeue, keep its row true (queued in Slurm, running with its Slurm id and nodes), cancel it with
scancel, and record the outcome from Slurm's accounting.

A worker that stops leaves its Slurm jobs running: the next Slurm worker, on any machine, takes over following
them (lab.jobstore.adopt_slurm) and records each outcome once.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from sqlalchemy.exc import OperationalError

from jobs.supervise import Supervision, _experiment_name, job_environment
from lab import jobstore, slurm
from lab.diagnosis import KINDS, Failure
from lab.outcome import Ending
from lab.settings import Settings
from lab.workspace import log_tail, new_run_dir

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
                return self.record(run_dir, Ending(refused=Failure(
                    "cluster", f"Slurm did not take the job: {exc.message}",
                    exc.hint or "check `sinfo` and the worker's options")))
            w.db(jobstore.slurm_submitted, s, job.id, w.id, slurm_id, str(run_dir), patient=True)
        else:
            w.say(f"job {job.id}: following Slurm job {slurm_id} (taken over from another worker)")
        w.db(jobstore.worker_seen, s, w.id, "busy", job.id, patient=True)
        seen = self._follow(slurm_id)
        if seen is None:  # the worker stops, or another worker follows the job now
            return "running"
        w.db(jobstore.slurm_seen, s, job.id, w.id, seen.label(), seen.nodes, False, patient=True)
        return self.record(run_dir, ending(seen, log_tail(run_dir / "log.txt") or "", slurm.memory_mb(job, s)))

    def _submit(self, run_dir: Path) -> str:
        s, job = self.settings, self.job
        script = run_dir / "slurm-batch.py"
        script.write_text(slurm.batch_script(job.id))
        script.chmod(0o700)
        args = slurm.sbatch_args(job, s, run_dir, script)
        with open(run_dir / "log.txt", "a") as log:
            log.write(f"[lab] submitting to Slurm: {shlex.join(args)}\n")
        # its processes read the run folder from the row: recorded before Slurm can start them
        self.worker.db(jobstore.started, s, job.id, self.worker.id, None, str(run_dir), patient=True)
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
                            if not jobstore.slurm_seen(s, job_id, w.id, seen.label(), seen.nodes,
                                                    seen.state == "PENDING"):
                                return None  # no longer ours
                            shown = label
                        except OperationalError:
                            pass
            try:
                if now - last_beat >= s.heartbeat_s:
                    last_beat = now
                    jobstore.worker_seen(s, w.id, "busy", job_id)
                    if not jobstore.heartbeat(s, job_id, w.id):
                        w.say(f"job {job_id}: another worker follows Slurm job {slurm_id} now")
                        return None
                if cancel_sent is None and jobstore.cancel_requested(s, job_id):
                    slurm.cancel(slurm_id)
                    cancel_sent = now
                    w.say(f"job {job_id}: cancel requested, scancel {slurm_id}")
                elif cancel_sent is not None and killed is None and now - cancel_sent >= s.cancel_grace_s:
                    slurm.cancel(slurm_id, kill=True)
                    killed = now
            except (OperationalError, slurm.SlurmError) as exc:
                w.say(f"job {job_id}: {exc}")
            w.stop.wait(s.slurm_poll_s)


def ending(seen: slurm.Seen, log_tail: str = "", mem_mb: int | None = None) -> Ending:
    """The facts of an ended Slurm job, as squeue and sacct gave them (lab.outcome decides what they mean)."""
    return Ending(exit_code=seen.exit_code, cluster_state=seen.state, signal=seen.signal or None, nodes=seen.nodes,
                  cancelled_by=seen.cancelled_by, log_tail=log_tail, memory_mb=mem_mb)
