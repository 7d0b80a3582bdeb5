"""RLHF with PPO (TRL's experimental PPOTrainer): the policy answers prompts, a reward model scores the answers,
and PPO moves the policy towards higher scores while a KL penalty keeps it near where it started.

    lab run ppo --model sft-7 --dataset alpaca --set reward_model=reward-9 --set total_episodes=256

The policy starts from a model or an SFT run's output (an adapter is merged in); the reference policy is a frozen
copy of that start; the reward model is a `reward` run's output and the value model starts as a copy of it. The
reward model must share the policy's tokenizer (train it from the same base). Prompts come from any dataset with
prompts. Metrics: objective/scores (mean reward), objective/kl, objective/entropy, loss/policy_avg,
loss/value_avg, response length, tokens/s. Sample generations with their scores are saved at intervals to the
run's `samples.jsonl`. The output is the tuned policy as a full model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import ConfigDict, Field

from lab import formats, modeling, registry
from lab.dependencies import internal
from lab.errors import DataError
from lab.params import Passthrough, Precision, advanced, model_field

ID = "ppo"
KIND = "train"
ACCEPTS = ("prompt_completion", "alpaca", "chat", "preference")
DESCRIPTION = "RLHF stage 2: PPO against a reward model, with a KL leash to the starting policy."
CONFIG = "trl.experimental.ppo.PPOConfig"
RESUMABLE = False  # TRL's PPOTrainer.train() takes no checkpoint to resume from: a retry would start over


class Params(Precision, Passthrough):
    model_config = ConfigDict(extra="forbid")

    reward_model: str = model_field(description="The reward model (output of a `reward` run); required.",
                                    kind="reward")
    total_episodes: int = Field(64, ge=1, description="Prompts answered and scored in all.")
    batch_size: int = Field(4, ge=1, le=1024, description="Episodes per update.")
    response_length: int = Field(48, ge=1, le=4096, description="Longest answer in tokens.")
    learning_rate: float = Field(3e-6, gt=0, le=1, description="Peak learning rate of policy and value model.")
    kl_coef: float = Field(0.05, ge=0, le=10, description="Penalty on drifting from the reference policy.")
    temperature: float = Field(0.7, gt=0, le=5, description="Sampling temperature of the answers.")
    seed: int = Field(42, description="Random seed.")
    missing_eos_penalty: float = Field(1.0, **advanced(ge=0, description="Score taken off answers that never end."))
    num_ppo_epochs: int = Field(1, **advanced(ge=1, le=16, description="PPO passes over each batch of episodes."))
    num_mini_batches: int = Field(1, **advanced(ge=1, le=64, description="Mini-batches per PPO pass."))
    max_prompt_tokens: int = Field(256, **advanced(ge=8, description="Prompts longer than this are left out."))
    sample_generations: int = Field(5, **advanced(ge=0, le=100, description="Times samples are saved in the run."))


def _vocabulary(path: str) -> str | None:
    try:
        vocab = json.loads((Path(path) / "tokenizer.json").read_text())["model"]["vocab"]
    except (OSError, KeyError, ValueError):
        return None
    return hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()


def check(params: Params) -> list[str]:
    return [] if params.reward_model else ["`reward_model` is required: the output of a `reward` run"]


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    problems = modeling.not_causal(model)  # the reward model is registered and a reward model (checked before)
    reward = registry.info(settings, params.reward_model)
    theirs, ours = _vocabulary(reward["path"]), _vocabulary(model["path"]) if model else None
    if theirs and ours and theirs != ours:
        problems.append(f"`reward_model`: {reward['name']} reads another vocabulary than {model['name']}; train the "
                        "reward model from the same base as the policy")
    return problems


class SampleLog:
    """Catches the tables of sample generations PPOTrainer prints, and appends them to samples.jsonl."""

    def __init__(self, path: Path, state_of):
        self.path, self.state_of = path, state_of

    def __call__(self, df) -> None:
        step = self.state_of().global_step
        with open(self.path, "a") as f:
            for row in df.to_dict("records"):
                f.write(json.dumps({"step": step, "prompt": row.get("query"), "answer": row.get("model response"),
                                    "score": float(row.get("score", float("nan")))}, ensure_ascii=False) + "\n")


def examples(fmt: str, rows: list[dict]) -> list[list[dict]]:
    """The prompts PPO samples answers to: each row's prompt turns."""
    return [formats.prompt_of(fmt, row) for row in rows]


