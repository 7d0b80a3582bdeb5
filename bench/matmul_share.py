"""Where a LoRA training step's time goes on this CPU, by the torch profiler: the share in matrix multiplies, in
dtype casts and in the rest, for fp32, for bf16 autocast over fp32 weights (how the trainer's bf16 ran before) and
for bf16 autocast over frozen weights stored in bf16 (the lab's bf16 now: the same products, no cast each step).

    .venv/bin/python bench/matmul_share.py [--steps 3] [--batch 4] [--length 256]

The starter model (SmolLM2-135M) with LoRA r8 on every linear layer, random token ids, AdamW on the adapters.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_scaled_dot_product",
          "aten::baddbmm")
CASTS = ("aten::to", "aten::_to_copy", "aten::copy_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    os.environ.update({"LAB_WORKSPACE": tempfile.mkdtemp(prefix="lab-bench-"), "LAB_WANDB": "off"})
    os.environ.pop("LAB_DATABASE_URL", None)
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

    from lab import modeling, registry, settings, speed

    s = settings.load()
    info = registry.info(s, registry.ensure_starter(s)["name"])
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.length))
    results = {}
    for mode in ("fp32", "bf16 autocast, fp32 weights", "bf16 autocast, bf16 frozen weights"):
        model = modeling.causal_lm(info, log=lambda m: None)
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        if mode.endswith("bf16 frozen weights"):
            speed.frozen_weights_to_bf16(model)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer, mode=mode):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.item()

        step()  # warm up
        start = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        seconds = (time.perf_counter() - start) / args.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL))
        casts = sum(e.self_cpu_time_total for e in events if e.key in CASTS)
        results[mode] = seconds
        rest = 100 - 100 * (matmul + casts) / total
        print(f"{mode:>36}: {seconds:.2f} s/step, {args.batch * args.length / seconds:.0f} tokens/s; matmul "
              f"{100 * matmul / total:.0f} %, casts {100 * casts / total:.0f} %, the rest {rest:.0f} % of the "
              f"profiled time; last loss {losses[-1]:.4f}")
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
        print("      " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f} %" for e in top))
    base, old, new = results.values()
    print(f"bf16 over fp32: {base / old:.2f}x with fp32 weights, {base / new:.2f}x with bf16 frozen weights")
    print(f"ratio {old / new:.2f}x")


if __name__ == "__main__":
    main()
