"""Answers per second of the `generate` job (batched, the KV cache, left padding) against a plain transformers
loop that answers one prompt at a time, on the starter model, with the same prompts, sampling settings and answer
length. Both sides leave model loading out: the job's figure is its own `generate/answers_per_s` (generation time
only), the loop's is timed around its `generate` calls.

    .venv/bin/python bench/generation.py [--prompts 16] [--samples 2] [--max-new-tokens 64] [--batch-size 16]

Data: the instructions of ../shared/data/sft/alpaca_train.jsonl when it is there, else the lab's demo rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "sft" / "alpaca_train.jsonl"
DEMO = ROOT / "lab" / "demo" / "instructions.jsonl"


def one_at_a_time(path: str, prompts: list[list[dict]], samples: int, max_new_tokens: int) -> tuple[int, float]:
    """The plain loop: each prompt alone, `samples` times; returns (answers, seconds generating)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    answers, seconds = 0, 0.0
    for prompt in prompts:
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        for _ in range(samples):
            began = time.perf_counter()
            with torch.no_grad():
                model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                               pad_token_id=tok.pad_token_id or tok.eos_token_id)
            seconds += time.perf_counter() - began
            answers += 1
    return answers, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description="batched generate job against one prompt at a time")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="lab-bench-")
    os.environ.update({"LAB_WORKSPACE": tmp, "LAB_WANDB": "off", "LAB_REPORT_TO": "none"})
    os.environ.pop("LAB_DATABASE_URL", None)
    from lab import datasets, formats, jobstore, registry, runs, settings

    s = settings.load()
    data = ALPACA if ALPACA.exists() else DEMO
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r.get("input")][: args.prompts]
    subset = Path(tmp) / "prompts.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.add(s, "prompts", subset)
    model = registry.ensure_starter(s)
    print(f"model {model['name']}, {len(rows)} prompts from {data.name} × {args.samples} samples, up to "
          f"{args.max_new_tokens} new tokens, temperature 0.8, top-p 0.95; {os.cpu_count()} CPU cores")
    params = {"num_samples": args.samples, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "temperature": 0.8, "top_p": 0.95}
    job_id = runs.submit(s, "generate", model=model["name"], dataset="prompts", experiment="bench",
                         params={k: str(v) for k, v in params.items()})
    subprocess.run([sys.executable, "-m", "lab.cli", "worker", "--once"], capture_output=True, check=False)
    job = jobstore.get(s, job_id)
    if job.status != "completed":
        sys.exit(f"the generate job failed: {job.error}")
    found = runs.metrics(s, [job_id], ["generate/answers_per_s", "generate/tokens_per_s", "generate/answers"])[job_id]
    batched = found["generate/answers_per_s"][-1][1]
    prompts = [formats.prompt_of("alpaca", r) for r in rows]
    answers, seconds = one_at_a_time(model["path"], prompts, args.samples, args.max_new_tokens)
    single = answers / seconds
    print(f"{'':>26} {'answers':>8} {'answers/s':>10}")
    print(f"{'generate job (batch ' + str(args.batch_size) + ')':>26} {found['generate/answers'][-1][1]:>8.0f} "
          f"{batched:>10.2f}   ({found['generate/tokens_per_s'][-1][1]:.1f} new tokens/s)")
    print(f"{'one prompt at a time':>26} {answers:>8} {single:>10.2f}")
    print(f"ratio {batched / single:.2f}x")


if __name__ == "__main__":
    main()
