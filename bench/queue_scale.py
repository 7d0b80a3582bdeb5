"""Queue scale: claim latency with 10, 1,000 and 10,000 queued jobs, and the throughput of N concurrent workers,
on SQLite and on PostgreSQL.

    .venv/bin/python bench/queue_scale.py [--claims 50] [--jobs 2000] [--workers 1,2,4] [--no-postgres]

Latency: the queue holds DEPTH queued jobs (plus the ones about to be claimed); one worker claims `--claims` of them
one by one and each claim (one UPDATE ... RETURNING transaction) is timed. Goal: at 10,000 no more than twice the
figure at 10. Throughput: N worker processes claim and finish `--jobs` queued jobs as fast as they can (the queue's
own work: no job process is started); every job must be claimed exactly once. PostgreSQL runs as a throwaway local
server (Debian's `postgresql`).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab import (  # noqa: E402
    db,
    experiments,
    jobstore,  # noqa: E402
    settings,
)
from lab.pgserver import create_database, throwaway_server  # noqa: E402

DEPTHS = (10, 1_000, 10_000)


def fresh(url: str | None):
    """Settings for a new workspace (and database)."""
    os.environ["LAB_WORKSPACE"] = tempfile.mkdtemp(prefix="lab-bench-")
    os.environ["LAB_WANDB"] = "off"
    if url:
        os.environ["LAB_DATABASE_URL"] = url
    else:
        os.environ.pop("LAB_DATABASE_URL", None)
    s = settings.load()
    db.engine_for(s)
    return s


def fill(s, n: int) -> None:
    exp = experiments.get_or_create(s, "bench")
    for start in range(0, n, 5_000):
        jobstore.enqueue_many(s, [{"experiment_id": exp, "plugin": "noop", "params": {}, "model_id": None,
                                "dataset_id": None, "priority": 0} for _ in range(min(5_000, n - start))])


def claim_latency(s, depth: int, claims: int) -> list[float]:
    fill(s, depth + claims)
    times = []
    for _ in range(claims):
        t0 = time.perf_counter()
        job = jobstore.claim_next(s, f"bench:{os.getpid()}")
        times.append(time.perf_counter() - t0)
        assert job is not None
    return times


def _worker(url: str | None, workspace: str, n: int, out) -> None:
    os.environ["LAB_WORKSPACE"] = workspace
    if url:
        os.environ["LAB_DATABASE_URL"] = url
    s = settings.load()
    me = f"bench:{os.getpid()}:{n}"
    done = []
    while (job := jobstore.claim_next(s, me)) is not None:
        jobstore.finish(s, job.id, me, "completed", exit_code=0)
        done.append(job.id)
    out.put(done)


def throughput(url: str | None, workers: int, jobs: int) -> tuple[float, bool]:
    s = fresh(url)
    fill(s, jobs)
    db.dispose_all()
    out = mp.Queue()
    procs = [mp.Process(target=_worker, args=(url, str(s.workspace), n, out)) for n in range(workers)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    ran = Counter()
    for _ in procs:
        ran.update(out.get())
    seconds = time.perf_counter() - t0
    for p in procs:
        p.join()
    exactly_once = len(ran) == jobs and set(ran.values()) == {1}
    return jobs / seconds, exactly_once


def ms(values: list[float]) -> str:
    values = sorted(values)
    return f"p50 {statistics.median(values) * 1e3:6.2f} ms, p90 {values[int(0.9 * (len(values) - 1))] * 1e3:6.2f} ms"


def bench(name: str, url_for, args) -> None:
    print(f"\n{name}")
    p50 = {}
    for depth in DEPTHS:
        s = fresh(url_for())
        times = claim_latency(s, depth, args.claims)
        db.dispose_all()
        p50[depth] = statistics.median(times)
        print(f"  claim with {depth:>6,} queued: {ms(times)}")
    ratio = p50[DEPTHS[-1]] / p50[DEPTHS[0]]
    print(f"  10,000 vs 10 queued: {ratio:.2f}x (goal: at most 2x) -> {'ok' if ratio <= 2 else 'MISSED'}")
    for n in args.workers:
        rate, once = throughput(url_for(), n, args.jobs)
        print(f"  {n} worker{'s' if n > 1 else ' '}: {rate:7.0f} jobs/s claimed and finished "
              f"({args.jobs} jobs; every job exactly once: {'yes' if once else 'NO'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 4])
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    print(f"queue scale on {os.cpu_count()} CPU cores")
    bench("SQLite (WAL, one file)", lambda: None, args)
    if args.no_postgres:
        return
    with throwaway_server() as server:
        n = iter(range(1, 1000))
        bench("PostgreSQL (local throwaway server, FOR UPDATE SKIP LOCKED)",
              lambda: create_database(server, f"bench_{next(n)}"), args)


if __name__ == "__main__":
    main()
