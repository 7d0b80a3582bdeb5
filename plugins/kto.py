"""KTO (Kahneman-Tversky optimisation, TRL's KTOTrainer): preference tuning from answers marked good or bad one by
one, with no need for pairs.

    lab run kto --model sft-7 --dataset hh-rlhf --set max_steps=100

Preference pairs are unpaired for it: the chosen answer becomes a desirable example and the rejected one an
undesirable example of the same prompt. The policy starts from a model or an SFT run's output (an adapter is merged
in, and is the reference). Metrics: rewards/chosen, rewards/rejected, rewards/margins, kl. The output is the tuned
policy as a full model.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from lab import formats, modeling, preview
from lab.errors import DataError
from lab.params import Lora, Optimiser, Passthrough, Precision, TrainParams

ID = "kto"
KIND = "train"
ACCEPTS = ("preference",)
DESCRIPTION = "KTO: preference tuning from answers marked desirable or undesirable one by one."
CONFIG = "trl.KTOConfig"


class Params(TrainParams, Optimiser, Lora, Precision, Passthrough):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, le=10, description="Strength of the pull towards the reference policy.")
    desirable_weight: float = Field(1.0, gt=0, le=100, description="Weight of the desirable (chosen) examples.")
    undesirable_weight: float = Field(1.0, gt=0, le=100, description="Weight of the undesirable examples.")
    max_length: int = Field(512, ge=8, le=131072, description="Longest prompt plus answer in tokens.")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate.")
    batch_size: int = Field(4, ge=2, le=4096, description="Examples per device per step (at least 2 for KL).")


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    return modeling.not_causal(model) or preview.nothing_to_learn(settings, ID, model, dataset, params)


def unpaired(row: dict) -> list[dict]:
    """One preference pair as two KTO examples: the chosen answer desirable, the rejected one not."""
    pair = formats.to_preference_pair(row)
    if "prompt" not in pair:
        raise DataError("KTO needs a prompt: give the pairs a `prompt`, or hh-rlhf style transcripts")
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The pairs as KTOTrainer gets them: two unpaired examples each."""
    return [example for row in rows for example in unpaired(row)]


def run(ctx, params: Params) -> None:
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    data = Dataset.from_list(examples(ctx.dataset["format"], ctx.rows())).shuffle(seed=params.seed)
    ctx.log(f"[lab] {len(data)} examples ({len(data) // 2} desirable); beta {params.beta}")
    model = modeling.causal_lm(ctx.model, adapter="merge", log=ctx.log)
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
    bf16 = ctx.use_bf16(params.precision, model, tokenizer)
    args = ctx.trainer_args(KTOConfig, params, model=model, bf16=bf16, beta=params.beta,
                            desirable_weight=params.desirable_weight, undesirable_weight=params.undesirable_weight)
    trainer = KTOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=ctx.lora(params))
    ctx.keep_trainable(trainer, len(data), params.max_length, unit="examples",
                       rule="the prompt alone fills max_length, leaving no answer token")  # TRL drops those
    ctx.train(trainer, params)
    ctx.save(trainer.model, tokenizer, what="the tuned policy")
