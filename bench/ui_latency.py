"""The page at any size: how long the web lab's events take with 1,000 jobs in the history, a run of 50,000 metric
points open in the run view and 50 runs of 2,000 points on the Compare page.

    .venv/bin/python bench/ui_latency.py [--repeats 30]

A `lab serve`-like server (the lab's own launch, no workers) runs in a child process on a fresh SQLite workspace;
every page event is called through gradio_client as the page calls it, and the server records how long each of its
handlers ran. Printed per event: the 95th percentile of the round trip through gradio_client and of the handler.
While the run view is open, the long run keeps logging (5 points before each call): each tick has new points.

"first" is the first of the repeats: the Compare page keeps a finished run's points in memory once read, so only
its first drawing reads them from the database.

Baseline, from the same run: the run view's tick as it was (every point of the run read and drawn again on each
tick: what opening the run costs, in a page that had another run open) against the tick that reads only the
points logged since (the ratio: the server's handler time). The goal: every event under 0.2 s at the 95th percentile.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from workspace import fresh

ROOT = Path(__file__).resolve().parent.parent
LONG_RUN_KEYS = ("loss", "learning_rate", "grad_norm", "num_tokens", "epoch")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def serve(port: int, timings: str) -> None:
    """The child: the lab's server with every page handler timed (one JSON line per call)."""
    from lab import settings
    from lab.ui import app

    built = app.build

    def timed(fn, name):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with open(timings, "a") as f:
                    f.write(json.dumps({"event": name, "s": time.perf_counter() - start}) + "\n")
        return run

    def build(s):
        demo = built(s)
        for fn in demo.fns.values():
            plain = fn.fn is not None and not (inspect.isgeneratorfunction(fn.fn) or inspect.iscoroutinefunction(fn.fn)
                                               or inspect.isasyncgenfunction(fn.fn))
            if plain and fn.api_name:
                fn.fn = timed(fn.fn, fn.api_name)
        return demo

    app.build = build
    app.launch(settings.load(), "127.0.0.1", port)
    while True:
        time.sleep(3600)


