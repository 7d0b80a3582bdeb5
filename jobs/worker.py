"""The worker loop: claim jobs while its executor has room (jobs.executor: local processes, or Slurm) and run each
under its own supervision in a thread.

Idle, the worker looks for queued jobs every `poll_s` (0.1 s) with a read that takes no lock, so a submitted job
starts within a few tenths of a second.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from jobs.executor import executor_for
from lab import jobstore
from lab.db import read_session, retrying
from lab.settings import Settings, read_secrets
from lab.tables import TERMINAL_STATES, Job


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
        self.executor = executor_for(settings, gpus, slots)  # where its jobs run: local processes, or Slurm
        self.secrets = read_secrets(settings)  # given to job processes; never stored, masked in their logs
        self.masks = sorted((v.encode() for v in self.secrets.values() if v), key=len, reverse=True)
        self.stop = threading.Event()  # set by signal handlers or the owner thread: finish up and exit
        self._lock = threading.Lock()
        self._active: dict[int, tuple[threading.Thread, list[str]]] = {}  # job -> (thread, its devices; [] = a slot)

    @property
    def capacity(self) -> str:
        return self.executor.capacity

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
        for job_id in self.db(jobstore.reap_stale, s):
            self.say(f"job {job_id} had lost its worker: marked failed or put back in the queue")
        self.db(jobstore.worker_seen, s, self.id, "idle", capacity=self.capacity)
        self._adopt()
        ran = 0
        marks = {"beat": time.monotonic(), "reap": time.monotonic()}
        try:
            while not self.stop.is_set():
                self._reap_threads()
                try:
                    # while the database is locked or away: wait (0.5 s doubling to 30 s) until it answers or stop
                    step = self.db(self._tick, once, until_empty, until_job, ran, marks, patience_s=float("inf"))
                except OperationalError:
                    break  # stopped while waiting for the database
                if step == "stop":
                    break
                if step == "started":
                    ran += 1
                    continue
                self.stop.wait(s.poll_s)
        finally:
            self._join_all()
            try:
                jobstore.worker_seen(s, self.id, "stopped")
            except OperationalError:
                pass  # the lease tells the others
        return ran

    def _tick(self, once: bool, until_empty: bool, until_job: int | None, ran: int, marks: dict) -> str:
        """One look at the queue: "started" a job, "stop" the loop, or "idle"."""
        s = self.settings
        if until_job is not None and self._ended(until_job):
            return "stop"
        # busy before the look at the queue: a job that ends in between may have queued a follow-up
        was_busy = self.busy
        if not (once and ran):
            claimed = self._claim() if jobstore.has_queued(s) else None
            if claimed is not None:
                self._start(*claimed)
                return "started"
        if (once or until_empty) and not was_busy:
            return "stop"
        now = time.monotonic()
        if now - marks["beat"] >= s.heartbeat_s and not self.busy:  # a running job's supervision beats for it
            jobstore.worker_seen(s, self.id, "idle")
            marks["beat"] = now
        if now - marks["reap"] >= s.lease_s / 2:
            jobstore.reap_stale(s)
            self._adopt()
            marks["reap"] = now
        return "idle"

    def _adopt(self) -> None:
        """Take over following the Slurm jobs of workers that are gone (they go on in Slurm meanwhile)."""
        for job in self.db(self.executor.orphans, self.id):
            self.say(f"job {job.id}: its worker is gone; following Slurm job {job.slurm_job_id} from here")
            self._start(job, [])

    def db(self, fn, *args, patient: bool = False, patience_s: float | None = None, **kwargs):
        """Call a queue function, retrying while the database is locked or unreachable (lab.db.retrying). Gives up
        when the worker is stopped, unless `patient` (an outcome to record): then it tries for 10 minutes."""
        return retrying(fn, *args, patience_s=600.0 if patience_s is None else patience_s,
                        stop=None if patient else self.stop, say=lambda m: self.say(f"worker {self.id}: {m}"),
                        **kwargs)

    def _claim(self) -> tuple[Job, list[str]] | None:
        with self._lock:
            busy = [devices for _, devices in self._active.values()]
        return self.executor.claim(self.id, busy)

    def _start(self, job: Job, devices: list[str]) -> None:
        """Run the claimed job in a thread of its own, on `devices` (none: a CPU slot, or a job in Slurm)."""
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

    def run_job(self, job: Job, devices: list[str] | None = None) -> str:
        """Run a claimed job to its end and record the outcome; returns the final status.
        devices: the accelerators it may use (CUDA_VISIBLE_DEVICES), on a worker that owns some."""
        return self.executor.supervise(self, job, devices or [])

    def seen_after(self, job_id: int) -> None:
        """The worker's row once a job has ended: busy with another job, or idle."""
        with self._lock:
            others = [j for j in self._active if j != job_id]
        status, current = ("busy", others[0]) if others else ("idle", None)
        self.db(jobstore.worker_seen, self.settings, self.id, status, current, patient=True)


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


def probe_cluster(settings: Settings, say=print) -> None:
    """Say at once what would keep Slurm's nodes from running the lab's jobs (LabError), before taking any."""
    from jobs.slurm_supervise import environment
    from lab import slurm

    say(f"checking the cluster with a probe job: {slurm.probe(settings, environment(settings))}")


def run_worker(settings: Settings, *, once: bool = False, until_empty: bool = False, echo: bool = False,
               with_parent: bool = False, gpus: list[str] | None = None, slots: int = 1, say=print,
               probe: bool = True) -> int:
    """A worker process's life (`lab worker`, and the workers `lab serve` starts): serve until stopped. A Slurm
    worker first runs a probe job (probe=False: `lab serve` ran it already)."""
    if settings.executor == "slurm" and probe:
        probe_cluster(settings, say)
    worker = Worker(settings, echo=echo, say=say, gpus=gpus, slots=slots)
    install_signal_handlers(worker)
    if with_parent:
        stop_with_parent(worker)
    say(f"worker {worker.id} on {settings.workspace}, {worker.capacity} "
        f"({'once' if once else 'until empty' if until_empty else 'ready'})")
    n = worker.serve(once=once, until_empty=until_empty)
    say(f"worker {worker.id} stopped after {n} job(s)")
    return n


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.worker --workspace W [--slots N] [--gpus 0,1] [--with-parent]`: how `lab serve` starts its
    workers (`lab worker` is the same for people)."""
    import argparse

    from lab.errors import LabError
    from lab.settings import load

    parser = argparse.ArgumentParser(prog="python -m jobs.worker")
    parser.add_argument("--workspace")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--gpus", default="")
    parser.add_argument("--with-parent", action="store_true")
    parser.add_argument("--no-probe", action="store_true")
    args = parser.parse_args(argv)
    try:
        run_worker(load(args.workspace), with_parent=args.with_parent, slots=args.slots, probe=not args.no_probe,
                   gpus=[g for g in args.gpus.split(",") if g], say=lambda m: print(m, flush=True))
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
