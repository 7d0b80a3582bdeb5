"""Submit-to-start latency of the queue: how long a job waits before an idle worker claims and starts it.

    .venv/bin/python bench/queue_latency.py [--jobs 40]

One `lab worker` process on a fresh SQLite workspace; each job is submitted at a random moment while the worker
is idle. "claimed" is submit -> status running (the database's own timestamps); "process" is submit -> the job's
process has started (its pid is recorded). Baselines: the issue's goal is 0.3 s; Transformer Lab polls every 3 s
and H2O LLM Studio every 30 s.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="lab-bench-")
    os.environ.update({"LAB_WORKSPACE": tmp, "LAB_EXTRA_PLUGINS": "noop_plugin", "LAB_WANDB": "off",
                       "PYTHONPATH": str(HERE)})
    os.environ.pop("LAB_DATABASE_URL", None)

    from lab import jobstore, runs, settings

    s = settings.load()
    worker = subprocess.Popen([sys.executable, "-m", "lab.cli", "worker"], stdout=subprocess.DEVNULL)
    claimed, started = [], []
    try:
        time.sleep(3)  # the worker is up and idle
        for _ in range(args.jobs):
            time.sleep(random.uniform(0.2, 0.6))  # a random phase of the idle poll
            t0 = time.time()
            job_id = runs.submit(s, "noop")
            while jobstore.get(s, job_id).pid is None:
                time.sleep(0.002)
            started.append(time.time() - t0)
            while jobstore.get(s, job_id).status == "running":
                time.sleep(0.01)
            job = jobstore.get(s, job_id)
            assert job.status == "completed", job.error
            claimed.append((job.started_at - job.created_at).total_seconds())
    finally:
        worker.terminate()
        worker.wait()
    print(f"queue latency over {args.jobs} jobs, one idle worker, SQLite (poll_s={s.poll_s})")
    print(f"{'':>10} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}   baseline")
    for name, values in (("claimed", claimed), ("process", started)):
        cells = " ".join(f"{percentile(values, q):>7.3f}s" for q in (0.5, 0.9, 0.99, 1.0))
        print(f"{name:>10} {cells}   goal 0.300s; Transformer Lab ~3 s poll, H2O LLM Studio ~30 s")
    print(f"mean claimed {statistics.mean(claimed):.3f}s")


if __name__ == "__main__":
    main()
