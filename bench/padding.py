"""Useful tokens per second of SFT on rows of uneven length: the lab's default batching (padding-free) against the
setting it replaced (random batches padded to their longest row), with length-grouped batching beside them.

    .venv/bin/python bench/padding.py [--steps 6] [--batch 8]

Data: the first 400 rows of ../shared/data/sft/alpaca_train.jsonl when it is there, else the lab's demo rows.
Model: the starter (SmolLM2-135M), LoRA r8, fp32, max length 512. "Useful" tokens are the rows' own tokens (TRL's
num_tokens counts no padding); padding share is the part of the computed token slots that were padding. The
baseline is `batching=padded`; the ratio is the default's useful tokens/s over it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from workspace import fresh_with_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from lab import jobstore, registry, runs

    s, tmp, data = fresh_with_rows(400)
    model = registry.ensure_starter(s)
    print(f"model {model['name']}, data {data.name} (400 rows), LoRA r8, fp32, {args.steps} steps of batch "
          f"{args.batch}, max length 512")
    results = {}
    for batching in ("padded", "by_length", "padding_free"):
        params = {"max_steps": args.steps, "lora_r": 8, "batch_size": args.batch, "max_length": 512,
                  "precision": "fp32", "batching": batching}
        job_id = runs.submit(s, "sft", model=model["name"], dataset="rows", experiment="bench", params=params)
        subprocess.run([sys.executable, "-m", "lab.cli", "worker", "--once"], capture_output=True, check=False)
        job = jobstore.get(s, job_id)
        if job.status != "completed":
            sys.exit(f"{batching} run failed: {job.error}")
        points = runs.metrics(s, [job_id], ["num_tokens", "train_runtime", "padding_share", "loss"])[job_id]
        results[batching] = {"tps": points["num_tokens"][-1][1] / points["train_runtime"][-1][1],
                             "padding": points["padding_share"][-1][1], "tokens": points["num_tokens"][-1][1],
                             "seconds": points["train_runtime"][-1][1], "loss": points["loss"][-1][1]}
    print(f"{'batching':>23} {'useful tokens/s':>16} {'padding share':>14} {'tokens':>8} {'seconds':>8} "
          f"{'last loss':>10}")
    for name, r in results.items():
        label = f"{name}{' (default)' if name == 'padding_free' else ''}"
        print(f"{label:>23} {r['tps']:>16.1f} {r['padding']:>14.3f} {r['tokens']:>8.0f} {r['seconds']:>8.1f} "
              f"{r['loss']:>10.4f}")
    print(f"ratio {results['padding_free']['tps'] / results['padded']['tps']:.2f}x")


if __name__ == "__main__":
    main()
