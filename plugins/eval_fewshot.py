"""Few-shot accuracy: a language model labels texts with k = 0, 1, 5 (or chosen) examples in its prompt, so the
zero-shot and few-shot behaviour of base and tuned models can be compared.

    lab run eval-fewshot --model smollm2-135m-instruct --dataset sms-test --set shots=0,1,5

The prompt is plain text: an instruction naming the labels, k solved examples ("Text: ...\\nLabel: ham"), then
the text to label. The answer is the label whose tokens the model finds most likely after "Label:". Examples are
drawn from the first rows of the dataset and never scored.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lab import evaluation, modeling
from lab.errors import DataError

ID = "eval-fewshot"
KIND = "eval"
ACCEPTS = ("classification",)
DESCRIPTION = "Zero-shot and few-shot accuracy of a language model on labelled texts."


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shots: str = Field("0,1,5", description="Numbers of in-context examples to try, comma-separated.")
    limit: int = Field(100, ge=1, le=100_000, description="Texts labelled for each number of shots.")
    pool: int = Field(20, ge=1, le=10_000, description="First rows kept as the pool of examples (not scored).")
    seed: int = Field(0, description="Random seed for drawing examples.")

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: str) -> str:
        try:
            ks = [int(k) for k in value.split(",") if k.strip()]
        except ValueError:
            raise ValueError("must be whole numbers separated by commas, e.g. 0,1,5") from None
        if not ks or any(k < 0 or k > 64 for k in ks):
            raise ValueError("each number of shots must be between 0 and 64")
        return ",".join(map(str, ks))


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    return modeling.not_causal(model)


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The rows as they are scored: the text, and its label as text (1 and "1" are one label)."""
    return [{"text": r["text"], "label": str(r["label"])} for r in rows]


def label_logprobs(model, tokenizer, prompt: str, labels: list[str]) -> dict[str, float]:
    """Each label's log-probability after the prompt. The prompt runs once; each label continues from its
    key/value cache (cropped back after it), unless tokenizing prompt and label together changes the
    prompt's own tokens: then that label runs whole."""
    import torch

    start = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([start]), use_cache=True)
    cache, last = out.cache, out.logits[0, -1].log_softmax(-1)
    scores = {}
    for label in labels:
        ids = tokenizer(prompt + " " + label)["input_ids"]
        with torch.no_grad():
            if ids[:len(start)] == start and len(ids) > len(start):
                tail = ids[len(start):]
                logits = model(input_ids=torch.tensor([tail]), cache=cache, use_cache=True).logits[0]
                logits = logits.log_softmax(-1)
                cache.crop(-len(tail))
                scores[label] = last[tail[0]].item() + sum(logits[i - 1, tail[i]].item()
                                                           for i in range(1, len(tail)))
            else:
                logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
                scores[label] = sum(logits[i - 1, ids[i]].item() for i in range(len(start), len(ids)))
    return scores


def run(ctx, params: Params) -> None:

    model = modeling.causal_lm(ctx.model, adapter="merge", log=ctx.log).eval()
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
    rows = examples(ctx.dataset["format"], ctx.rows())
    labels = sorted({str(r["label"]) for r in rows})
    pool, tests = rows[: params.pool], rows[params.pool:][: params.limit]
    if not tests:
        raise DataError(f"no rows left to score after the first {params.pool} kept as examples",
                        "lower pool or use a larger dataset")
    header = f"Label each text as one of: {', '.join(labels)}.\n\n"
    rng = random.Random(params.seed)

    summary, scored = {}, []
    ks = [int(k) for k in params.shots.split(",")]
    for n, k in enumerate(ks):
        correct = 0
        for i, row in enumerate(tests):
            shots = rng.sample(pool, min(k, len(pool)))
            prompt = header + "".join(f"Text: {s['text']}\nLabel: {s['label']}\n\n" for s in shots)
            prompt += f"Text: {row['text']}\nLabel:"
            scores = label_logprobs(model, tokenizer, prompt, labels)
            guess = max(labels, key=scores.__getitem__)
            correct += guess == str(row["label"])
            scored.append({"shots": k, "row": params.pool + i + 1, "label": str(row["label"]), "predicted": guess})
            ctx.set_progress(n * len(tests) + i + 1, len(ks) * len(tests))
            ctx.check_cancelled()
        summary[f"accuracy_{k}shot"] = correct / len(tests)
    summary["majority_baseline"] = max(sum(str(r["label"]) == lab for r in tests) for lab in labels) / len(tests)
    evaluation.record(ctx, summary, scored)
