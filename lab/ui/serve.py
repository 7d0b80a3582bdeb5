"""`lab serve`: the web UI plus its worker processes. Stopping it stops the workers cleanly: a job they were
running goes back to the queue, marked interrupted, and runs again when the lab is started next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lab import experiments, modeling
from lab.errors import LabError
from lab.guard import check_port, is_loopback
from lab.settings import Settings, read_secrets


def _start_worker(settings: Settings, n: int, gpus: list[str] | None = None, slots: int = 1) -> subprocess.Popen:
    logs = settings.workspace / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"worker-{n}.log", "ab")  # noqa: SIM115 (kept open for the worker's life)
    owns = ["--gpus", ",".join(gpus)] if gpus else []
    probed = ["--no-probe"] if settings.executor == "slurm" else []  # serve probed the cluster once already
    return subprocess.Popen([sys.executable, "-m", "jobs.worker", "--with-parent", "--workspace",
                             str(settings.workspace), "--slots", str(slots), *owns, *probed],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **settings.env})


def _stop_workers(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def serve(settings: Settings, host: str, port: int, workers: int, password: str | None, say=print,
          gpus: list[str] | None = None, slots: int = 1, allowed_hosts: tuple[str, ...] = ()) -> None:
    """Run the UI and `workers` worker processes until SIGINT or SIGTERM. `gpus` are dealt out among the
    workers (worker n owns every workers-th one), `slots` CPU job slots each. The UI answers only requests
    addressed to its own names (see lab.guard); `allowed_hosts` adds names a proxy uses."""
    if not is_loopback(host) and not password:
        raise LabError(f"binding to {host} makes the lab reachable from other machines: set a password",
                       "pass --password or set LAB_PASSWORD (user name: lab), or bind to 127.0.0.1")
    if workers < 0:
        raise LabError("--workers must be 0 or more")
    if gpus and workers > len(gpus):
        raise LabError(f"{workers} workers for {len(gpus)} GPU(s): each worker needs one at least",
                       "one worker can run several jobs side by side: use --workers 1")
    read_secrets(settings)  # a bad secrets file stops here, not in every worker
    if settings.executor == "slurm" and workers:  # so does a cluster whose nodes cannot run the lab's jobs
        from jobs.worker import probe_cluster

        probe_cluster(settings, say)
    experiments.get_or_create(settings, experiments.DEFAULT)
    from lab.ui.app import launch

    stop = threading.Event()

    def _handler(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    procs: list[subprocess.Popen] = []
    server = None
    try:
        check_port(host, port)
        server, url = launch(settings, host, port, auth=("lab", password) if password else None,
                             allowed_hosts=allowed_hosts)
        owned = {n: (gpus or [])[n - 1::workers] for n in range(1, workers + 1)}
        procs = [_start_worker(settings, n, owned[n], slots) for n in range(1, workers + 1)]
        # the previews, the Train estimate and parameter checks use transformers and TRL: import them now, not on
        # first click (under modeling.trl's lock, which a click that comes sooner waits for)
        threading.Thread(target=modeling.trl, daemon=True).start()
        say(f"LLM Lab on {url}  (workspace {settings.workspace}; {workers} worker(s), logs in "
            f"{Path(settings.workspace) / 'logs'})")
        if password:
            say(f"access needs the user name 'lab' and the password; the lab listens on {host}")
        if allowed_hosts:
            say(f"it also answers requests addressed to {', '.join(allowed_hosts)}")
        if not is_loopback(host):
            say(f"warning: {host} is not loopback: anyone who can reach this port and knows the password can use "
                "the lab")
        say("Ctrl-C stops the lab and its workers; " + (
            "jobs in Slurm go on, and the next Slurm worker follows them." if settings.executor == "slurm"
            else "a running job goes back to the queue."))
        while not stop.wait(1.0):
            for i, p in enumerate(procs):
                if p.poll() is not None:  # a worker died: start another, so the queue keeps moving
                    say(f"worker {i + 1} exited with code {p.returncode}; starting a new one")
                    procs[i] = _start_worker(settings, i + 1, owned[i + 1], slots)
    finally:
        say("stopping the workers (a running training job first saves a checkpoint to resume from) ...")
        _stop_workers(procs, settings.stop_grace_s + 10)  # a running job checkpoints before it goes back
        if server is not None:
            server.close()
        say("stopped")
