"""Supervised fine-tuning with TRL's SFTTrainer: LoRA (peft) or full, on chat, alpaca or prompt/completion data.

    lab run sft --model smollm2-135m-instruct --dataset alpaca --set max_steps=100 --set lora_r=16

Rows are turned into a conversation and the model's chat template is applied. By default only the reply counts
towards the loss (the prompt tokens are masked); for chat rows the reply is the last assistant turn. The adapter
(or the full model) is saved in Hugging Face format under the run's `output/`, with the tokenizer.
Any further `SFTConfig` argument can be given by name (`--set max_grad_norm=0.5`); it wins over the lab's own
choice for that argument, and an unknown name is an error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from lab import modeling, preview
from lab.params import Lora, Optimiser, Passthrough, Precision, Split, TrainParams, advanced

ID = "sft"
KIND = "train"
DISTRIBUTED = True  # data-parallel under torchrun (the Trainer shards the data)
ACCEPTS = ("chat", "alpaca", "prompt_completion")
DESCRIPTION = "Supervised fine-tuning on instructions or conversations (TRL SFTTrainer; LoRA or full)."
CONFIG = "trl.SFTConfig"
RESERVED = {"completion_only_loss", "assistant_only_loss", "dataset_text_field"}  # set from the lab's own fields


class Params(TrainParams, Optimiser, Lora, Split, Precision, Passthrough):
    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(1024, ge=8, le=131072, description="Longest sequence in tokens; longer ones are cut.")
    completion_only: bool = Field(True, description="Learn only the replies; prompt tokens do not count.")
    packing: bool = Field(False, description="Pack several short examples into each sequence (faster).")
    batching: Literal["padding_free", "by_length", "padded"] = Field(
        "padding_free", **advanced(description="How a step's rows are laid out: padding_free (one flat sequence, "
                                   "each row attending only to itself; no padded token is computed), by_length "
                                   "(rows of similar length batched together, little padding), padded (random "
                                   "batches padded to their longest row). The rows of each step are the same "
                                   "for padding_free and padded."))
    merge: bool = Field(False, **advanced(description="Also save the LoRA merged into the model (output/merged)."))


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    return modeling.not_causal(model) or preview.nothing_to_learn(
        settings, ID, model, dataset, params, also=" or turn off completion_only" if params.completion_only else "")


def examples(fmt: str, rows: list[dict], completion_only: bool = True) -> list[dict]:
    """The rows as SFTTrainer gets them: prompt/completion (the prompt masked) or whole conversations."""
    return [preview.sft_example(fmt, row, completion_only) for row in rows]


def run(ctx, params: Params) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # 1. data: rows -> conversations (prompt/completion to mask the prompt, or whole messages)
    data = Dataset.from_list(examples(ctx.dataset["format"], ctx.rows(), params.completion_only))
    train, evaluation = ctx.split(data, params)

    # 2. model and tokenizer: an earlier run's adapter goes on training (LoRA) or is merged in (full)
    model = modeling.causal_lm(ctx.model, adapter="trainable" if params.use_lora else "merge", log=ctx.log)
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
    bf16 = ctx.use_bf16(params.precision, model, tokenizer)

    # 3. configuration
    own = dict(packing=params.packing, completion_only_loss=params.completion_only if params.completion_only else None)
    if params.batching == "by_length" and not params.packing:
        own["train_sampling_strategy"] = "group_by_length"
    config = ctx.trainer_args(SFTConfig, params, model=model, bf16=bf16, evaluate=evaluation is not None, **own)
    if not config.gradient_checkpointing and "loss_type" not in params.extra_args and not config.use_liger_kernel:
        # TRL's default loss (chunked_nll) recomputes the output layer in the backward pass to save memory; without
        # checkpointing the memory is there, and one pass over the whole logits is about 8 % faster per step
        config.loss_type = "nll"
        ctx.log("[lab] loss over the whole logits at once (TRL's nll): no gradient checkpointing, so they fit")

    # 4. trainer, 5. train
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=ctx.lora(params, model))
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

    # 6. save (rank 0 under torchrun): the adapter (and with `merge` the merged model too), or the full model
    ctx.save(trainer.model, tokenizer, params, merge=False)
