"""Time from `lab run` to the job's first training step: through Slurm against the local executor.

    .venv/bin/python bench/slurm_latency.py [--repeats 3]

As root, on a machine with Debian's slurm-wlm and munge (`make slurm`): a throwaway single-node Slurm cluster
(lab/slurmcluster.py) and one idle worker of each kind (`lab worker` and `lab worker --executor slurm`, the probe
done), both on their own fresh SQLite workspace with a tiny model. Each repeat queues the same 2-step LoRA SFT on
the tiny model and measures submit -> the first step's loss recorded, then lets the job finish. The baseline is the
local executor; the ratio is Slurm's time over it (how much the cluster adds before training starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [{"prompt": f"Say {w}", "completion": w} for w in ("red", "green", "blue", "amber")] * 4
SFT = {"max_steps": "2", "batch_size": "2", "precision": "fp32", "logging_steps": "1"}


def first_step_s(s, worker_env: dict, repeats: int) -> list[float]:
    """Start one worker with `worker_env`, then time submit -> first loss point, `repeats` times."""
    from lab import jobstore, runs

    worker = subprocess.Popen([sys.executable, "-m", "lab.cli", "worker"], env=worker_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    times = []
    try:
        from lab.jobstore import live_workers

        deadline = time.monotonic() + 120
        while not live_workers(s):  # up (and, for Slurm, its probe job done)
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start:\n{worker.stdout.read()}")
            time.sleep(0.1)
        time.sleep(1.0)
        for _ in range(repeats):
            t0 = time.monotonic()
            job_id = runs.submit(s, "sft", model="tiny", dataset="colours", params=SFT)
            while not runs.metrics(s, [job_id], ["loss"]).get(job_id):
                if jobstore.get(s, job_id).status in ("failed", "cancelled"):
                    raise SystemExit(f"job {job_id} {jobstore.get(s, job_id).status}: {jobstore.get(s, job_id).error}")
                time.sleep(0.02)
            times.append(time.monotonic() - t0)
            while jobstore.get(s, job_id).status not in ("completed", "failed", "cancelled"):
                time.sleep(0.1)
            assert jobstore.get(s, job_id).status == "completed", jobstore.get(s, job_id).error
    finally:
        worker.terminate()
        worker.wait(60)
    return times


def workspace(kind: str, model_dir: Path) -> tuple[object, dict]:
    from lab import datasets, db, registry, settings

    folder = Path(tempfile.mkdtemp(prefix=f"lab-bench-{kind}-"))
    env = {**os.environ, "LAB_WORKSPACE": str(folder / "ws"), "LAB_WANDB": "off", "LAB_EXECUTOR": kind,
           "LAB_SLURM_POLL_S": "0.5"}
    os.environ.update({k: env[k] for k in ("LAB_WORKSPACE", "LAB_EXECUTOR")})
    db.dispose_all()
    s = settings.load()
    registry.add_folder(s, "tiny", model_dir)
    data = folder / "colours.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    datasets.add(s, "colours", data)
    return s, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.pop("LAB_DATABASE_URL", None)
    from lab.registry import build_tiny
    from lab.slurmcluster import throwaway_cluster

    model_dir = Path(tempfile.mkdtemp(prefix="lab-bench-tiny-")) / "model"
    build_tiny(model_dir)
    with throwaway_cluster() as conf:
        os.environ["SLURM_CONF"] = str(conf)
        local = first_step_s(*workspace("local", model_dir), args.repeats)
        slurm = first_step_s(*workspace("slurm", model_dir), args.repeats)
    show = ", ".join
    print(f"lab run -> first training step, tiny model, {args.repeats} repeats (LAB_SLURM_POLL_S=0.5)")
    print(f"local executor: {show(f'{t:.2f}' for t in local)} s (median {statistics.median(local):.2f} s)")
    print(f"slurm executor: {show(f'{t:.2f}' for t in slurm)} s (median {statistics.median(slurm):.2f} s)")
    print(f"ratio {statistics.median(slurm) / statistics.median(local):.2f}x")


if __name__ == "__main__":
    main()
