"""What the lab costs: one SFT configuration run through the lab (queue, worker, runner, metrics to the database)
and as a bare TRL script, in one run, printing training tokens/s of both and their ratio. Goal: under 2 %.

    .venv/bin/python bench/overhead.py [--model starter|tiny] [--steps 10] [--repeats 1]

Both sides train the same LoRA (no dropout, the lab's default) on the same rows in the same batches (padded, TRL's
default), without gradient checkpointing (what the lab chooses for this model; SFTConfig's default is on) and in
the same precision (bf16 where the machine has bf16 matrix instructions, else fp32: SFTConfig alone would take bf16
even on a CPU that multiplies bf16 several times slower), each in a fresh Python process; tokens/s is the number
of tokens trained on divided by the Trainer's own train_runtime, so loading and process start are left out of both.
The end-to-end wall time (from submit, or from starting the script, to the end) is printed as well. On a shared
2-core machine repeats differ by 10 % or more, more than the lab's cost, so the lab's own work per logged step
(metrics insert, progress update, cancel check) is also timed directly and given as a share of a training step.
Data: ../shared/data/sft/alpaca_train.jsonl when it is there, else the lab's demo rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workspace import fresh_with_rows

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 2e-4, "batch_size": 4,
          "max_length": 256, "seed": 42}

# The baseline: a plain TRL script with the same data conversion, LoRA and arguments as plugins/sft.py.
BARE = r'''
import json, sys
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
model_path, data_path, out = sys.argv[1], sys.argv[2], sys.argv[4]
steps, cfg = int(sys.argv[3]), json.loads(sys.argv[5])
rows = [json.loads(l) for l in open(data_path)][:200]
def convert(r):
    user = r["instruction"].strip() + (f"\n\n{r['input'].strip()}" if r.get("input", "").strip() else "")
    return {"prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": r["output"]}]}
data = Dataset.from_list([convert(r) for r in rows])
tok = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)
args = SFTConfig(output_dir=out, report_to=[], learning_rate=cfg["learning_rate"], max_steps=steps,
                 per_device_train_batch_size=cfg["batch_size"], max_length=cfg["max_length"], logging_steps=1,
                 seed=cfg["seed"], data_seed=cfg["seed"], save_strategy="no", disable_tqdm=True, use_cpu=True,
                 completion_only_loss=True, lr_scheduler_type="linear", dataloader_num_workers=0,
                 bf16=cfg["bf16"],  # SFTConfig's own default is bf16 on any machine
                 gradient_checkpointing=False)  # and gradient checkpointing on
peft = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                  target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft)
trainer.train()
logs = trainer.state.log_history
tokens = max(l.get("num_tokens", 0) for l in logs)
runtime = next(l["train_runtime"] for l in logs if "train_runtime" in l)
print("RESULT", json.dumps({"tokens": tokens, "runtime": runtime}))
'''


def run_bare(model_path: str, data: Path, steps: int) -> dict:
    from lab import speed

    t0 = time.time()
    cfg = {**CONFIG, "bf16": speed.bf16_supported()}
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", BARE, model_path, str(data), str(steps), out, json.dumps(cfg)],
                              capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"bare TRL run failed:\n{done.stderr[-3000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[7:])
    return {**result, "wall": time.time() - t0}


def run_lab(s, model: str, dataset: str, steps: int) -> dict:
    from lab import jobstore, runs, speed

    t0 = time.time()
    # the same batches and precision as the bare script: padded rows (TRL's default), bf16 where the machine has it
    params = {**{k: str(v) for k, v in CONFIG.items()}, "max_steps": str(steps), "batching": "padded",
              "precision": "bf16" if speed.bf16_supported() else "fp32", "gradient_checkpointing": "off"}
    job_id = runs.submit(s, "sft", model=model, dataset=dataset, experiment="bench", params=params)
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "worker", "--once"], capture_output=True, text=True,
                          check=False)
    job = jobstore.get(s, job_id)
    if job.status != "completed":
        sys.exit(f"lab run failed: {job.error}\n{job.log_tail}\n{proc.stdout}")
    points = runs.metrics(s, [job_id], ["num_tokens", "train_runtime"])[job_id]
    return {"tokens": max(v for _, v, _ in points["num_tokens"]), "runtime": points["train_runtime"][-1][1],
            "wall": time.time() - t0}


def callback_cost(s, calls: int = 200) -> float:
    """Seconds the lab adds per logged step (metrics insert, progress update, cancel check), timed directly."""
    from lab import runs
    from lab.sdk import RunContext

    job_id = runs.submit(s, "sft", model="rows-model", dataset="rows", experiment="bench-callback",
                         params={"max_steps": "1"})
    ctx = RunContext(settings=s, job_id=job_id, plugin="sft", experiment="bench-callback", run_dir=Path(s.workspace))
    logs = {"loss": 1.0, "grad_norm": 0.5, "learning_rate": 2e-4, "entropy": 1.0, "num_tokens": 100.0,
            "mean_token_accuracy": 0.5, "epoch": 0.1}
    t0 = time.perf_counter()
    for step in range(calls):
        ctx.log_metrics(step, logs)
        ctx.set_progress(step, calls)
        ctx.cancelled()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description="lab overhead versus a bare TRL script")
    parser.add_argument("--model", choices=("starter", "tiny"), default="starter")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from lab import registry

    s, tmp, data = fresh_with_rows(200)
    info = registry.ensure_starter(s) if args.model == "starter" else registry.create_tiny(s, "tiny")
    registry.create_tiny(s, "rows-model", hidden=8, layers=1)  # a stand-in input for the callback timing
    print(f"model {info['name']} ({info['parameters'] / 1e6:.1f} M parameters), data {data.name}, "
          f"{args.steps} LoRA steps, batch {CONFIG['batch_size']}, max length {CONFIG['max_length']}")
    bare, lab = [], []
    for _ in range(args.repeats):
        bare.append(run_bare(info["path"], tmp / "rows.jsonl", args.steps))
        lab.append(run_lab(s, info["name"], "rows", args.steps))

    def tps(results: list[dict]) -> float:
        return statistics.median(r["tokens"] / r["runtime"] for r in results)

    def wall(results: list[dict]) -> float:
        return statistics.median(r["wall"] for r in results)

    for i, (b, lb) in enumerate(zip(bare, lab, strict=True), start=1):
        print(f"repeat {i}: bare {b['tokens']:.0f} tokens in {b['runtime']:.1f} s, lab {lb['tokens']:.0f} tokens in "
              f"{lb['runtime']:.1f} s")
    print(f"{'':>10} {'tokens/s':>10} {'end-to-end':>11}")
    print(f"{'bare TRL':>10} {tps(bare):>10.1f} {wall(bare):>10.1f}s")
    print(f"{'lab':>10} {tps(lab):>10.1f} {wall(lab):>10.1f}s")
    per_step = callback_cost(s)
    step_s = statistics.median(r["runtime"] for r in bare) / args.steps
    print(f"the lab's own work per logged step, timed directly: {1000 * per_step:.2f} ms, "
          f"{100 * per_step / step_s:.3f} % of a {step_s:.2f} s training step")
    print(f"lab/bare tokens/s ratio: {tps(lab) / tps(bare):.3f} (overhead {100 * (1 - tps(lab) / tps(bare)):+.1f} %; "
          f"goal under 2 %)")


if __name__ == "__main__":
    main()
