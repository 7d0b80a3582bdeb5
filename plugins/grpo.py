"""Group relative policy optimisation (TRL GRPOTrainer): sample several answers per prompt, score them, and move
the policy towards the better ones of each group.

    lab run grpo --model sft-7 --dataset alpaca --set reward_model=reward-9 --set max_steps=50
    lab run grpo --model sft-7 --dataset gsm --set exact_match=true --set format_regex='\\d+$'

Rewards: a `reward` run's model, and/or rules: closeness to a target length in words, a regular expression the
answer must match, exact match with the row's reference answer (the completion/output of the row). Prompts come
from any dataset with prompts (the reply, where there is one, is the reference). Some generations with their
rewards are kept in the run's `samples.jsonl`. Metrics: reward (and per reward function), KL, entropy, completion
lengths, loss. The output is the tuned policy as a full model.
"""

from __future__ import annotations

import json
import re

from pydantic import ConfigDict, Field

from lab import evaluation, formats, modeling
from lab.errors import DataError
from lab.params import Lora, Optimiser, Passthrough, Precision, TrainParams, advanced, model_field

ID = "grpo"
KIND = "train"
ACCEPTS = ("prompt_completion", "alpaca", "chat", "preference")
DESCRIPTION = "GRPO: sample answer groups, reward them (reward model and/or rules), reinforce the better ones."
CONFIG = "trl.GRPOConfig"


class Params(TrainParams, Optimiser, Lora, Precision, Passthrough):
    model_config = ConfigDict(extra="forbid")

    reward_model: str = model_field(description="A reward model (output of a `reward` run) that scores answers.",
                                    kind="reward")
    length_target: int = Field(0, ge=0, le=10_000, description="Rule: reward answers near this many words (0: off).")
    format_regex: str = Field("", description="Rule: reward 1 when the answer matches this regular expression.")
    exact_match: bool = Field(False, description="Rule: reward 1 when the answer equals the row's reference.")
    num_generations: int = Field(4, ge=2, le=64, description="Answers sampled per prompt (the group).")
    max_completion_length: int = Field(64, ge=1, le=8192, description="Longest answer in tokens.")
    beta: float = Field(0.0, **advanced(ge=0, le=10, description="KL penalty towards the starting policy."))
    temperature: float = Field(1.0, **advanced(gt=0, le=5, description="Sampling temperature."))
    max_prompt_tokens: int = Field(256, **advanced(ge=8, description="Prompts longer than this are left out."))
    sample_every: int = Field(5, **advanced(ge=1, description="Keep generations every this many scoring rounds."))
    learning_rate: float = Field(1e-5, gt=0, le=1, description="Peak learning rate (1e-5 full, 5e-5 LoRA).")
    batch_size: int = Field(4, ge=1, le=4096, description="Answers per device per step (a multiple of the group).")


def check(params: Params) -> list[str]:
    problems = []
    if not (params.reward_model or params.length_target or params.format_regex or params.exact_match):
        problems.append("no reward: set `reward_model`, `length_target`, `format_regex` or `exact_match`")
    if params.format_regex:
        try:
            re.compile(params.format_regex)
        except re.error as exc:
            problems.append(f"`format_regex` is not a regular expression: {exc}")
    if params.batch_size % params.num_generations:
        problems.append(f"`batch_size` ({params.batch_size}) must be a multiple of `num_generations` "
                        f"({params.num_generations})")
    return problems


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    problems = modeling.not_causal(model)  # a reward model named is registered and a reward model (checked before)
    if params.exact_match and dataset and dataset["format"] == "preference":
        problems.append("`exact_match` needs a reference answer: use prompt/completion, alpaca or chat data")
    return problems


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def rule_rewards(params: Params, samples) -> list:
    """The rule reward functions chosen, each f(prompts, completions, **columns) -> list of floats."""
    funcs = []
    if params.length_target:
        def length(prompts, completions, **_):
            words = [len(_text(c).split()) for c in completions]
            return [max(0.0, 1 - abs(n - params.length_target) / params.length_target) for n in words]
        funcs.append(length)
    if params.format_regex:
        pattern = re.compile(params.format_regex)

        def format_match(prompts, completions, **_):
            return [1.0 if pattern.search(_text(c).strip()) else 0.0 for c in completions]
        funcs.append(format_match)
    if params.exact_match:
        def exact(prompts, completions, reference, **_):
            return [1.0 if _text(c).strip() == r.strip() else 0.0 for c, r in zip(completions, reference, strict=True)]
        funcs.append(exact)
    return [samples.wrap(f) for f in funcs]


class Samples:
    """Keeps some generations with their rewards in the run's samples.jsonl, every few scoring rounds."""

    def __init__(self, path, every: int):
        self.path, self.every, self.calls = path, every, {}

    def wrap(self, func):
        def scored(prompts, completions, **columns):
            rewards = func(prompts, completions, **columns)
            n = self.calls[func.__name__] = self.calls.get(func.__name__, -1) + 1
            if n % self.every == 0:
                with open(self.path, "a") as f:
                    for p, c, r in list(zip(prompts, completions, rewards, strict=True))[:2]:
                        f.write(json.dumps({"round": n, "reward": func.__name__, "value": r,
                                            "prompt": _text(p), "completion": _text(c)}, ensure_ascii=False) + "\n")
            return rewards
        scored.__name__ = func.__name__
        return scored


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The prompts GRPO samples answers to, with the reference answer where the format has one."""
    return [{"prompt": formats.prompt_of(fmt, row),
             "reference": "" if fmt == "preference" else formats.to_prompt_completion(fmt, row)["completion"][0][
                 "content"]} for row in rows]


def run(ctx, params: Params) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    # 1. prompts (and the reference answer where the format has one)
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log, padding_side="left")
    fmt, rows = ctx.dataset["format"], []
    for example in examples(fmt, ctx.rows()):
        if len(tokenizer.apply_chat_template(example["prompt"], tokenize=False)) > params.max_prompt_tokens * 4:
            continue  # a cheap length guard: about four characters per token
        rows.append(example)
    if not rows:
        raise DataError(f"no prompt is shorter than max_prompt_tokens={params.max_prompt_tokens}",
                        "raise max_prompt_tokens")
    ctx.log(f"[lab] {len(rows)} prompts, {params.num_generations} answers each")

    # 2. policy and rewards
    model = modeling.causal_lm(ctx.model, adapter="merge", log=ctx.log)
    bf16 = ctx.use_bf16(params.precision, model, tokenizer)
    samples = Samples(ctx.run_dir / "samples.jsonl", params.sample_every)
    rewards = rule_rewards(params, samples)
    if params.reward_model:
        scorer = evaluation.reward_scorer(ctx.models["reward_model"]["path"])
        rewards.insert(0, samples.wrap(scorer))

    # 3. configuration, 4. trainer, 5. train
    args = ctx.trainer_args(GRPOConfig, params, model=model, bf16=bf16, num_generations=params.num_generations,
                            max_completion_length=params.max_completion_length, temperature=params.temperature,
                            beta=params.beta)
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=ctx.lora(params))
    ctx.train(trainer, params)

    # 6. save the policy as a full model
    tokenizer.padding_side = "right"
    ctx.save(trainer.model, tokenizer, what="the tuned policy (sample generations in samples.jsonl)")
