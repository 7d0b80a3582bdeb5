"""Preference accuracy of a reward model on held-out pairs: how often it scores the chosen answer above the
rejected one, and by how much.

    lab run eval-preference --model reward-9 --dataset hh-test
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lab import evaluation, formats

ID = "eval-preference"
KIND = "eval"
ACCEPTS = ("preference",)
MODEL_KINDS = ("reward",)
DESCRIPTION = "Pair accuracy and mean margin of a reward model on preference pairs."


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(500, ge=1, le=1_000_000, description="Pairs scored (from the start of the dataset).")


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The pairs as the reward model scores them: a prompt and two replies."""
    return [formats.to_preference_pair(r) for r in rows]


def run(ctx, params: Params) -> None:
    score = evaluation.reward_scorer(ctx.model["path"])
    pairs = examples(ctx.dataset["format"], ctx.rows()[: params.limit])
    prompts = [p.get("prompt", []) for p in pairs]
    chosen = score(prompts, [p["chosen"] for p in pairs])
    rejected = score(prompts, [p["rejected"] for p in pairs])
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    scored = [{"row": i + 1, "chosen_reward": c, "rejected_reward": r, "margin": c - r}
                for i, (c, r) in enumerate(zip(chosen, rejected, strict=True))]
    evaluation.record(ctx, {"accuracy": sum(m > 0 for m in margins) / len(margins),
                            "mean_margin": sum(margins) / len(margins), "rows": len(margins)}, scored)