def run(ctx, params: Params) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    with internal("trl-ppo"):
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as ppo_module

        truncate = ppo_module.truncate_response

    # 1. prompts, tokenized with the chat template, left-padded for generation
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log, padding_side="left")
    fmt = ctx.dataset["format"]
    prompts = []
    for prompt in examples(fmt, ctx.rows()):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if len(ids) <= params.max_prompt_tokens:
            prompts.append({"input_ids": ids})
    if len(prompts) < 2:
        raise DataError(f"fewer than two prompts are shorter than max_prompt_tokens={params.max_prompt_tokens}",
                        "raise max_prompt_tokens")
    held_out = min(max(1, len(prompts) // 20), 8)
    train, samples = Dataset.from_list(prompts[held_out:]), Dataset.from_list(prompts[:held_out])
    ctx.log(f"[lab] {len(train)} prompts for {params.total_episodes} episodes; {held_out} kept for samples")

    # 2. the four models: policy, frozen reference, reward model, and the value model starting from it
    policy = modeling.causal_lm(ctx.model, adapter="merge", log=ctx.log)
    reference = modeling.causal_lm(ctx.model, adapter="merge", log=lambda m: None)
    reward_path = ctx.models["reward_model"]["path"]
    reward = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=torch.float32)
    for m in (reward, value):
        m.config.pad_token_id = tokenizer.pad_token_id
    bf16 = ctx.use_bf16(params.precision, policy, tokenizer)

    # 3. configuration, 4. trainer
    args = ctx.trainer_args(
        PPOConfig, params, model=policy, bf16=bf16, total_episodes=params.total_episodes,
        per_device_eval_batch_size=held_out,  # the sample batch is all held-out prompts (PPO drops a short batch)
        num_ppo_epochs=params.num_ppo_epochs, num_mini_batches=params.num_mini_batches,
        response_length=params.response_length, stop_token="eos", missing_eos_penalty=params.missing_eos_penalty,
        kl_coef=params.kl_coef, temperature=params.temperature, num_sample_generations=params.sample_generations,
        eval_strategy="steps" if params.sample_generations else "no", logging_steps=1,
    )
    tokens_per_episode = sum(len(p["input_ids"]) for p in prompts) / len(prompts) + params.response_length

    lengths: list[float] = []  # answer lengths since the last log, caught where PPO cuts answers at the stop token
    def truncate_and_measure(stop_token_id, pad_token_id, responses):
        cut = truncate(stop_token_id, pad_token_id, responses)
        lengths.extend((cut != pad_token_id).sum(dim=1).float().tolist())
        return cut

    class EpisodeTokens(TrainerCallback):
        """PPO logs episodes, not tokens or lengths: add the answers' mean length, and count prompt plus answer
        tokens so that tokens/s and MFU can be derived."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "episode" in logs:
                logs["num_tokens"] = logs["episode"] * tokens_per_episode
                logs.setdefault("loss", logs.get("loss/policy_avg"))
                if lengths:
                    logs["response_length"] = sum(lengths) / len(lengths)
                    lengths.clear()

    with internal("trl-ppo"):
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward, value_model=value, train_dataset=train,
                             eval_dataset=samples if params.sample_generations else None,
                             callbacks=[EpisodeTokens()])
        ppo_module.print_rich_table = SampleLog(ctx.run_dir / "samples.jsonl", lambda: trainer.state)
        ppo_module.truncate_response = truncate_and_measure

    # 5. train, 6. save the policy (not the value model) as a full model
    ctx.train(trainer, params, resumable=False)
    trainer.model.policy.save_pretrained(str(ctx.output_dir))
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(str(ctx.output_dir))
    ctx.log(f"[lab] saved the policy to {ctx.output_dir}; sample generations in samples.jsonl")
