"""Held-out loss and perplexity of a model (or a run's output) on a text or chat dataset.

    lab run eval-perplexity --model sft-7 --dataset alpaca-test --set limit=200

Chat, alpaca and prompt/completion rows are scored as the model's chat template renders the whole conversation;
text rows as they are. Loss is the mean over all tokens of all rows (each row cut at max_length).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from lab import evaluation, formats, modeling
from lab.errors import DataError

ID = "eval-perplexity"
KIND = "eval"
ACCEPTS = ("text", "chat", "alpaca", "prompt_completion")
DESCRIPTION = "Held-out loss and perplexity on text or conversations."


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(200, ge=1, le=1_000_000, description="Rows scored (from the start of the dataset).")
    max_length: int = Field(1024, ge=8, le=131072, description="Tokens per row at most.")


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    return modeling.not_causal(model)


def examples(fmt: str, rows: list[dict]) -> list[str | list[dict]]:
    """What is scored: raw text, or the whole conversation (with the chat template applied when scored)."""
    return [row["text"] if fmt == "text" else formats.to_messages(fmt, row)["messages"] for row in rows]


def run(ctx, params: Params) -> None:
    import torch

    model = modeling.causal_lm(ctx.model, adapter="merge", log=ctx.log).eval()
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
    fmt = ctx.dataset["format"]
    total_loss = total_tokens = 0.0
    scored = []
    for i, example in enumerate(examples(fmt, ctx.rows()[: params.limit])):
        if fmt == "text":
            ids = tokenizer(example, truncation=True, max_length=params.max_length)["input_ids"]
        else:
            out = tokenizer.apply_chat_template(example, tokenize=True)
            ids = list(out["input_ids"] if hasattr(out, "keys") else out)[: params.max_length]
        if len(ids) < 2:
            continue
        batch = torch.tensor([ids])
        with torch.no_grad():
            loss = model(input_ids=batch, labels=batch).loss.item()
        n = len(ids) - 1
        total_loss, total_tokens = total_loss + loss * n, total_tokens + n
        scored.append({"row": i + 1, "tokens": n, "loss": loss})
        ctx.set_progress(i + 1, min(params.limit, ctx.dataset["rows"]))
        ctx.check_cancelled()
    if not total_tokens:
        raise DataError("no row had two or more tokens to score")
    mean = total_loss / total_tokens
    evaluation.record(ctx, {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": total_tokens,
                            "rows": len(scored)}, scored)
