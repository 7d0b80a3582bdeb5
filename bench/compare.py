"""Building the Compare page's data for 50 runs with 2,000 logged points each: the curves of one metric
(downsampled, keeping extremes), the leaderboard of final and best values, and the configuration diff.

    .venv/bin/python bench/compare.py [--runs 50] [--points 2000]

The goal is under 0.5 s on the server. Synthetic runs are written straight into a fresh SQLite workspace.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from datetime import timedelta

from workspace import fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    fresh()
    from sqlalchemy import insert

    from lab import compare, experiments, jobstore, settings
    from lab.db import session
    from lab.tables import Metric, utcnow

    s = settings.load()
    exp = experiments.get_or_create(s, "bench")
    r = random.Random(0)
    ids = []
    for _ in range(args.runs):
        ids.append(jobstore.enqueue(s, experiment_id=exp, plugin="sft", params={
            "learning_rate": r.choice([1e-4, 2e-4, 5e-4]), "lora_r": r.choice([8, 16]), "seed": 42}))
    start = utcnow()
    for job_id in ids:
        lr = r.uniform(0.5, 2)
        rows = []
        for step in range(1, args.points + 1):
            t = start + timedelta(seconds=step)
            loss = 3 * math.exp(-lr * step / args.points) + r.gauss(0, 0.05)
            rows += [{"job_id": job_id, "step": step, "key": "loss", "value": loss, "time": t},
                     {"job_id": job_id, "step": step, "key": "num_tokens", "value": step * 512.0, "time": t}]
        with session(s) as db:
            db.execute(insert(Metric), rows)
    print(f"{args.runs} runs x {args.points} points of loss (and num_tokens): {2 * args.runs * args.points:,} rows")
    timings = {"curves (step)": [], "curves (tokens, smoothed)": [], "leaderboard": [], "config diff": [],
               "whole page": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        points = compare.curves(s, ids, "loss")
        t1 = time.perf_counter()
        compare.curves(s, ids, "loss", x="tokens", smoothing=0.6)
        t2 = time.perf_counter()
        compare.leaderboard(s, ids)
        t3 = time.perf_counter()
        compare.config_diff(s, ids)
        t4 = time.perf_counter()
        timings["curves (step)"].append(t1 - t0)
        timings["curves (tokens, smoothed)"].append(t2 - t1)
        timings["leaderboard"].append(t3 - t2)
        timings["config diff"].append(t4 - t3)
        timings["whole page"].append((t1 - t0) + (t3 - t2) + (t4 - t3))
    print(f"points drawn: {len(points):,} of {args.runs * args.points:,} (min and max of every bucket kept)")
    for name, values in timings.items():
        print(f"{name:>28}: median {statistics.median(values):.3f} s")
    print(f"{'goal':>28}: whole page under 0.500 s")


if __name__ == "__main__":
    main()
