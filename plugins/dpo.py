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
from lab.plugins import TrainParams, advanced

ID = "dpo"
KIND = "train"
ACCEPTS = ("preference",)
DESCRIPTION = "Preference tuning without a reward model: DPO and its variants (TRL DPOTrainer)."

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


class Params(TrainParams):
    model_config = ConfigDict(extra="forbid")

    loss_type: Literal[LOSS_TYPES] = Field(
        "sigmoid", description="sigmoid is DPO; ipo, hinge, robust, ... are its variants as TRL implements them.")
    beta: float = Field(0.1, gt=0, le=10, description="Strength of the pull towards the reference policy.")
    use_lora: bool = Field(True, description="Train a LoRA adapter instead of every weight.")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate (5e-5 LoRA, 5e-7 full).")
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the pairs (ignored when max_steps is set).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 to use epochs.")
    batch_size: int = Field(4, ge=1, le=4096, description="Pairs per device per step.")
    max_length: int = Field(512, ge=8, le=131072, description="Longest prompt plus answer in tokens.")
    eval_split: float = Field(0.0, ge=0, lt=0.5, description="Fraction of pairs held out.",
                              json_schema_extra={"widget": "slider"})
    seed: int = Field(42, description="Random seed.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 mixed precision where the hardware has it and a probe agrees; else fp32.")
    lora_alpha: int = Field(32, **advanced(ge=1, le=4096, description="LoRA scaling; commonly twice the rank."))
    lora_dropout: float = Field(0.0, **advanced("slider", ge=0, lt=1, description="Dropout inside the LoRA layers "
                                                "(its random masks cost about a sixth of a step on a CPU)."))
    lora_target: str = Field("all-linear", **advanced(description="Modules that get adapters, e.g. q_proj,v_proj."))
    label_smoothing: float = Field(0.0, **advanced(ge=0, lt=0.5, description="Conservative DPO / robust noise."))
    grad_accum: int = Field(1, **advanced(ge=1, le=1024, description="Steps whose gradients are summed."))
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", **advanced(description="Learning-rate schedule."))
    warmup_steps: int = Field(0, **advanced(ge=0, description="Steps of linear warm-up."))
    logging_steps: int = Field(1, **advanced(ge=1, description="Record metrics every this many steps."))
    eval_steps: int = Field(50, **advanced(ge=1, description="Evaluate every this many steps."))


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    return modeling.not_causal(model) or preview.nothing_to_learn(settings, ID, model, dataset, params)


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The rows as the trainer gets them: a prompt and the chosen and rejected replies, as conversations."""
    return [formats.to_preference_pair(r) for r in rows]


def run(ctx, params: Params) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    # 1. data
    data = Dataset.from_list(examples(ctx.dataset["format"], ctx.rows()))
    train, held_out = data, None
    if params.eval_split > 0:
        split = data.train_test_split(test_size=params.eval_split, seed=params.seed)
        train, held_out = split["train"], split["test"]
    ctx.log(f"[lab] {len(train)} training pairs" + (f", {len(held_out)} held out" if held_out else "")
            + f"; loss {params.loss_type}, beta {params.beta}")

    # 2. policy (an SFT adapter merged in: that model is also the reference)
    model = modeling.causal_lm(ctx.model, adapter="merge", log=ctx.log)
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
    bf16 = ctx.use_bf16(params.precision, model, tokenizer)

    # 3. configuration, 4. trainer, 5. train
    args = ctx.trainer_args(DPOConfig, params, model=model, bf16=bf16, evaluate=held_out is not None,
                            loss_type=params.loss_type, beta=params.beta, label_smoothing=params.label_smoothing)
    peft_config = None
    if params.use_lora:
        peft_config = LoraConfig(task_type="CAUSAL_LM", r=params.lora_r, lora_alpha=params.lora_alpha,
                                 lora_dropout=params.lora_dropout,
                                 target_modules=modeling.lora_targets(params.lora_target))
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                         processing_class=tokenizer, peft_config=peft_config)
    ctx.keep_trainable(trainer, len(train), params.max_length, unit="pairs", held_out=len(held_out or []),
                       rule="the prompt alone fills max_length, leaving no answer token")  # TRL drops those
    ctx.train(trainer, params)

    # 6. save: the policy as a full model (LoRA merged in), so the next stage loads it like any model
    final = trainer.model.merge_and_unload() if params.use_lora else trainer.model
    final.save_pretrained(str(ctx.output_dir))
    tokenizer.save_pretrained(str(ctx.output_dir))
    ctx.log(f"[lab] saved the tuned policy to {ctx.output_dir}")
