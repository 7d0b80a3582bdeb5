"""Direct preference optimisation with TRL's DPOTrainer, with every loss TRL offers (sigmoid = DPO, ipo, hinge, ...).

    lab run dpo --model sft-7 --dataset hh-rlhf --set max_steps=100 --set beta=0.1 --set loss_type=ipo

Rows are preference pairs (`prompt`/`chosen`/`rejected`, or whole hh-rlhf style transcripts). The policy starts
from a model or an SFT run's output; an SFT adapter is merged in, so the reference policy is exactly the SFT model
(with LoRA, the frozen merged weights are the reference; with full training TRL keeps a copy). Metrics:
rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins (implicit rewards, scaled by beta).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from lab import formats, modeling, preview
from lab.params import Lora, Optimiser, Passthrough, Precision, Split, TrainParams, advanced

ID = "dpo"
KIND = "train"
ACCEPTS = ("preference",)
DESCRIPTION = "Preference tuning without a reward model: DPO and its variants (TRL DPOTrainer)."
CONFIG = "trl.DPOConfig"

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


class Params(TrainParams, Optimiser, Lora, Split, Precision, Passthrough):
    model_config = ConfigDict(extra="forbid")

    loss_type: Literal[LOSS_TYPES] = Field(
        "sigmoid", description="sigmoid is DPO; ipo, hinge, robust, ... are its variants as TRL implements them.")
    beta: float = Field(0.1, gt=0, le=10, description="Strength of the pull towards the reference policy.")
    max_length: int = Field(512, ge=8, le=131072, description="Longest prompt plus answer in tokens.")
    label_smoothing: float = Field(0.0, **advanced(ge=0, lt=0.5, description="Conservative DPO / robust noise."))
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate (5e-5 LoRA, 5e-7 full).")


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    return modeling.not_causal(model) or preview.nothing_to_learn(settings, ID, model, dataset, params)


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The rows as the trainer gets them: a prompt and the chosen and rejected replies, as conversations."""
    return [formats.to_preference_pair(r) for r in rows]


def run(ctx, params: Params) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # 1. data
    train, held_out = ctx.split(Dataset.from_list(examples(ctx.dataset["format"], ctx.rows())), params, "pairs")
    ctx.log(f"[lab] loss {params.loss_type}, beta {params.beta}")

    # 2. policy (an SFT adapter merged in: that model is also the reference)
    model = modeling.causal_lm(ctx.model, adapter="merge", log=ctx.log)
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
    bf16 = ctx.use_bf16(params.precision, model, tokenizer)

    # 3. configuration, 4. trainer, 5. train
    args = ctx.trainer_args(DPOConfig, params, model=model, bf16=bf16, evaluate=held_out is not None,
                            loss_type=params.loss_type, beta=params.beta, label_smoothing=params.label_smoothing)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                         processing_class=tokenizer, peft_config=ctx.lora(params))
    ctx.keep_trainable(trainer, len(train), params.max_length, unit="pairs", held_out=len(held_out or []),
                       rule="the prompt alone fills max_length, leaving no answer token")  # TRL drops those
    ctx.train(trainer, params)

    # 6. save: the policy as a full model (LoRA merged in), so the next stage loads it like any model
    ctx.save(trainer.model, tokenizer, what="the tuned policy")
