"""Generation metrics on prompt/reference data: the model answers each prompt, and its answers are scored
against the references with ROUGE-1/2/L (rouge-score), BLEU and chrF (sacrebleu), exact match and contains.

    lab run eval-generate --model sft-7 --dataset alpaca-test --set limit=100 --set max_new_tokens=128

Every answer is kept with its scores in the run's eval/examples.jsonl. (The `evaluate` library would fetch its
metric code from the hub at run time; the metric packages are used directly, so this works offline.)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lab import evaluation, modeling

ID = "eval-generate"
KIND = "eval"
ACCEPTS = ("prompt_completion", "alpaca", "chat")
DESCRIPTION = "Answers scored against references: ROUGE, BLEU, chrF, exact match, contains."


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(100, ge=1, le=1_000_000, description="Prompts answered (from the start of the dataset).")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="Longest answer in tokens.")
    temperature: float = Field(0.0, ge=0, le=5, description="0 for greedy (repeatable) answers.")
    batch_size: int = Field(8, ge=1, le=512, description="Prompts answered at once.")
    seed: int = Field(0, description="Random seed when sampling.")


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    return modeling.not_causal(model)


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The prompts answered, each with the reference answer it is scored against."""
    prompts, references = evaluation.prompts_and_references(fmt, rows)
    return [{"prompt": p, "reference": r} for p, r in zip(prompts, references, strict=True)]


def run(ctx, params: Params) -> None:
    rows = ctx.rows()[: params.limit]
    found = examples(ctx.dataset["format"], rows)
    prompts, references = [e["prompt"] for e in found], [e["reference"] for e in found]
    model, tokenizer = evaluation.load_generator(ctx.model, log=ctx.log)
    answers = []
    for start in range(0, len(prompts), params.batch_size):
        answers += evaluation.generate(model, tokenizer, prompts[start:start + params.batch_size],
                                       params.max_new_tokens, params.temperature, seed=params.seed,
                                       batch_size=params.batch_size)
        ctx.set_progress(len(answers), len(prompts))
        ctx.check_cancelled()
    summary, per = evaluation.text_scores(answers, references)
    scored = [{"row": i + 1, "prompt": p[-1]["content"], "reference": r, "answer": a, **s}
                for i, (p, r, a, s) in enumerate(zip(prompts, references, answers, per, strict=True))]
    evaluation.record(ctx, {**summary, "rows": len(answers)}, scored)
