"""ORPO (odds-ratio preference optimisation, TRL's experimental ORPOTrainer): supervised fine-tuning and preference
alignment in one stage, with no reference model.

    lab run orpo --model smollm2-135m-instruct --dataset hh-rlhf --set max_steps=100 --set beta=0.1

Rows are preference pairs, as for `dpo`. The loss is the chosen answer's language-modeling loss plus beta times a
log-odds-ratio term that separates chosen from rejected. Metrics: rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, log_odds_ratio, nll_loss. The output is the tuned policy as a full model.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from lab import formats, modeling, preview
from lab.dependencies import internal
from lab.params import Lora, Optimiser, Passthrough, Precision, TrainParams

ID = "orpo"
KIND = "train"
ACCEPTS = ("preference",)
DESCRIPTION = "ORPO: fine-tuning and preference alignment in one stage, without a reference model."
CONFIG = "trl.experimental.orpo.ORPOConfig"


class Params(TrainParams, Optimiser, Lora, Precision, Passthrough):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, le=10, description="Weight of the odds-ratio (preference) term.")
    max_length: int = Field(512, ge=8, le=131072, description="Longest prompt plus answer in tokens.")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate.")


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    return modeling.not_causal(model) or preview.nothing_to_learn(settings, ID, model, dataset, params)


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The rows as the trainer gets them: a prompt and the chosen and rejected replies, as conversations."""
    return [formats.to_preference_pair(r) for r in rows]


def run(ctx, params: Params) -> None:
    from datasets import Dataset

    with internal("trl-orpo"):
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    data = Dataset.from_list(examples(ctx.dataset["format"], ctx.rows()))
    ctx.log(f"[lab] {len(data)} training pairs; beta {params.beta}")
    model = modeling.causal_lm(ctx.model, adapter="merge", log=ctx.log)
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
    bf16 = ctx.use_bf16(params.precision, model, tokenizer)
    args = ctx.trainer_args(ORPOConfig, params, model=model, bf16=bf16, beta=params.beta)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=ctx.lora(params))
    ctx.keep_trainable(trainer, len(data), params.max_length, unit="pairs",
                       rule="an answer is cut to nothing (ORPO shortens both answers by the amount the prompt and "
                            "the longer answer exceed max_length; the loss would be NaN)",
                       drop=lambda row: not preview.orpo_trains(row))
    tokenized = trainer.train_dataset  # ORPO counts no tokens: measure the pairs once it has tokenized them
    per_pair = sum(len(a) + len(b) for a, b in zip(tokenized["chosen_input_ids"], tokenized["rejected_input_ids"],
                                                   strict=True)) / len(tokenized)
    trainer.add_callback(ctx.token_counter(per_pair * params.batch_size))
    ctx.train(trainer, params)
    ctx.save(trainer.model, tokenizer, what="the tuned policy")
