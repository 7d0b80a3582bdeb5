"""The Train page's memory estimate against the peak memory the runs really used: six configurations (methods, LoRA
and full, two lengths) of the starter model, each a real job through the lab's worker, printing estimate ÷ measured
for each. The measured figure is the job process's peak resident set, which every job records when it ends
(`peak_memory_mb`); the estimate is `lab.preview.estimate`, what the page shows before Launch.

    .venv/bin/python bench/memory.py [--steps 3]

Data: the first rows of ../shared/data/sft/alpaca_train.jsonl and preference/hh_train.jsonl when they are there,
else the lab's demo rows (and pairs made from them). Model: the starter.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from workspace import ROOT, fresh_with_rows

HH = ROOT.parent / "shared" / "data" / "preference" / "hh_train.jsonl"
CONFIGS = [  # (plugin, dataset, parameters)
    ("sft", "rows", {"use_lora": True, "batch_size": 4, "max_length": 128}),
    ("sft", "rows", {"use_lora": True, "batch_size": 4, "max_length": 512, "packing": True}),
    ("sft", "rows", {"use_lora": False, "batch_size": 4, "max_length": 128, "learning_rate": 2e-5}),
    ("dpo", "pairs", {"use_lora": True, "batch_size": 2, "max_length": 256}),
    ("reward", "pairs", {"use_lora": True, "batch_size": 4, "max_length": 256, "eval_split": 0}),
    ("kto", "pairs", {"use_lora": True, "batch_size": 4, "max_length": 256}),
]


def _pairs(tmp: Path, rows: int) -> Path:
    out = tmp / "pairs.jsonl"
    if HH.exists():
        with open(HH) as f:
            out.write_text("".join(f.readlines()[:rows]))
    else:
        made = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": r["output"][::-1]}
                for r in map(json.loads, (ROOT / "lab" / "demo" / "instructions.jsonl").read_text().splitlines())]
        out.write_text("".join(json.dumps(r) + "\n" for r in made[:rows]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="memory estimate against measured peaks")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from lab import datasets, jobstore, preview, registry, runs, speed

    s, tmp, data = fresh_with_rows(200)
    datasets.add(s, "pairs", _pairs(tmp, 200))
    model = registry.ensure_starter(s)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags else platform.machine()
    print(f"model {model['name']}, {args.steps} steps each, fp32, on {speed.device()} ({cpu}); data {data.name}, "
          f"{HH.name if HH.exists() else 'pairs made from the demo rows'}")
    print(f"{'configuration':<52} {'estimate':>9} {'measured':>9} {'ratio':>6}")
    ratios = []
    for plugin, dataset, params in CONFIGS:
        params = {**params, "max_steps": args.steps, "precision": "fp32", "lora_r": 8}
        estimate = preview.estimate(s, model["name"], dataset, params)["memory_gb"] * 1000 / 1.048576  # MiB
        job_id = runs.submit(s, plugin, model=model["name"], dataset=dataset, experiment="bench", params=params)
        subprocess.run([sys.executable, "-m", "lab.cli", "worker", "--once"], capture_output=True, check=False)
        job = jobstore.get(s, job_id)
        if job.status != "completed":
            sys.exit(f"{plugin} {params} failed: {job.error}")
        measured = runs.metrics(s, [job_id], ["peak_memory_mb"])[job_id]["peak_memory_mb"][-1][1]
        name = (f"{plugin} {'LoRA r8' if params['use_lora'] else 'full'}, batch {params['batch_size']}, "
                f"max_length {params['max_length']}{' packed' if params.get('packing') else ''}")
        ratios.append(estimate / measured)
        print(f"{name:<52} {estimate:>6,.0f} MiB {measured:>6,.0f} MiB {ratios[-1]:>5.2f}", flush=True)
    inside = sum(0.8 <= r <= 1.25 for r in ratios)
    print(f"{inside} of {len(ratios)} estimates within 0.8-1.25 of the measured peak; "
          f"ratio {min(ratios):.2f}x to {max(ratios):.2f}x")


if __name__ == "__main__":
    main()
