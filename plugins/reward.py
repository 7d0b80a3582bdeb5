"""Reward modeling with TRL's RewardTrainer: a scoring head learns which of two answers people preferred.

    lab run reward --model sft-7 --dataset hh-rlhf --set max_steps=100 --set max_length=512

Rows are preference pairs: `prompt`/`chosen`/`rejected`, or whole `chosen`/`rejected` transcripts (hh-rlhf style,
split at the last assistant turn). The start is a base model or an SFT run's output (an adapter is merged in).
Metrics: loss, pair accuracy (chosen scored above rejected) and the mean reward margin, on training and held-out
pairs. The output is a sequence-classification model with one score (a LoRA is merged in), registered as a
`reward` model that `ppo` and `grpo` can use.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from lab import formats, modeling, preview
from lab.params import Lora, Optimiser, Passthrough, Precision, Split, TrainParams, advanced

ID = "reward"
KIND = "train"
ACCEPTS = ("preference",)
DESCRIPTION = "Reward model on human preference pairs (TRL RewardTrainer), the first stage of RLHF."
CONFIG = "trl.RewardConfig"


class Params(TrainParams, Optimiser, Lora, Split, Precision, Passthrough):
    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(512, ge=8, le=131072, description="Longest prompt plus answer in tokens.")
    center_rewards: float = Field(0.0, **advanced(ge=0, description="Pull mean rewards towards 0 (e.g. 0.01)."))
    use_lora: bool = Field(True, description="Train a LoRA adapter (and the scoring head), not every weight.")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Peak learning rate.")
    eval_split: float = Field(0.1, ge=0, lt=0.5, description="Fraction of pairs held out for pair accuracy.",
                              json_schema_extra={"widget": "slider"})
    logging_steps: int = Field(5, **advanced(ge=1, description="Record metrics every this many steps."))


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    return preview.nothing_to_learn(settings, ID, model, dataset, params)


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The rows as the trainer gets them: a prompt and the chosen and rejected replies, as conversations."""
    return [formats.to_preference_pair(r) for r in rows]


def run(ctx, params: Params) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    # 1. data: pairs in TRL's conversational form (the chat template is applied by the trainer)
    train, held_out = ctx.split(Dataset.from_list(examples(ctx.dataset["format"], ctx.rows())), params, "pairs")

    # 2. model: one score on top of the base (an earlier run's adapter is merged in first)
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
    base = modeling.merged_folder(ctx.model, ctx.run_dir / "base-merged", log=ctx.log)
    model = modeling.sequence_classifier(base, 1, tokenizer.pad_token_id)
    bf16 = ctx.use_bf16(params.precision, model, tokenizer)

    # 3. configuration, 4. trainer, 5. train
    args = ctx.trainer_args(RewardConfig, params, model=model, bf16=bf16, evaluate=held_out is not None,
                            center_rewards_coefficient=params.center_rewards or None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                            processing_class=tokenizer, peft_config=ctx.lora(params, task_type="SEQ_CLS"))
    ctx.keep_trainable(trainer, len(train), params.max_length, unit="pairs", held_out=len(held_out or []),
                       rule="the prompt and an answer are longer than max_length")  # TRL drops those
    ctx.train(trainer, params)
    if held_out is not None:  # the final scores (evaluated again only if the last step was not an eval step)
        found = (trainer.evaluate() if trainer.state.global_step % params.eval_steps
                 else next(h for h in reversed(trainer.state.log_history) if "eval_loss" in h))
        ctx.log(f"[lab] held-out pair accuracy {found.get('eval_accuracy', float('nan')):.3f}, "
                f"mean margin {found.get('eval_margin', float('nan')):.3f}")

    # 6. save a plain scoring model (LoRA merged in) and the tokenizer
    model.config.pad_token_id = tokenizer.pad_token_id  # the scorer finds each row's last token by it
    ctx.save(trainer.model, tokenizer, what="the reward model")
