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
from sqlalchemy.exc import OperationalError

from jobs import outputs, queue
from lab.db import read_session, unavailable_reason
from lab.errors import CANCELLED_EXIT, LabError
from lab.settings import MASK, Settings, read_secrets
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
    """One worker process (or a thread of `lab run --wait`).

    It owns a set of accelerators (`gpus`, e.g. ["0", "1"]) and `slots` CPU job slots, and runs every claimed job
    in a thread of its own while resources last: a job asking for N devices gets N of the free ones (as
    CUDA_VISIBLE_DEVICES), a CPU job takes a slot.
    """

    def __init__(self, settings: Settings, echo: bool = False, say=print, gpus: list[str] | None = None,
                 slots: int = 1):
        self.settings = settings
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.echo = echo
        self.say = say
        self.gpus = list(gpus or [])
        self.slots = slots
        self.secrets = read_secrets(settings)  # given to job processes; never stored, masked in their logs
        self._masks = sorted((v.encode() for v in self.secrets.values() if v), key=len, reverse=True)
        self.stop = threading.Event()  # set by signal handlers or the owner thread: finish up and exit
        self._backoff_s = 0.0
        self._lock = threading.Lock()
        self._active: dict[int, tuple[threading.Thread, list[str]]] = {}  # job -> (thread, its devices; [] = a slot)

    @property
    def capacity(self) -> str:
        gpus = f"gpus {','.join(self.gpus)} + " if self.gpus else ""
        return f"{gpus}{self.slots} cpu slot{'s' if self.slots != 1 else ''}"

    def _free(self) -> tuple[list[str], int]:
        with self._lock:
            used = [d for _, devices in self._active.values() for d in devices]
            slots = self.slots - sum(1 for _, devices in self._active.values() if not devices)
        return [d for d in self.gpus if d not in used], slots

    def _reap_threads(self) -> None:
        with self._lock:
            for job_id in [j for j, (t, _) in self._active.items() if not t.is_alive()]:
                del self._active[job_id]

    @property
    def busy(self) -> bool:
        self._reap_threads()
        return bool(self._active)

    # -- the loop -------------------------------------------------------------------------------------------

    def serve(self, *, once: bool = False, until_empty: bool = False, until_job: int | None = None) -> int:
        """Run jobs until stopped. once: at most one job; until_empty: until the queue is empty (and the jobs
        started have ended); until_job: until that job has ended. Returns the number of jobs run."""
        s = self.settings
        for job_id in self._db(queue.reap_stale, s):
            self.say(f"job {job_id} had lost its worker: marked failed or put back in the queue")
        self._db(queue.worker_seen, s, self.id, "idle", capacity=self.capacity)
        ran = 0
        last_beat = last_reap = time.monotonic()
        try:
            while not self.stop.is_set():
                self._reap_threads()
                try:
                    if until_job is not None and self._ended(until_job):
                        break
                    if not (once and ran):
                        job = self._claim() if queue.has_queued(s) else None
                        if job is not None:
                            self._start(job)
                            ran += 1
                            continue
                    if (once or until_empty) and not self.busy:
                        break
                    now = time.monotonic()
                    if now - last_beat >= s.heartbeat_s and not self.busy:  # a running job's watch beats for it
                        queue.worker_seen(s, self.id, "idle")
                        last_beat = now
                    if now - last_reap >= s.lease_s / 2:
                        queue.reap_stale(s)
                        last_reap = now
                except OperationalError as exc:  # locked past the busy timeout, or the server is away
                    self._back_off(exc)
                    continue
                self._backoff_s = 0.0
                self.stop.wait(s.poll_s)
        finally:
            self._join_all()
            try:
                queue.worker_seen(s, self.id, "stopped")
            except OperationalError:
                pass  # the lease tells the others
        return ran

    def _back_off(self, exc: Exception) -> None:
        """Wait before the next database call: 0.5 s, doubling up to 30 s, while the database cannot be used."""
        self._backoff_s = min(max(self._backoff_s * 2, 0.5), 30.0)
        self.say(f"worker {self.id}: the database cannot be used ({unavailable_reason(exc)}); "
                 f"retrying in {self._backoff_s:.1f} s")
        self.stop.wait(self._backoff_s)

    def _db(self, fn, *args, patient: bool = False, **kwargs):
        """Call a queue function, retrying with back-off while the database is locked or unreachable. Gives up when
        the worker is stopped, unless `patient` (an outcome to record): then it tries for 10 minutes."""
        deadline = time.monotonic() + 600
        delay = 0.5
        while True:
            try:
                return fn(*args, **kwargs)
            except OperationalError as exc:
                if (self.stop.is_set() and not patient) or time.monotonic() > deadline:
                    raise
                self.say(f"worker {self.id}: the database cannot be used ({unavailable_reason(exc)}); "
                         f"retrying in {delay:.1f} s")
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _claim(self) -> Job | None:
        free, slots = self._free()
        if not free and slots < 1:
            return None
        return queue.claim_next(self.settings, self.id, free_devices=len(free), free_slots=slots,
                                owns_devices=bool(self.gpus))

    def _start(self, job: Job) -> None:
        """Give the claimed job its devices (or a CPU slot) and run it in a thread."""
        free, _ = self._free()
        wanted = job.processes if job.devices is None and self.gpus else (job.devices or 0)
        devices = free[:wanted]  # none: the job takes a CPU slot
        thread = threading.Thread(target=self.run_job, args=(job, devices), daemon=True, name=f"job-{job.id}")
        with self._lock:
            self._active[job.id] = (thread, devices)
        thread.start()

    def _join_all(self) -> None:
        with self._lock:
            threads = [t for t, _ in self._active.values()]
        for thread in threads:
            thread.join()
        self._reap_threads()

    def _ended(self, job_id: int) -> bool:
        with read_session(self.settings) as s:
            return s.scalar(select(Job.status).where(Job.id == job_id)) in (*TERMINAL_STATES, None)

    def _experiment_name(self, experiment_id: int) -> str:
        with read_session(self.settings) as db:
            return db.get(Experiment, experiment_id).name

    # -- one job --------------------------------------------------------------------------------------------

    def run_job(self, job: Job, devices: list[str] | None = None) -> str:
        """Run a claimed job to its end and record the outcome; returns the final status.
        devices: the accelerators it may use (CUDA_VISIBLE_DEVICES), on a worker that owns some."""
        s = self.settings
        experiment = self._db(self._experiment_name, job.experiment_id, patient=True)
        run_dir = Path(job.run_dir) if job.run_dir else new_run_dir(s, experiment, job.id, job.plugin)
        log_path = run_dir / "log.txt"
        on = f" on devices {','.join(devices)}" if devices else ""
        self.say(f"job {job.id} ({job.plugin}){on} started; log: {log_path}")
        self._db(queue.worker_seen, s, self.id, "busy", job.id, patient=True)
        env = {**os.environ, **s.env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
               "LAB_WORKER_PID": str(os.getpid()),
               "PYTHONSAFEPATH": "1",  # the run folder (the cwd) is not on the job's import path
               **self.secrets}
        if self.gpus:  # only what was given to this job; a CPU job sees none
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices or [])
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                job_command(job, env),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=run_dir, env=env,
            )
            self._db(queue.started, s, job.id, self.id, proc.pid, str(run_dir), patient=True)
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
            self._db(queue.requeue, s, job.id, self.id, error, patient=True)
            self._seen_after(job.id)
            self.say(f"job {job.id} back in the queue: {error}")
            return "queued"
        completion = None
        if status == "completed":
            try:
                completion = outputs.prepare(s, job, run_dir)
            except LabError as exc:
                status, error = "failed", f"the run's output cannot be registered: {exc}"
        recorded = self._db(queue.finish, s, job.id, self.id, status, exit_code=proc.returncode, error=error,
                            log_tail=log_tail(log_path), patient=True,
                            on_complete=completion.write if completion else None)
        if isinstance(recorded, list) and recorded:
            with open(log_path, "a") as log:
                log.writelines(f"[lab] {line}\n" for line in recorded)
        self._seen_after(job.id)
        self.say(f"job {job.id} {status}" + (f": {error}" if error and status != "completed" else ""))
        return status

    def _seen_after(self, job_id: int) -> None:
        with self._lock:
            others = [j for j in self._active if j != job_id]
        status, current = ("busy", others[0]) if others else ("idle", None)
        self._db(queue.worker_seen, self.settings, self.id, status, current, patient=True)

    def _tee(self, proc: subprocess.Popen, log) -> None:
        fd = proc.stdout.fileno()
        keep = max((len(m) for m in self._masks), default=1) - 1  # a secret may straddle two reads
        held = b""
        while True:
            chunk = os.read(fd, 65536)
            data = held + chunk
            for secret in self._masks:  # a job that prints a secret does not write it to its log
                data = data.replace(secret, MASK.encode())
            # hold back a tail that could be the start of a secret until the next read (or the end); secrets hold
            # no newline, so everything up to the last one is safe and a finished line is never held
            cut = len(data) if not chunk else max(len(data) - keep, data.rfind(b"\n") + 1)
            out, held = data[:cut], data[cut:]
            log.write(out)
            log.flush()
            if self.echo:
                sys.stdout.buffer.write(out)
                sys.stdout.flush()
            if not chunk:
                break

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
            try:
                if now - last_beat >= s.heartbeat_s:
                    last_beat = now
                    queue.worker_seen(s, self.id, "busy", job_id)
                    if not queue.heartbeat(s, job_id, self.id):
                        reason = "lost"  # the job was taken from us (reaped): stop the process
                if reason is None and queue.cancel_requested(s, job_id):
                    reason = "cancel"
            except OperationalError:
                pass  # the database is locked or away: the job goes on, the next beat tries again
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


def job_command(job: Job, env: dict) -> list[str]:
    """The job process's argument list: the runner, or torchrun starting one runner per process."""
    if job.processes <= 1:
        return [sys.executable, "-m", "jobs.runner", str(job.id)]
    # each rank gets its share of the cores (torchrun would set 1 thread per process otherwise)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // job.processes)))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.processes}",
            "--module", "jobs.runner", str(job.id)]


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
