"""Reward scoring: a reward model (a `reward` run's output) scores a model's answers to prompts; with a second
model, both answer the same prompts and the win rate of the first over the second is reported.

    lab run eval-reward --model ppo-12 --dataset alpaca-test --set reward_model=reward-9 --set compare_to=sft-7

Metrics: mean reward (and of the other model), win rate (ties count half). Every answer pair with its scores is
kept in eval/examples.jsonl.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lab import evaluation, formats, modeling, registry
from lab.params import model_field

ID = "eval-reward"
KIND = "eval"
ACCEPTS = ("prompt_completion", "alpaca", "chat", "preference")
DESCRIPTION = "Answers scored by a reward model; win rate of this model over another."


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reward_model: str = model_field(description="The reward model that scores the answers; required.", kind="reward")
    compare_to: str = model_field(description="A second model answering the same prompts (for the win rate).",
                                  kind="full|adapter")
    limit: int = Field(50, ge=1, le=100_000, description="Prompts answered.")
    max_new_tokens: int = Field(96, ge=1, le=8192, description="Longest answer in tokens.")
    temperature: float = Field(0.0, ge=0, le=5, description="0 for greedy answers.")
    seed: int = Field(0, description="Random seed when sampling.")


def check(params: Params) -> list[str]:
    return [] if params.reward_model else ["`reward_model` is required: the output of a `reward` run"]


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    problems = modeling.not_causal(model)  # the models named are registered and of their kinds (checked before)
    if params.compare_to:
        problems += [f"`compare_to`: {p}" for p in modeling.not_causal(registry.info(settings, params.compare_to))]
    return problems


def answers_of(info: dict, prompts, params: Params, log) -> list[str]:
    model, tokenizer = evaluation.load_generator(info, log=log)
    out = evaluation.generate(model, tokenizer, prompts, params.max_new_tokens, params.temperature, seed=params.seed)
    del model
    return out


def examples(fmt: str, rows: list[dict]) -> list[list[dict]]:
    """The prompts answered and scored: each row's prompt turns."""
    return [formats.prompt_of(fmt, row) for row in rows]


def run(ctx, params: Params) -> None:
    fmt = ctx.dataset["format"]
    prompts = examples(fmt, ctx.rows()[: params.limit])
    score = evaluation.reward_scorer(ctx.models["reward_model"]["path"])
    ours = answers_of(ctx.model, prompts, params, ctx.log)
    ours_scores = score(prompts, ours)
    summary = {"mean_reward": sum(ours_scores) / len(ours_scores), "rows": len(prompts)}
    scored = [{"row": i + 1, "prompt": p[-1]["content"], "answer": a, "reward": s}
                for i, (p, a, s) in enumerate(zip(prompts, ours, ours_scores, strict=True))]
    if params.compare_to:
        other = ctx.models["compare_to"]
        theirs = answers_of(other, prompts, params, ctx.log)
        theirs_scores = score(prompts, theirs)
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours_scores, theirs_scores, strict=True)]
        summary.update(other_mean_reward=sum(theirs_scores) / len(theirs_scores), win_rate=sum(wins) / len(wins))
        for example, answer, s in zip(scored, theirs, theirs_scores, strict=True):
            example.update(other_answer=answer, other_reward=s)
        ctx.log(f"[lab] {ctx.model['name']} against {other['name']}: win rate {summary['win_rate']:.3f}")
    evaluation.record(ctx, summary, scored)
