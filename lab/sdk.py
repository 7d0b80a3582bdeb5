"""What a plugin gets: the RunContext (folders, inputs, metrics, progress, cancellation) and a Trainer callback."""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from lab import jobstore
from lab.datasets import iter_rows
from lab.db import session
from lab.errors import DataError, Diverged, JobCancelled, JobInterrupted
from lab.settings import Settings
from lab.tables import Metric, utcnow


@dataclass
class RunContext:
    """Everything a plugin may use. Plugins never touch the queue, SQL or the UI directly."""

    settings: Settings
    job_id: int
    plugin: str
    experiment: str
    run_dir: Path
    model: dict | None = None  # registry info: name, path, kind, ...; None for plugins that need no model
    dataset: dict | None = None  # dataset info: name, path, format, rows, ...
    models: dict = field(default_factory=dict)  # the further models its parameters name, resolved: {field: info}
    report_to: list[str] = field(default_factory=list)  # the trackers (lab.trackers), set by the runner
    perplexity: bool = False  # also log exp(loss) (pretraining)
    resume_from: Path | None = None  # a retried job's last complete checkpoint (`train` resumes from it)
    stop_requested: threading.Event = field(default_factory=threading.Event)  # SIGTERM: checkpoint, then stop
    training: bool = False  # inside `train`: a stop waits for the step boundary and its checkpoint
    padding: PaddingCounter | None = None  # inside `train`: the trainer's collator, counting padded tokens
    _last_cancel_check: float = 0.0
    _phase: str | None = None  # the last phase asked for, and the one thread that writes it (see set_phase)
    _phase_next: str | None = None
    _phase_writer: threading.Thread | None = None
    _phase_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rank(self) -> int:
        """This process's rank under torchrun (0 when the job runs in one process)."""
        return int(os.environ.get("RANK", "0"))

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, records metrics and progress, and writes the outputs."""
        return self.rank == 0

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def rows(self) -> list[dict]:
        """The dataset's rows, as validated at import: the training rows, or for an evaluation the held-out test
        split when the dataset keeps one (`dataset["split"]` says which)."""
        if self.dataset is None:
            raise RuntimeError(f"plugin {self.plugin} asked for rows but the job has no dataset")
        return list(iter_rows(self.dataset["path"], self.dataset.get("split", "train")))

    def log(self, message: str) -> None:
        """A line in the run's log.txt (stdout goes there); rank 0 only under torchrun."""
        if self.is_main:
            print(message, flush=True)

    def log_metrics(self, step: int, values: dict[str, Any]) -> None:
        """Store every number in `values` as a metric point at `step` (rank 0 only under torchrun). A NaN is kept
        as "not a number" (NULL) and an infinity as itself: a run that breaks shows it."""
        if not self.is_main:
            return
        now = utcnow()
        points = [
            {"job_id": self.job_id, "step": int(step), "key": str(k), "value": None if math.isnan(v) else float(v),
             "time": now}
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if points:
            with session(self.settings) as s:
                s.execute(insert(Metric), points)

    def set_progress(self, step: int, total: int | None) -> None:
        if not self.is_main:
            return
        jobstore.progress(self.settings, self.job_id, step, total)

    def narrator(self, phases: dict[str, str]):
        """A say(line) for services that report as they go (exports, imports): each line goes to the log, a line
        that starts with a key of `phases` sets that phase, and one that says "(N/M steps)" sets the progress."""

        def say(line: str) -> None:
            self.log(line)
            phase = next((p for start, p in phases.items() if line.startswith(start)), None)
            if phase is not None:
                self.set_phase(phase)
            steps = re.search(r"\((\d+)/(\d+) steps\)", line)  # e.g. llama.cpp's build: "40% (12/30 steps)"
            if steps:
                self.set_progress(int(steps[1]), int(steps[2]))

        return say

    def set_phase(self, phase: str) -> None:
        """Say what the job does now (loading, training, evaluating, saving, ...: lab.jobstore.PHASES); rank 0 only,
        and only when it changes. Written by a background thread, newest first: a busy database never holds the
        job up for what is only shown on the page."""
        if not self.is_main or phase == self._phase:
            return
        with self._phase_lock:
            self._phase = self._phase_next = phase
            if self._phase_writer is None:
                self._phase_writer = threading.Thread(target=self._write_phases, daemon=True)
                self._phase_writer.start()

    def _write_phases(self) -> None:
        while True:
            with self._phase_lock:
                phase, self._phase_next = self._phase_next, None
                if phase is None:
                    self._phase_writer = None
                    return
            try:
                jobstore.set_phase(self.settings, self.job_id, phase)
            except Exception:  # noqa: BLE001 (a phase is a courtesy: the next one, or the outcome, follows)
                pass

    def cancelled(self) -> bool:
        """True once the user asked to cancel this job."""
        self._last_cancel_check = time.monotonic()
        return jobstore.cancel_requested(self.settings, self.job_id)

    def check_cancelled(self, every_s: float = 0.5) -> None:
        """Raise JobCancelled when the job was cancelled; cheap enough to call every step (checks twice a second)."""
        if time.monotonic() - self._last_cancel_check >= every_s and self.cancelled():
            raise JobCancelled(f"job {self.job_id} was cancelled")

    def use_bf16(self, requested: str, model, tokenizer) -> bool:
        """Resolve a plugin's `precision` parameter (auto, bf16, fp32) for this model on this machine."""
        from lab.speed import choose_bf16

        return choose_bf16(requested, model, tokenizer, self.log)

    def keep_trainable(self, trainer, given: int, max_length: int, *, unit: str, rule: str, drop=None,
                       held_out: int = 0) -> None:
        """After a trainer has prepared its data: `drop(row)` (a prepared row) marks the rows that cannot train and
        are removed here (TRL dropped some already: `given` is how many went in). Says how many were lost and why;
        when none is left to train on, or none of `held_out` to evaluate on, fails as a data error naming
        max_length."""
        if drop is not None:
            trainer.train_dataset = trainer.train_dataset.filter(lambda row: not drop(row))
            if trainer.eval_dataset is not None:
                trainer.eval_dataset = trainer.eval_dataset.filter(lambda row: not drop(row))
        kept = len(trainer.train_dataset)
        if kept < given:
            self.log(f"[lab] {given - kept} of {given} {unit} are not trained on: {rule} (max_length={max_length})")
        hint = "raise max_length (the Datasets page shows a row as the model sees it, with a token limit)"
        if kept == 0:
            raise DataError(f"none of the {given} {unit} can train at max_length={max_length}: {rule}", hint)
        if held_out and trainer.eval_dataset is not None and len(trainer.eval_dataset) == 0:
            raise DataError(f"none of the {held_out} held-out {unit} can be evaluated at max_length={max_length}: "
                            f"{rule}", hint + ", or set eval_split=0")

    def trainer_args(self, config_cls, params, *, model=None, bf16: bool = False, evaluate: bool = False, **own):
        """The Trainer configuration every method shares, built from the plugin's parameters of the usual names
        (learning_rate, epochs, max_steps, batch_size, grad_accum, scheduler, warmup_steps, weight_decay, max_length,
        logging_steps, eval_steps, save_steps, seed, gradient_checkpointing): the run's folders and name, the
        device, precision, logging, checkpoints, and (given the model) whether to recompute activations. `own`
        holds the method's own arguments and wins over the shared ones; the parameters' `extra_args` win over both."""
        import dataclasses

        from lab import speed

        names = {f.name for f in dataclasses.fields(config_cls)}
        p = params.model_dump()
        passed = p.get("extra_args") or {}
        if passed:
            self.log(f"[lab] passed through to {config_cls.__name__}: "
                     + ", ".join(f"{k}={v!r}" for k, v in passed.items()))
        own = {**own, **passed}  # what the user passed through wins over the lab's choices
        seed = p.get("seed", 42)
        shared = dict(
            output_dir=str(self.checkpoints_dir), report_to=list(self.report_to),
            run_name=f"{self.job_id}-{self.plugin}", project=self.experiment,  # Trackio's project
            disable_tqdm=True, use_cpu=speed.device() == "cpu", bf16=bf16, dataloader_num_workers=0,
            seed=seed, data_seed=seed, logging_steps=p.get("logging_steps", 1),
            # checkpoints: every save_steps, and (by the lab's callback) every save_minutes and on a graceful stop
            save_strategy="steps" if p.get("save_steps") else "no", save_steps=p.get("save_steps") or 500,
            save_total_limit=KEEP_CHECKPOINTS,
            eval_strategy="steps" if evaluate else "no", eval_steps=p.get("eval_steps", 50),
        )
        renamed = {"learning_rate": "learning_rate", "epochs": "num_train_epochs", "max_steps": "max_steps",
                   "batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
                   "scheduler": "lr_scheduler_type", "warmup_steps": "warmup_steps", "weight_decay": "weight_decay",
                   "max_length": "max_length"}
        for mine, theirs in renamed.items():
            if mine in p:
                shared[theirs] = p[mine]
        if "batch_size" in p:
            shared["per_device_eval_batch_size"] = p["batch_size"]
        # transformers 5 renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing, which wins
        named = next((n for n in ("activation_checkpointing", "gradient_checkpointing") if n in names), None)
        asked = {"activation_checkpointing", "gradient_checkpointing"} & set(own)  # passed through: theirs wins
        if model is not None and named and not asked:
            shared[named] = speed.choose_checkpointing(
                p.get("gradient_checkpointing", "auto"), model, p.get("batch_size", 8), _sequence_tokens(p), self.log,
                processes=self.world_size, method=self.plugin, params=p)
        if "ddp_find_unused_parameters" in names:
            shared["ddp_find_unused_parameters"] = False  # every trainable weight takes part in each step
        return config_cls(**{k: v for k, v in {**shared, **own}.items() if k in names or k in own})

    def split(self, data, params, unit: str = "rows"):
        """(train, held_out): `params.eval_split` of the rows held out, by `params.seed` (held_out is None at 0)."""
        share = getattr(params, "eval_split", 0)
        train, held_out = data, None
        if share > 0:
            parts = data.train_test_split(test_size=share, seed=getattr(params, "seed", 42))
            train, held_out = parts["train"], parts["test"]
        self.log(f"[lab] {len(train)} training {unit}" + (f", {len(held_out)} held out" if held_out else ""))
        return train, held_out

    def lora(self, params, model=None, task_type: str = "CAUSAL_LM"):
        """The peft LoraConfig from the parameters' LoRA group; None without LoRA, or when `model` carries an adapter
        already (an earlier run's, which goes on training)."""
        if not getattr(params, "use_lora", False):
            return None
        from peft import LoraConfig, PeftModel

        if isinstance(model, PeftModel):
            return None
        from lab import modeling

        return LoraConfig(task_type=task_type, r=params.lora_r, lora_alpha=params.lora_alpha,
                          lora_dropout=params.lora_dropout, target_modules=modeling.lora_targets(params.lora_target))

    def save(self, model, tokenizer, params=None, *, merge: bool = True, what: str = "model") -> None:
        """Write the output in Hugging Face format with its tokenizer (rank 0 only). merge=True: a LoRA adapter is
        merged in, so the next stage loads a whole model; merge=False: the adapter alone, and also the merged model
        under output/merged when the parameters ask for it (`merge`)."""
        if not self.is_main:
            return
        from peft import PeftModel

        adapter = isinstance(model, PeftModel)
        final = model.merge_and_unload() if adapter and merge else model
        final.save_pretrained(str(self.output_dir))
        tokenizer.save_pretrained(str(self.output_dir))
        if adapter and not merge and getattr(params, "merge", False):
            model.merge_and_unload().save_pretrained(str(self.output_dir / "merged"))
            tokenizer.save_pretrained(str(self.output_dir / "merged"))
        self.log(f"[lab] saved {'adapter' if adapter and not merge else what} to {self.output_dir}")

    def train(self, trainer, params=None, *, resumable: bool = True) -> None:
        """Train with the lab's callback (metrics, progress, cancel, divergence guard, checkpoints by time and on a
        graceful stop), resuming from the last checkpoint of an earlier attempt. resumable=False: a trainer that
        cannot resume (it starts over when retried, and a stop does not wait for a checkpoint)."""
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the lab's callback prints one tidier line per log
        trainer.data_collator = self.padding = PaddingCounter(trainer.data_collator)
        minutes = getattr(params, "save_minutes", 0) if resumable else 0
        trainer.add_callback(self.callback(save_every_s=minutes * 60 if minutes else None))
        profiled = getattr(params, "profile_steps", 0)
        if profiled:
            from lab.speed import step_profiler

            trainer.add_callback(step_profiler(self, profiled))
        self.training = resumable
        try:
            if resumable and self.resume_from is not None:
                trainer.train(resume_from_checkpoint=str(self.resume_from))
            else:
                trainer.train()
        finally:
            self.training = False
        if self.stop_requested.is_set():  # training ended on its own in the same step the stop came
            raise JobInterrupted(f"job {self.job_id} was stopped by its worker")

    def token_counter(self, tokens_per_step: float):
        """For a trainer that counts no tokens: a callback (put it before `callback()`) that logs `num_tokens` as
        steps x an average of tokens per step, so tokens/s and MFU can be derived."""
        from transformers import TrainerCallback

        class TokenCounter(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs is not None and "loss" in logs and not logs.get("num_input_tokens_seen"):
                    logs["num_tokens"] = state.global_step * tokens_per_step

        return TokenCounter()

    def callback(self, save_every_s: float | None = None):
        """A transformers TrainerCallback that records metrics and progress, adds tokens/s and model FLOPs
        utilisation (6 x parameters x tokens/s over the machine's measured matmul peak), stops on cancel, fails
        the run as diverged at the first non-finite loss or gradient norm, checkpoints every `save_every_s` seconds
        of training and, asked to stop (SIGTERM), checkpoints at the step boundary and stops."""
        from transformers import TrainerCallback

        ctx = self

        class LabCallback(TrainerCallback):
            def __init__(self):
                self._last_save = time.monotonic()
                self._stopping = False
                self._last_progress = 0.0
                self._parameters = 0
                self._peak = None
                self._mark = (time.monotonic(), 0.0)

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                ctx.set_phase("training")
                if model is not None:
                    self._parameters = sum(p.numel() for p in model.parameters())
                try:
                    from lab.speed import peak_flops

                    if ctx.is_main:  # measured (once per machine) by one process, not by ranks racing each other
                        self._peak = peak_flops(ctx.settings.workspace, "bf16" if args.bf16 else "fp32")
                except Exception as exc:  # MFU is a courtesy; training goes on without it
                    ctx.log(f"[lab] no matmul peak measured ({exc}): MFU will not be logged")
                self._mark = (time.monotonic(), float(state.num_input_tokens_seen or 0))
                if ctx.world_size > 1:
                    import torch.distributed as dist

                    backend = dist.get_backend() if dist.is_initialized() else "no process group"
                    print(f"[lab] rank {ctx.rank} of {ctx.world_size}: data-parallel training ({backend}), "
                          f"trainer world size {args.world_size}", flush=True)
                ctx.set_progress(state.global_step, state.max_steps or None)

            def _speed(self, logs: dict, state) -> None:
                counter = getattr(ctx, "padding", None)
                if counter is not None and "loss" in logs:
                    share = counter.share()
                    if share is not None:  # the part of the batches so far that was padding
                        logs["padding_share"] = share
                tokens = logs.get("num_tokens", logs.get("num_input_tokens_seen", state.num_input_tokens_seen))
                if not tokens or "loss" not in logs:
                    return
                now = time.monotonic()
                seconds, done = now - self._mark[0], float(tokens) - self._mark[1]
                if seconds > 0 and done > 0:
                    logs["tokens_per_s"] = done / seconds
                    if self._parameters and self._peak:
                        logs["mfu"] = 6 * self._parameters * logs["tokens_per_s"] / self._peak
                self._mark = (now, float(tokens))

            def on_step_end(self, args, state, control, **kwargs):
                now = time.monotonic()
                if now - self._last_progress >= 0.5:
                    self._last_progress = now
                    ctx.set_progress(state.global_step, state.max_steps or None)
                stop, timed = _agreed(ctx.stop_requested.is_set(),
                                      ctx.training and bool(save_every_s) and now - self._last_save >= save_every_s)
                if stop:
                    if ctx.cancelled():
                        raise JobCancelled(f"job {ctx.job_id} was cancelled")
                    if ctx.training:  # write a checkpoint at this step boundary; on_save then ends the process
                        ctx.log(f"[lab] asked to stop: saving checkpoint-{state.global_step} to resume from")
                        control.should_save = control.should_training_stop = self._stopping = True
                        return control
                    raise JobInterrupted(f"job {ctx.job_id} was stopped by its worker")
                ctx.check_cancelled()
                if timed:
                    control.should_save = True
                if control.should_evaluate or control.should_save:  # what the trainer does next, before a step
                    ctx.set_phase("evaluating" if control.should_evaluate else "saving")
                return control

            def on_prediction_step(self, args, state, control, **kwargs):
                ctx.set_phase("evaluating")

            def on_evaluate(self, args, state, control, **kwargs):
                ctx.set_phase("saving" if control.should_save else "training")

            def on_save(self, args, state, control, **kwargs):
                self._last_save = time.monotonic()
                ctx.set_phase("training")
                if self._stopping:
                    raise JobInterrupted(f"job {ctx.job_id} was stopped by its worker after saving "
                                         f"checkpoint-{state.global_step}; it resumes from there")

            def on_log(self, args, state, control, logs=None, **kwargs):
                logs = dict(logs or {})
                self._speed(logs, state)
                if ctx.perplexity:
                    for key in ("loss", "eval_loss"):
                        if isinstance(logs.get(key), (int, float)) and math.isfinite(logs[key]):
                            logs[key.replace("loss", "perplexity")] = math.exp(min(logs[key], 50.0))
                ctx.log_metrics(state.global_step, logs)
                shown = " ".join(f"{k}={_fmt(v)}" for k, v in logs.items() if isinstance(v, (int, float)))
                ctx.log(f"[lab] step {state.global_step}/{state.max_steps} {shown}")
                broken = [(k, v) for k, v in logs.items() if _guarded(k) and isinstance(v, (int, float))
                          and not math.isfinite(v)]
                if broken:
                    what = ", ".join(f"{k} {_fmt(v)}" for k, v in broken)
                    first = state.global_step <= args.logging_steps  # computed before any update
                    raise Diverged(
                        f"training diverged at step {state.global_step}: {what} (learning rate "
                        f"{_fmt(logs.get('learning_rate', args.learning_rate))}); the run was stopped there",
                        FIRST_STEP_NAN if first else None)

            def on_train_end(self, args, state, control, **kwargs):
                ctx.set_progress(state.global_step, state.max_steps or None)
                ctx.set_phase("saving")  # what a plugin does after training: its output

        return LabCallback()


FIRST_STEP_NAN = ("the values were NaN before the first update, so the learning rate is not the cause: look at the "
                  "data (an answer cut to nothing by max_length, empty rows), the model's own weights, or try "
                  "precision=fp32")
KEEP_CHECKPOINTS = 2  # the newest checkpoints a run keeps (a full model's checkpoint holds its optimizer state)


def _agreed(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on any process of a data-parallel run, so that every rank stops or checkpoints at the same
    step (a SIGTERM or a clock can reach them a step apart); the flags as they are in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flags
    import torch

    both = torch.tensor([float(f) for f in flags])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in both.tolist())


def _guarded(key: str) -> bool:
    """The logged values whose NaN or infinity means the run diverged: losses and the gradient norm."""
    return key in ("loss", "grad_norm", "eval_loss") or key.startswith("loss/")


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def _sequence_tokens(p: dict) -> int:
    """The longest sequence a trainer's parameters allow: max_length, a pretraining block, or a prompt and its
    answer (GRPO, PPO); 1024 when they name none."""
    prompt_and_answer = p.get("max_prompt_tokens", 0) + p.get("max_completion_length", p.get("response_length", 0))
    return p.get("max_length") or p.get("block_size") or prompt_and_answer or 1024


class PaddingCounter:
    """A trainer's data collator, wrapped: counts the token slots of every batch it makes (input_ids) and how many
    are real (attention_mask; a padding-free batch has none, so all are), for the `padding_share` metric."""

    def __init__(self, inner):
        self.inner = inner
        self.slots = self.real = 0

    def __call__(self, features):
        batch = self.inner(features)
        ids = batch.get("input_ids") if hasattr(batch, "get") else None
        if ids is not None and hasattr(ids, "numel"):
            mask = batch.get("attention_mask")
            self.slots += ids.numel()
            self.real += int(mask.sum()) if mask is not None and hasattr(mask, "sum") else ids.numel()
        return batch

    def share(self) -> float | None:
        """The padding share of the batches made so far (the data loader makes one ahead of the step, so this is
        over whole batches, not one logging interval); None before the first batch with input_ids."""
        return None if self.slots <= 0 else 1 - self.real / self.slots

    def __getattr__(self, name):  # everything else is the inner collator's (TRL reads its attributes)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
