"""Supervised fine-tuning with TRL's SFTTrainer: LoRA (peft) or full, on chat, alpaca or prompt/completion data.

    lab run sft --model smollm2-135m-instruct --dataset alpaca --set max_steps=100 --set lora_r=16

Rows are turned into a conversation and the model's chat template is applied. By default only the reply counts
towards the loss (the prompt tokens are masked); for chat rows the reply is the last assistant turn. The adapter
(or the full model) is saved in Hugging Face format under the run's `output/`, with the tokenizer.
Any further `SFTConfig` argument can be given by name (`--set max_grad_norm=0.5`); it wins over the lab's own
choice for that argument, and an unknown name is an error.
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any, Literal

from pydantic import ConfigDict, Field

from lab import modeling, preview
from lab.plugins import TrainParams, advanced

ID = "sft"
KIND = "train"
DISTRIBUTED = True  # data-parallel under torchrun (the Trainer shards the data)
ACCEPTS = ("chat", "alpaca", "prompt_completion")
DESCRIPTION = "Supervised fine-tuning on instructions or conversations (TRL SFTTrainer; LoRA or full)."
PASSTHROUGH = True

# SFTConfig arguments the lab sets itself; passing them through would break the run's folder layout or tracking
RESERVED = {"output_dir", "report_to", "run_name", "logging_dir", "use_cpu", "disable_tqdm", "push_to_hub",
            "hub_token", "completion_only_loss", "assistant_only_loss", "dataset_text_field"}



class Params(TrainParams):
    model_config = ConfigDict(extra="forbid")

    use_lora: bool = Field(True, description="Train a LoRA adapter (small, fast) instead of every weight.")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank: the adapter's capacity.")
    lora_alpha: int = Field(32, ge=1, le=4096, description="LoRA scaling; commonly twice the rank.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (try 2e-4 for LoRA, 2e-5 full).")
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 to use epochs.")
    batch_size: int = Field(4, ge=1, le=4096, description="Examples per device per step.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Steps whose gradients are summed before an update.")
    max_length: int = Field(1024, ge=8, le=131072, description="Longest sequence in tokens; longer ones are cut.")
    completion_only: bool = Field(True, description="Learn only the replies; prompt tokens do not count.")
    packing: bool = Field(False, description="Pack several short examples into each sequence (faster).")
    batching: Literal["padding_free", "by_length", "padded"] = Field(
        "padding_free", **advanced(description="How a step's rows are laid out: padding_free (one flat sequence, "
                                   "each row attending only to itself; no padded token is computed), by_length "
                                   "(rows of similar length batched together, little padding), padded (random "
                                   "batches padded to their longest row). The rows of each step are the same "
                                   "for padding_free and padded."))
    eval_split: float = Field(0.0, ge=0, lt=0.5, description="Fraction of rows held out to measure eval loss.",
                              json_schema_extra={"widget": "slider"})
    seed: int = Field(42, description="Random seed for shuffling, the split and initialisation.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 mixed precision where the hardware has it and a probe shows no loss of "
        "quality; fp32 otherwise.")
    lora_dropout: float = Field(0.0, **advanced("slider", ge=0, lt=1, description="Dropout inside the LoRA layers "
                                                "(its random masks cost about a sixth of a step on a CPU)."))
    lora_target: str = Field("all-linear", **advanced(description="Modules that get adapters, e.g. q_proj,v_proj."))
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", **advanced(description="Learning-rate schedule."))
    warmup_steps: int = Field(0, **advanced(ge=0, description="Steps of linear warm-up."))
    weight_decay: float = Field(0.0, **advanced(ge=0, le=1, description="AdamW weight decay."))
    logging_steps: int = Field(1, **advanced(ge=1, description="Record metrics every this many steps."))
    eval_steps: int = Field(50, **advanced(ge=1, description="Evaluate every this many steps (with eval_split)."))
    merge: bool = Field(False, **advanced(description="Also save the LoRA merged into the model (output/merged)."))
    extra_args: dict[str, Any] = Field(default_factory=dict, **advanced(
        description="Further TRL SFTConfig arguments by name, e.g. {\"max_grad_norm\": 0.5}."))


def check(params: Params) -> list[str]:
    """Before queueing: every extra argument must be a real SFTConfig field that the lab does not set itself."""
    if not params.extra_args:
        return []
    SFTConfig = modeling.trl().SFTConfig  # noqa: N806 (checks run in the web server's threads)

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    problems = [f"unknown parameter `{k}` (neither an sft parameter nor an SFTConfig argument)"
                for k in params.extra_args if k not in known]
    problems += [f"`{k}` is set by the lab and cannot be passed through" for k in params.extra_args if k in RESERVED]
    if not problems:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                SFTConfig(output_dir=tmp, use_cpu=True, report_to=[], **params.extra_args)
        except (TypeError, ValueError) as exc:
            problems.append(f"SFTConfig refuses the extra arguments: {exc}")
    return problems


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    return modeling.not_causal(model) or preview.nothing_to_learn(
        settings, ID, model, dataset, params, also=" or turn off completion_only" if params.completion_only else "")


def examples(fmt: str, rows: list[dict], completion_only: bool = True) -> list[dict]:
    """The rows as SFTTrainer gets them: prompt/completion (the prompt masked) or whole conversations."""
    return [preview.sft_example(fmt, row, completion_only) for row in rows]


def run(ctx, params: Params) -> None:
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import SFTConfig, SFTTrainer

    # 1. data: rows -> conversations (prompt/completion to mask the prompt, or whole messages)
    fmt = ctx.dataset["format"]
    data = Dataset.from_list(examples(fmt, ctx.rows(), params.completion_only))
    train, evaluation = data, None
    if params.eval_split > 0:
        split = data.train_test_split(test_size=params.eval_split, seed=params.seed)
        train, evaluation = split["train"], split["test"]
    ctx.log(f"[lab] {len(train)} training rows" + (f", {len(evaluation)} held out" if evaluation else ""))

    # 2. model and tokenizer: an earlier run's adapter goes on training (LoRA) or is merged in (full)
    model = modeling.causal_lm(ctx.model, adapter="trainable" if params.use_lora else "merge", log=ctx.log)
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
    bf16 = ctx.use_bf16(params.precision, model, tokenizer)

    # 3. configuration
    own = dict(packing=params.packing, completion_only_loss=params.completion_only if params.completion_only else None)
    if params.batching == "by_length" and not params.packing:
        own["train_sampling_strategy"] = "group_by_length"
    config = ctx.trainer_args(SFTConfig, params, model=model, bf16=bf16, evaluate=evaluation is not None,
                              **{**own, **params.extra_args})  # passed-through arguments win over the lab's choices
    if not config.gradient_checkpointing and "loss_type" not in params.extra_args and not config.use_liger_kernel:
        # TRL's default loss (chunked_nll) recomputes the output layer in the backward pass to save memory; without
        # checkpointing the memory is there, and one pass over the whole logits is about 8 % faster per step
        config.loss_type = "nll"
        ctx.log("[lab] loss over the whole logits at once (TRL's nll): no gradient checkpointing, so they fit")
    already_adapter = isinstance(model, PeftModel)
    peft_config = None
    if params.use_lora and not already_adapter:
        peft_config = LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                                 target_modules=modeling.lora_targets(params.lora_target), task_type="CAUSAL_LM")

    # 4. trainer, 5. train
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=peft_config)
    if params.batching == "padding_free" and not params.packing:
        # TRL's own collator flattens each batch into one sequence with position ids; TRL's compute_loss runs the
        # model without a cache, so transformers' attention mask keeps the rows apart (tests/test_speed.py checks
        # the loss equals the padded batch's). The dataset was truncated to max_length already.
        trainer.data_collator.padding_free = True
    if not params.packing:  # TRL drops the rows that truncation left without a trained token
        ctx.keep_trainable(trainer, len(train), params.max_length, unit="rows", held_out=len(evaluation or []),
                           rule="truncation leaves them without a trained token (the prompt fills max_length)")
    ctx.train(trainer, params)
    if evaluation is not None and trainer.state.global_step % params.eval_steps:
        trainer.evaluate()  # the final eval loss, recorded by the lab's callback like every logged value

    if not ctx.is_main:  # under torchrun, rank 0 saves
        return
    # 6. save: adapter (or full model) and tokenizer in HF format; optionally the merged model
    trainer.save_model(str(ctx.output_dir))
    tokenizer.save_pretrained(str(ctx.output_dir))
    if params.merge and params.use_lora:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(ctx.output_dir / "merged"))
        tokenizer.save_pretrained(str(ctx.output_dir / "merged"))
    ctx.log(f"[lab] saved {'adapter' if params.use_lora else 'model'} to {ctx.output_dir}")

