"""The worker: claim a job, run it in a child process, watch it (heartbeat, cancel), record the true outcome.

Each job runs as `python -m jobs.runner JOB_ID` in its own process group, with an argument list (never a shell);
its output is teed to the run's log.txt. Idle, the worker looks for queued jobs every `poll_s` (0.1 s) with a read
that takes no lock, so a submitted job starts within a few tenths of a second.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import select

from jobs import queue
from lab.db import read_session
from lab.errors import CANCELLED_EXIT
from lab.settings import Settings
from lab.tables import TERMINAL_STATES, Experiment, Job
from lab.workspace import new_run_dir

LOG_TAIL_LINES = 40


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, with progress-bar carriage returns collapsed to their final state."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    rows = [line.rsplit("\r", 1)[-1] for line in data.splitlines()]
    return "\n".join(rows[-lines:])


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Worker:
    """One worker process (or a thread of `lab run --wait`). Runs one job at a time."""

    def __init__(self, settings: Settings, echo: bool = False, say=print):
        self.settings = settings
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.echo = echo
        self.say = say
        self.stop = threading.Event()  # set by signal handlers or the owner thread: finish up and exit

    # -- the loop -------------------------------------------------------------------------------------------

    def serve(self, *, once: bool = False, until_empty: bool = False, until_job: int | None = None) -> int:
        """Run jobs until stopped. once: at most one job; until_empty: until the queue is empty;
        until_job: until that job has ended. Returns the number of jobs run."""
        s = self.settings
        for job_id in queue.reap_stale(s):
            self.say(f"job {job_id} had lost its worker: marked failed")
        queue.worker_seen(s, self.id, "idle")
        ran = 0
        last_beat = last_reap = time.monotonic()
        try:
            while not self.stop.is_set():
                if until_job is not None and self._ended(until_job):
                    break
                job = queue.claim_next(s, self.id) if queue.has_queued(s) else None
                if job is not None:
                    self.run_job(job)
                    ran += 1
                    last_beat = time.monotonic()
                    if once:
                        break
                    continue
                if once or until_empty:
                    break
                now = time.monotonic()
                if now - last_beat >= s.heartbeat_s:
                    queue.worker_seen(s, self.id, "idle")
                    last_beat = now
                if now - last_reap >= s.lease_s / 2:
                    queue.reap_stale(s)
                    last_reap = now
                self.stop.wait(s.poll_s)
        finally:
            queue.worker_seen(s, self.id, "stopped")
        return ran

    def _ended(self, job_id: int) -> bool:
        with read_session(self.settings) as s:
            return s.scalar(select(Job.status).where(Job.id == job_id)) in (*TERMINAL_STATES, None)

    # -- one job --------------------------------------------------------------------------------------------

    def run_job(self, job: Job) -> str:
        """Run a claimed job to its end and record the outcome; returns the final status."""
        s = self.settings
        with read_session(s) as db:
            experiment = db.get(Experiment, job.experiment_id).name
        run_dir = Path(job.run_dir) if job.run_dir else new_run_dir(s, experiment, job.id, job.plugin)
        log_path = run_dir / "log.txt"
        self.say(f"job {job.id} ({job.plugin}) started; log: {log_path}")
        queue.worker_seen(s, self.id, "busy", job.id)
        env = {**os.environ, **s.env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jobs.runner", str(job.id)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=run_dir, env=env,
            )
            queue.started(s, job.id, self.id, proc.pid, str(run_dir))
            tee = threading.Thread(target=self._tee, args=(proc, log), daemon=True)
            tee.start()
            reason = self._watch(job.id, proc)
            tee.join(timeout=5)
        _kill_group(proc.pid, signal.SIGKILL)  # whatever the job left behind in its group
        status, error = self._outcome(proc.returncode, reason, run_dir)
        retryable = status == "failed" and (reason == "lost" or (reason is None and proc.returncode < 0))
        if retryable and job.attempts < job.max_attempts:
            status, error = "interrupted", (f"attempt {job.attempts} of {job.max_attempts} {error}; "
                                            "it goes back to the queue and resumes from its last checkpoint")
        if status == "interrupted":  # back in the queue: a stopped worker, or a retry
            with open(log_path, "a") as log:
                log.write(f"[lab] {error}\n")
            queue.requeue(s, job.id, self.id, error)
            queue.worker_seen(s, self.id, "idle")
            self.say(f"job {job.id} back in the queue: {error}")
            return "queued"
        queue.finish(s, job.id, self.id, status, exit_code=proc.returncode, error=error, log_tail=log_tail(log_path))
        queue.worker_seen(s, self.id, "idle")
        self.say(f"job {job.id} {status}" + (f": {error}" if error and status != "completed" else ""))
        return status

    def _tee(self, proc: subprocess.Popen, log) -> None:
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            log.write(chunk)
            log.flush()
            if self.echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()

    def _watch(self, job_id: int, proc: subprocess.Popen) -> str | None:
        """Wait for the job process; heartbeat; stop it on cancel or worker stop. Returns why it was stopped."""
        s = self.settings
        last_beat = time.monotonic()
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
            if now - last_beat >= s.heartbeat_s:
                last_beat = now
                queue.worker_seen(s, self.id, "busy", job_id)
                if not queue.heartbeat(s, job_id, self.id):
                    reason = "lost"  # the job was taken from us (reaped): stop the process
            if reason is None and queue.cancel_requested(s, job_id):
                reason = "cancel"
            if reason is None and self.stop.is_set():
                reason = "interrupted"
            if reason is not None:
                self._stop_process(proc)

    def _stop_process(self, proc: subprocess.Popen) -> None:
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.settings.cancel_grace_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)

    @staticmethod
    def _outcome(code: int, reason: str | None, run_dir: Path) -> tuple[str, str | None]:
        if reason == "cancel" or code == CANCELLED_EXIT:
            return "cancelled", "cancelled by the user"
        if reason == "interrupted":
            return "interrupted", "interrupted: its worker was stopped; the job went back to the queue"
        if reason == "lost":
            return "failed", "the job's lease was lost (no heartbeat in time); it was stopped"
        if code == 0:
            out = run_dir / "output"
            if out.is_dir() and any(out.iterdir()):
                return "completed", None
            return "failed", "the job exited normally but wrote nothing to output/"
        if code < 0:
            return "failed", f"killed by {_signal_name(code)}"
        return "failed", f"exited with code {code}"


def stop_with_parent(worker: Worker, every_s: float = 1.0) -> None:
    """Stop the worker cleanly (its job goes back to the queue) once the process that started it is gone."""
    parent = os.getppid()

    def watch():
        while not worker.stop.wait(every_s):
            if os.getppid() != parent:
                worker.say(f"worker {worker.id}: the process that started it is gone, stopping")
                worker.stop.set()

    threading.Thread(target=watch, daemon=True).start()


def install_signal_handlers(worker: Worker) -> None:
    """SIGTERM and SIGINT stop the worker cleanly: the running job is stopped and put back in the queue."""

    def _handler(signum, _frame):
        worker.say(f"worker {worker.id}: {signal.Signals(signum).name} received, stopping")
        worker.stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
