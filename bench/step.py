"""Where a training step's time goes: the same LoRA SFT run through the lab with its defaults (gradient checkpointing
only when the activations need the memory, no LoRA dropout, and then the loss over the whole logits at once), with
TRL's and the lab's earlier settings (gradient checkpointing on, LoRA dropout 0.05), and with the lab's settings but
TRL's chunked loss. It prints training tokens/s, the last loss and, from the torch profiler over two steps of each
run, the seconds per step and the share in matrix multiplications and in dropout's random masks.

    .venv/bin/python bench/step.py [--steps 8]

Data: ../shared/data/sft/alpaca_train.jsonl when it is there, else the lab's demo rows. Model: the starter.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from workspace import fresh_with_rows

SETTINGS = {
    "before: checkpointing on, dropout 0.05": {"gradient_checkpointing": "on", "lora_dropout": 0.05},
    "no checkpointing or dropout, chunked loss": {"extra_args": json.dumps({"loss_type": "chunked_nll"})},
    "lab default": {},
}


def bernoulli_share(profile: Path, wall: float) -> float:
    """The part of the profiled steps' wall time in aten::bernoulli_ (dropout's masks), read from profile.txt."""
    row = next((line for line in profile.read_text().splitlines() if line.strip().startswith("aten::bernoulli_")), "")
    found = re.findall(r"([\d.]+)(us|ms|s)\b", row)
    if not found:
        return 0.0
    value, unit = found[0]  # the first time in a row is its self time
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit] / wall


def main() -> None:
    parser = argparse.ArgumentParser(description="the lab's training step against its earlier settings")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    from lab import jobstore, registry, runs

    s, tmp, data = fresh_with_rows(200)
    model = registry.ensure_starter(s)
    print(f"model {model['name']}, data {data.name}, LoRA r8, {args.steps} steps of batch 4, max length 256, "
          "precision auto")
    results = {}
    for name, chosen in SETTINGS.items():
        params = {"max_steps": args.steps, "lora_r": 8, "batch_size": 4, "max_length": 256, "profile_steps": 2,
                  **chosen}
        job_id = runs.submit(s, "sft", model=model["name"], dataset="rows", experiment="bench", params=params)
        subprocess.run([sys.executable, "-m", "lab.cli", "worker", "--once"], capture_output=True, check=False)
        job = jobstore.get(s, job_id)
        if job.status != "completed":
            sys.exit(f"{name} run failed: {job.error}")
        points = runs.metrics(s, [job_id], ["num_tokens", "train_runtime", "loss", "profile/matmul_share",
                                            "profile/step_s"])[job_id]
        log = (Path(job.run_dir) / "log.txt").read_text()
        said = [line.replace("[lab] ", "") for line in log.splitlines()
                if "[lab] gradient checkpointing" in line or "[lab] precision" in line]
        step_s = points["profile/step_s"][-1][1]
        results[name] = {"tps": points["num_tokens"][-1][1] / points["train_runtime"][-1][1],
                         "tokens": points["num_tokens"][-1][1], "loss": points["loss"][-1][1], "step_s": step_s,
                         "matmul": points["profile/matmul_share"][-1][1],
                         "dropout": bernoulli_share(Path(job.run_dir) / "profile.txt", 2 * step_s), "said": said}
    print(f"{'':>40} {'tokens/s':>9} {'tokens':>7} {'last loss':>10} {'profiled step':>14} {'in matmul':>10} "
          f"{'in dropout':>10}")
    for name, r in results.items():
        print(f"{name:>40} {r['tps']:>9.1f} {r['tokens']:>7.0f} {r['loss']:>10.4f} {r['step_s']:>12.2f} s "
              f"{100 * r['matmul']:>8.1f} % {100 * r['dropout']:>8.1f} %   {'; '.join(r['said'])}")
    before, _, now = results.values()
    print(f"ratio {now['tps'] / before['tps']:.2f}x (the lab's default against its earlier settings, tokens/s)")


if __name__ == "__main__":
    main()
