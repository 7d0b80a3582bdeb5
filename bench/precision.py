"""bf16 mixed precision against fp32 on this machine: the same LoRA SFT run through the lab in both precisions,
printing training tokens/s, MFU and the final loss side by side (the quality check that `precision: auto` runs
is printed too), and where the step time goes in each: the share in matrix multiplications, from the torch profiler
over two steps of each run (`profile_steps`; each run's profile.txt lists the ops).

    .venv/bin/python bench/precision.py [--steps 8]

Data: ../shared/data/sft/alpaca_train.jsonl when it is there, else the lab's demo rows. Model: the starter.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from workspace import fresh_with_rows


def main() -> None:
    parser = argparse.ArgumentParser(description="bf16 against fp32")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    from lab import jobstore, registry, runs, speed

    if not speed.bf16_supported():  # the lab refuses precision bf16 here; auto would choose fp32
        sys.exit("this machine has no bf16 matrix instructions (AVX512-BF16 or AMX in /proc/cpuinfo), so there is "
                 "no bf16 to compare: the lab runs fp32 here. Run the benchmark on a machine that has them.")
    s, tmp, data = fresh_with_rows(200)
    model = registry.ensure_starter(s)
    print(f"model {model['name']}, data {data.name}, LoRA r8, {args.steps} steps of batch 4, max length 256; "
          f"bf16 matrix instructions here: {speed.bf16_supported()}")
    results = {}
    for precision in ("fp32", "bf16", "auto"):
        params = {"max_steps": args.steps, "lora_r": 8, "batch_size": 4, "max_length": 256, "precision": precision,
                  "profile_steps": 2}
        job_id = runs.submit(s, "sft", model=model["name"], dataset="rows", experiment="bench", params=params)
        subprocess.run([sys.executable, "-m", "lab.cli", "worker", "--once"], capture_output=True, check=False)
        job = jobstore.get(s, job_id)
        if job.status != "completed":
            sys.exit(f"{precision} run failed: {job.error}")
        points = runs.metrics(s, [job_id], ["num_tokens", "train_runtime", "loss", "mfu", "profile/matmul_share",
                                            "profile/step_s"])[job_id]
        log = (Path(job.run_dir) / "log.txt").read_text()
        choice = next((line for line in log.splitlines() if "[lab] precision" in line), "")
        results[precision] = {"tps": points["num_tokens"][-1][1] / points["train_runtime"][-1][1],
                              "loss": points["loss"][-1][1], "mfu": points["mfu"][-1][1], "choice": choice,
                              "matmul": points["profile/matmul_share"][-1][1],
                              "step_s": points["profile/step_s"][-1][1], "profile": Path(job.run_dir) / "profile.txt"}
    print(f"{'':>6} {'tokens/s':>9} {'MFU':>6} {'last loss':>10} {'profiled step':>14} {'in matmul':>10}")
    for name, r in results.items():
        print(f"{name:>6} {r['tps']:>9.1f} {r['mfu']:>6.3f} {r['loss']:>10.4f} {r['step_s']:>12.2f} s "
              f"{100 * r['matmul']:>8.1f} %   {r['choice'].replace('[lab] ', '')}")
    print("the ops of each profiled run: " + ", ".join(str(r["profile"]) for r in results.values()))
    print(f"bf16/fp32 tokens/s: {results['bf16']['tps'] / results['fp32']['tps']:.2f}x "
          "(MFU is against the peak of the precision used)")


if __name__ == "__main__":
    main()
