"""Speed and precision: the machine's matrix-multiply peak (for model FLOPs utilisation), whether bf16 is
available, and the quality check that decides `precision: auto`."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported() -> bool:
    """bf16 matrix instructions: a GPU that has them, or a CPU with AVX512-BF16 or AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _measure_peak(dtype_name: str, seconds: float = 0.4) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n = 1024 if device() == "cpu" else 4096
    a = torch.randn(n, n, dtype=dtype, device=device())
    b = torch.randn(n, n, dtype=dtype, device=device())
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device() == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def peak_flops(cache_dir: Path, dtype_name: str) -> float:
    """Matrix-multiply FLOP/s of this machine in `dtype_name`, measured once and kept in the workspace."""
    path = cache_dir / "machine.json"
    key = f"{socket.gethostname()}/{device()}/{dtype_name}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = _measure_peak(dtype_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2) + "\n")
    return cache[key]


PROBE = ("The lab trains language models on text. A model reads the words so far and predicts the next one; "
         "training makes those predictions better, one small step at a time.")


def bf16_quality_ok(model, tokenizer, tolerance: float = 0.02) -> tuple[bool, float]:
    """A probe text through the model in fp32 and with bf16 autocast: the language-modeling loss (or, for a
    model with another head, the output scores) must agree within `tolerance`, relative."""
    import torch

    batch = tokenizer(PROBE, return_tensors="pt").to(model.device)
    is_lm = getattr(model, "get_output_embeddings", lambda: None)() is not None

    def probe():
        if is_lm:
            return model(**batch, labels=batch["input_ids"]).loss.float().reshape(1)
        return model(**batch).logits.float().flatten()

    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = probe()
        with torch.autocast(device_type=device(), dtype=torch.bfloat16):
            low = probe()
    model.train(was_training)
    diff = ((low - ref).norm() / ref.norm().clamp_min(1e-6)).item()
    return diff <= tolerance, diff


def choose_bf16(requested: str, model, tokenizer, log) -> bool:
    """`precision` of a training plugin: fp32, bf16, or auto (bf16 when the hardware has it and the check passes)."""
    if requested == "fp32":
        log("[lab] precision fp32 (asked for)")
        return False
    if not bf16_supported():
        if requested == "bf16":
            from lab.errors import LabError

            raise LabError("bf16 was asked for, but this machine has no bf16 matrix instructions")
        log("[lab] precision fp32 (no bf16 matrix instructions here)")
        return False
    if requested == "bf16":
        log("[lab] precision bf16 mixed (asked for)")
        return True
    try:
        ok, diff = bf16_quality_ok(model, tokenizer)
    except Exception as exc:  # a model the probe does not fit: stay on the safe side
        log(f"[lab] precision fp32 (the bf16 check could not run: {exc})")
        return False
    log(f"[lab] precision {'bf16 mixed' if ok else 'fp32'} (auto: the probe differs by {100 * diff:.2f} % in bf16, "
        f"limit 2 %)")
    return ok
