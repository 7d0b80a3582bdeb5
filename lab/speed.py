"""Speed and precision: the machine's matrix-multiply peak (for model FLOPs utilisation), whether bf16 is
available, and the quality check that decides `precision: auto`."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far, in MiB: `peak_memory_mb` is the largest resident set of the process (its
    own, since its program started: the kernel's VmHWM, which a fresh program starts anew, unlike getrusage's
    ru_maxrss, which keeps the peak of the process it was forked from) or of any process it started and waited for;
    `peak_gpu_memory_mb` is what torch allocated at most on this process's GPU."""
    import resource
    import sys

    try:
        own = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))  # KiB
    except (OSError, StopIteration, ValueError):  # not Linux
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kib = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    found = {"peak_memory_mb": kib / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        found["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return found


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
        _publish(path, json.dumps(cache, indent=2) + "\n")
    return cache[key]


def _publish(path: Path, text: str) -> None:
    """Write a file whole or not at all: into a temporary file beside it, then one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"})


def matmul_seconds(events, on_gpu: bool = False) -> float:
    """Seconds the torch profiler's events spent in matrix multiplications, each counted once (an outer matmul
    op's time includes any matmul op it calls): CPU time, or on a GPU the time of the kernels they launched."""
    total = 0.0
    for event in events:
        if event.name not in MATMUL_OPS:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in MATMUL_OPS:
            parent = parent.cpu_parent
        if parent is None:
            total += (event.device_time_total if on_gpu else event.cpu_time_total) / 1e6
    return total


def step_profiler(ctx, steps: int):
    """A TrainerCallback that records `steps` training steps with the torch profiler, starting with this process's
    second step (the first warms up). When training ends it writes into the run's folder profile.txt (the ops that
    took the time) and profile.json.gz (a trace for Perfetto or chrome://tracing), and logs profile/step_s (wall
    seconds per profiled step, logging and saving between them included) and profile/matmul_share (the part of
    that time in matrix multiplications)."""
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self._begun = 0  # optimizer steps begun by this process
            self._profile = None
            self._start = 0.0
            self._stopped = None  # (profile, wall seconds, steps, last step) once the profiled steps are done

        def on_step_begin(self, args, state, control, **kwargs):
            self._begun += 1
            if self._begun == 2 and ctx.is_main:
                import torch

                # Kineto's own lines (profiler_start, profiler_stop) stay out of the run's log
                os.environ.setdefault("KINETO_LOG_LEVEL", "6")

                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self._profile = torch.profiler.profile(activities=activities)
                self._profile.__enter__()
                self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._profile is not None and self._begun >= 1 + steps:
                self._stop(state)

        def on_train_end(self, args, state, control, **kwargs):
            if self._profile is not None:  # training ended before the profiled steps did
                self._stop(state)
            if self._stopped is not None:  # written now, outside the steps' times and tokens/s
                self._report(*self._stopped)

        def _stop(self, state) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self._start
            self._profile.__exit__(None, None, None)
            self._stopped = (self._profile, wall, self._begun - 1, state.global_step)
            self._profile = None

        def _report(self, profile, wall: float, done: int, last: int) -> None:
            import torch

            on_gpu = torch.cuda.is_available()
            share = matmul_seconds(profile.events(), on_gpu) / wall if wall > 0 else 0.0
            table = profile.key_averages().table(
                sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=30)
            _publish(ctx.run_dir / "profile.txt",
                     f"{done} training step(s) profiled (steps {last - done + 1}-{last}), {wall:.3f} s of wall time: "
                     f"{wall / done:.3f} s per step, {100 * share:.1f} % of it in matrix multiplications "
                     f"({', '.join(sorted(MATMUL_OPS))}).\n\n{table}\n")
            tmp = ctx.run_dir / f".profile.{os.getpid()}.tmp.json.gz"  # torch compresses a name ending in .gz
            profile.export_chrome_trace(str(tmp))
            os.replace(tmp, ctx.run_dir / "profile.json.gz")
            ctx.log_metrics(last, {"profile/step_s": wall / done, "profile/matmul_share": share})
            ctx.log(f"[lab] profiled {done} step(s): {wall / done:.3f} s per step, {100 * share:.1f} % in matrix "
                    f"multiplications; the ops by time are in profile.txt, the trace in profile.json.gz")

    return StepProfiler()


def available_memory() -> int | None:
    """Bytes the kernel says can still be used (MemAvailable); None where that is unknown."""
    return _meminfo("MemAvailable")


def total_memory() -> int | None:
    """This machine's memory in bytes (MemTotal); None where that is unknown."""
    return _meminfo("MemTotal")


def _meminfo(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def activation_bytes(hidden: int, layers: int, vocab: int, batch: int, tokens: float, heads: int = 1,
                     method: str = "", params: dict | None = None) -> float:
    """What one training step of `method` keeps for its backward pass without gradient checkpointing, for `batch`
    sequences of `tokens`: activations, attention scores and logits, as lab.memory estimates them (calibrated on
    measured peaks)."""
    from lab import memory

    step = memory.step_of(method, {**(params or {}), "batch_size": batch, "max_length": int(tokens)}, int(tokens))
    config = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "vocab_size": vocab}
    lora = bool((params or {}).get("use_lora"))  # LoRA's dropout keeps copies of the adapted layers' inputs
    by_part = memory.parts(config, 0, 0, not lora, method, step, lora_dropout=(params or {}).get("lora_dropout", 0.05))
    return by_part["activations"] + by_part["attention"] + by_part["logits"]


CHECKPOINT_SHARE = 0.25  # auto checkpoints when the activations would take more than this part of the free memory


def choose_checkpointing(requested: str, model, batch: int, tokens: int, log, processes: int = 1, method: str = "",
                         params: dict | None = None) -> bool:
    """`gradient_checkpointing` of a trainer: on, off, or auto. Checkpointing recomputes each layer's activations
    in the backward pass instead of keeping them: less memory for a third more compute (and a second pass through
    LoRA's dropout). auto turns it on only when the activations would take over a quarter of the free memory (the
    GPU's, or the machine's shared by its training processes)."""
    if requested in ("on", "off"):
        log(f"[lab] gradient checkpointing {requested} (asked for)")
        return requested == "on"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    need = activation_bytes(getattr(config, "hidden_size", 0) or 0, getattr(config, "num_hidden_layers", 0) or 0,
                            getattr(config, "vocab_size", 0) or 0, batch, tokens,
                            getattr(config, "num_attention_heads", 1) or 1, method, params)
    if device() == "cuda":
        import torch

        free = torch.cuda.mem_get_info()[0]
        if next(model.parameters()).device.type == "cpu":  # the trainer moves the weights there first
            free -= sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        free = available_memory()
        if free is None:
            log("[lab] gradient checkpointing on (auto: the free memory is unknown here)")
            return True
        free //= max(1, processes)
    on = need > CHECKPOINT_SHARE * max(free, 0)
    log(f"[lab] gradient checkpointing {'on' if on else 'off'} (auto: about {_size(need)} of activations for "
        f"{batch} x {tokens} tokens, {_size(max(free, 0))} free{', over' if on else ', under'} a quarter of it)")
    return on


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


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