def fill(runs_to_compare: int, points: int, history: int, long_points: int) -> dict:
    """The workspace: `history` finished jobs, `runs_to_compare` completed sft runs with loss and num_tokens, and one
    running job with `long_points` points over LONG_RUN_KEYS."""
    from sqlalchemy import insert, update

    from lab import experiments, jobstore, settings
    from lab.db import session
    from lab.tables import Job, Metric, utcnow

    s = settings.load()
    exp = experiments.get_or_create(s, "bench")
    r = random.Random(0)
    old = jobstore.enqueue_many(s, [{"experiment_id": exp, "plugin": r.choice(["sft", "dpo", "eval-perplexity"]),
                                  "params": {"learning_rate": 1e-4}, "model_id": None, "dataset_id": None,
                                  "priority": 0} for _ in range(history - runs_to_compare - 1)])
    compared = jobstore.enqueue_many(s, [{"experiment_id": exp, "plugin": "sft", "params": {
        "learning_rate": r.choice([1e-4, 2e-4, 5e-4]), "lora_r": r.choice([8, 16]), "seed": 42}, "model_id": None,
        "dataset_id": None, "priority": 0} for _ in range(runs_to_compare)])
    long_run = jobstore.enqueue(s, experiment_id=exp, plugin="sft", params={"max_steps": long_points})
    start = utcnow() - timedelta(days=1)
    with session(s) as db:
        db.execute(update(Job).where(Job.id.in_(old + compared)).values(
            status="completed", attempts=1, started_at=start, finished_at=start + timedelta(minutes=10), step=100,
            total_steps=100))
        db.execute(update(Job).where(Job.id.in_(old[::10])).values(status="failed", failure="oom",
                                                                    error="out of memory"))
        db.execute(update(Job).where(Job.id == long_run).values(
            status="running", attempts=1, started_at=start, step=long_points // len(LONG_RUN_KEYS),
            total_steps=2 * long_points // len(LONG_RUN_KEYS), heartbeat_at=utcnow(), phase="training"))
    for job_id in compared:
        lr = r.uniform(0.5, 2)
        rows = []
        for step in range(1, points + 1):
            t = start + timedelta(seconds=step)
            rows += [{"job_id": job_id, "step": step, "key": "loss", "value": 3 * math.exp(-lr * step / points)
                      + r.gauss(0, 0.05), "time": t},
                     {"job_id": job_id, "step": step, "key": "num_tokens", "value": step * 512.0, "time": t}]
        with session(s) as db:
            db.execute(insert(Metric), rows)
    steps = long_points // len(LONG_RUN_KEYS)
    rows = [{"job_id": long_run, "step": step, "key": key, "value": 3 * math.exp(-step / steps) + r.gauss(0, 0.05),
             "time": start + timedelta(seconds=step)} for step in range(1, steps + 1) for key in LONG_RUN_KEYS]
    with session(s) as db:
        db.execute(insert(Metric), rows)
    return {"settings": s, "compared": compared, "long_run": long_run, "next_step": steps + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "TIMINGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return
    workspace = fresh()
    sys.path.insert(0, str(ROOT))
    made = fill(runs_to_compare=50, points=2000, history=1000, long_points=50_000)
    print(f"workspace: 1,000 jobs; run {made['long_run']} with 50,000 points; 50 runs x 2,000 points to compare")

    timings = Path(workspace) / "handler-times.jsonl"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(timings)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        measure(f"http://127.0.0.1:{port}/", timings, made, args.repeats)
    finally:
        server.terminate()
        server.wait(30)


def measure(url: str, timings: Path, made: dict, repeats: int) -> None:
    from gradio_client import Client

    from lab.sdk import RunContext

    deadline = time.monotonic() + 180
    while True:
        try:
            client = Client(url, verbose=False)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    sent = {d.get("api_name"): len(d["inputs"]) for d in client.config["dependencies"]}
    ids = [str(i) for i in made["compared"]]
    long_run = made["long_run"]
    ctx = RunContext(settings=made["settings"], job_id=long_run, plugin="sft", experiment="bench",
                     run_dir=Path(tempfile.mkdtemp()))
    step = [made["next_step"]]

    def log_more():  # the running job logs a step's points between two ticks
        ctx.log_metrics(step[0], {k: 1.0 + 1 / step[0] for k in LONG_RUN_KEYS})
        step[0] += 1

    def other_run():  # the session opens another run in between: the next opening reads every point again
        log_more()
        opener.predict(made["compared"][0], [], api_name="/view")

    opener = Client(url, verbose=False)
    events = [  # name shown, api name, arguments, set-up before each call, the session that calls
        ("page load (every list and table)", "/on_load", ("default", "sft", "all", "all"), None, None),
        ("tab switch (lists and tables again)", "/refresh", ("default", "sft", "all", "all"), None, None),
        ("Jobs: filter the 1,000 jobs", "/jobs_filter", ("all", "completed"), None, None),
        ("Jobs: the table's refresh every 2 s", "/jobs_tick", ("all", "all"), None, None),
        ("Train: a field of the form changes", "/capture", None, None, None),
        ("Train: method changes", "/on_plugin", ("dpo", None, None), None, None),
        ("Train: command line and estimate", "/on_preview", (1, "auto", 1, None, [], 1, None, "", None, "sft", None,
                                                             None, 0, "default"), None, None),
        ("Run view: open the 50,000-point run (old tick)", "/view", (long_run, []), other_run, opener),
        ("Run view: tick with new points", "/tick", (long_run, []), log_more, None),
        ("Compare: pick 50 runs (leaderboard, diff)", "/on_runs", (ids, "loss", False), None, None),
        ("Compare: curves by step", "/on_chart", (ids, "loss", "step", 0, False), None, None),
        ("Compare: curves by tokens, smoothed", "/on_chart", (ids, "loss", "tokens", 0.6, False), None, None),
    ]
    components = {c["id"]: c for c in client.config["components"]}
    capture = next(d for d in client.config["dependencies"] if d.get("api_name") == "capture")
    form_values = tuple(components[i].get("props", {}).get("value") for i in capture["inputs"]
                        if components[i]["type"] != "state")  # the first form as the page shows it
    print(f"\n{'event':<48} {'inputs sent':>11} {'p95 client':>11} {'p95 handler':>12} {'median':>8} {'first':>7}")
    results = {}
    client.predict(long_run, [], api_name="/view")  # the session that ticks has the run open
    client.predict(api_name="/refresh_filters")  # the Compare page picks the 50 runs as a person would
    picked = client.predict("all", "sft", "completed", "all", "all", "train", 50, False, api_name="/on_pick")
    assert sorted(int(v) for v in picked[0]["value"]) == sorted(made["compared"]), picked
    for name, api, arguments, before, caller in events:
        if api == "/capture":
            arguments = form_values
        seen = timings.stat().st_size if timings.exists() else 0
        walls = []
        for _ in range(repeats):
            if before:
                before()
            start = time.perf_counter()
            (caller or client).predict(*arguments, api_name=api)
            walls.append(time.perf_counter() - start)
        with open(timings) as f:
            f.seek(seen)
            handled = [json.loads(line)["s"] for line in f if json.loads(line)["event"] == api.lstrip("/")]
        results[name] = (p95(walls), p95(handled) if handled else float("nan"))
        print(f"{name:<48} {sent.get(api.lstrip('/'), 0):>11} {results[name][0]:>10.3f}s {results[name][1]:>11.3f}s "
              f"{statistics.median(walls):>7.3f}s {walls[0]:>6.3f}s")
    train_inputs = max(n for api, n in sent.items() if api and api.startswith(("capture", "on_preview", "on_plugin",
                                                                                 "on_launch")))
    print(f"\nthe most inputs any Train event sends: {train_inputs} (every plugin's form together: "
          f"{sum(n - 1 for api, n in sent.items() if api and api.startswith('capture'))})")
    floor = results["Train: a field of the form changes"]
    print(f"gradio_client's own round trip (an event whose handler takes {1000 * floor[1]:.1f} ms): "
          f"{floor[0]:.3f} s at p95")
    worst = max(results.items(), key=lambda kv: kv[1][0])
    print(f"slowest event (p95 through gradio_client): {worst[0]} {worst[1][0]:.3f} s; goal under 0.200 s")
    old, old_server = results["Run view: open the 50,000-point run (old tick)"]
    new, new_server = results["Run view: tick with new points"]
    print(f"run view tick through gradio_client: every point each tick {old:.3f} s, only new points {new:.3f} s (p95)")
    print(f"run view tick in the server: every point each tick {old_server:.3f} s, only new points {new_server:.3f} s "
          f"(p95)")
    print(f"ratio {old_server / new_server:.2f}x")


if __name__ == "__main__":
    main()
