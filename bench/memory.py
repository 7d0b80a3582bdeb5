"""The Train page's memory estimate against the peak memory the runs really used: six configurations (methods, LoRA
and full, two lengths) of the starter model that lab.memory's constants were fitted on, and three held out of the
fit, each a real job through the lab's worker, printing estimate ÷ measured for each. The measured figure is the job
process's peak resident set, which every job records when it ends (`peak_memory_mb`); the estimate is
`lab.preview.estimate`, what the page shows before Launch and what a launch is refused by.

    .venv/bin/python bench/memory.py [--steps 3]

Data: rows whose answers run past every max_length here (consecutive passages of ../shared/data/pretrain/
tinyshakespeare.txt when it is there, else the lab's demo answers joined), so that every step is as long as the
configuration allows: the worst step, which is what the estimate is for. Model: the starter.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from workspace import ROOT, fresh_with_rows

CALIBRATED = 6  # the first six configurations: lab.memory's constants were fitted on their measured peaks
CONFIGS = [  # (plugin, dataset, parameters)
    ("sft", "long", {"use_lora": True, "batch_size": 4, "max_length": 128}),
    ("sft", "long", {"use_lora": True, "batch_size": 4, "max_length": 512, "packing": True}),
    ("sft", "long", {"use_lora": False, "batch_size": 4, "max_length": 128, "learning_rate": 2e-5}),
    ("dpo", "pairs", {"use_lora": True, "batch_size": 2, "max_length": 256}),
    ("reward", "short-pairs", {"use_lora": True, "batch_size": 4, "max_length": 256, "eval_split": 0}),
    ("kto", "pairs", {"use_lora": True, "batch_size": 4, "max_length": 256}),
    # held out of the calibration: the estimate's constants were fitted on the six above
    ("sft", "long", {"use_lora": True, "batch_size": 2, "max_length": 384}),
    ("sft", "long", {"use_lora": False, "batch_size": 2, "max_length": 256, "learning_rate": 2e-5}),
    ("dpo", "pairs", {"use_lora": True, "batch_size": 1, "max_length": 512}),
]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"


def _passages(n: int, chars: int = 4000) -> list[str]:
    """n passages of `chars` characters (over 600 tokens each)."""
    if SHAKESPEARE.exists():
        text = SHAKESPEARE.read_text()
    else:
        rows = map(json.loads, (ROOT / "lab" / "demo" / "instructions.jsonl").read_text().splitlines())
        text = " ".join(r["output"] for r in rows)
        text = text * (n * chars // max(1, len(text)) + 1)
    return [text[i * chars % max(1, len(text) - chars):][:chars] for i in range(n)]


def _pairs(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": "Continue the play:", "chosen": texts[2 * i],
                                        "rejected": texts[2 * i + 1]}) + "\n" for i in range(len(texts) // 2)))
    return path


def _long_rows(tmp: Path, n: int) -> tuple[Path, Path]:
    texts = _passages(2 * n)
    rows = tmp / "long.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "Continue the play:", "completion": texts[i]}) + "\n"
                            for i in range(n)))
    return rows, _pairs(tmp / "pairs.jsonl", texts)


def main() -> None:
    parser = argparse.ArgumentParser(description="memory estimate against measured peaks")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from lab import datasets, jobstore, preview, registry, runs, speed

    s, tmp, _ = fresh_with_rows(1)
    rows, pairs = _long_rows(tmp, 64)
    datasets.add(s, "long", rows)
    datasets.add(s, "pairs", pairs)
    # a reward model drops a pair longer than max_length instead of cutting it: answers of about 200 tokens
    datasets.add(s, "short-pairs", _pairs(tmp / "short.jsonl", _passages(128, chars=700)))
    model = registry.ensure_starter(s)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags else platform.machine()
    print(f"model {model['name']}, {args.steps} steps each, fp32, on {speed.device()} ({cpu}); every row past "
          f"max_length ({SHAKESPEARE.name if SHAKESPEARE.exists() else 'the demo answers joined'})")
    print(f"{'configuration':<52} {'estimate':>9} {'measured':>9} {'ratio':>6}")
    ratios, held_out = [], []
    for plugin, dataset, params in CONFIGS:
        params = {**params, "max_steps": args.steps, "precision": "fp32", "lora_r": 8}
        estimate = preview.estimate(s, model["name"], dataset, params, method=plugin)["memory_gb"] * 1000 / 1.048576
        job_id = runs.submit(s, plugin, model=model["name"], dataset=dataset, experiment="bench", params=params)
        subprocess.run([sys.executable, "-m", "lab.cli", "worker", "--once"], capture_output=True, check=False)
        job = jobstore.get(s, job_id)
        if job.status != "completed":
            sys.exit(f"{plugin} {params} failed: {job.error}")
        measured = runs.metrics(s, [job_id], ["peak_memory_mb"])[job_id]["peak_memory_mb"][-1][1]
        name = (f"{plugin} {'LoRA r8' if params['use_lora'] else 'full'}, batch {params['batch_size']}, "
                f"max_length {params['max_length']}{' packed' if params.get('packing') else ''}")
        (ratios if len(ratios) < CALIBRATED else held_out).append(estimate / measured)
        print(f"{name:<52} {estimate:>6,.0f} MiB {measured:>6,.0f} MiB {estimate / measured:>5.2f}", flush=True)
    for what, found in (("calibration", ratios), ("held out", held_out)):
        inside = sum(0.8 <= r <= 1.25 for r in found)
        print(f"{what}: {inside} of {len(found)} estimates within 0.8-1.25 of the measured peak; "
              f"ratio {min(found):.2f}x to {max(found):.2f}x")


if __name__ == "__main__":
    main()
