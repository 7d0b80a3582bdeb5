"""Classification scores of a classifier (a `classify` run's output) on labelled rows: accuracy, macro F1,
per-class precision and recall, and the confusion matrix (eval/confusion_matrix.json).

    lab run eval-classify --model classify-4 --dataset sms-test
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lab import evaluation, modeling
from lab.errors import DataError

ID = "eval-classify"
KIND = "eval"
ACCEPTS = ("classification",)
MODEL_KINDS = ("classifier",)
DESCRIPTION = "Accuracy, macro F1 and confusion matrix of a classifier."


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(10_000, ge=1, le=10_000_000, description="Rows scored (from the start of the dataset).")
    max_length: int = Field(128, ge=8, le=131072, description="Longest text in tokens.")
    batch_size: int = Field(16, ge=1, le=4096, description="Rows scored at once.")


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The rows as they are scored: the text, and its label as text (1 and "1" are one label)."""
    return [{"text": r["text"], "label": str(r["label"])} for r in rows]


def run(ctx, params: Params) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(ctx.model["path"], dtype=torch.float32).eval()
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log, padding_side="right")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = examples(ctx.dataset["format"], ctx.rows()[: params.limit])
    unknown = sorted({str(r["label"]) for r in rows} - set(labels))
    if unknown:
        raise DataError(f"labels {unknown} are not among the classifier's labels {labels}")
    truth, predicted = [labels.index(str(r["label"])) for r in rows], []
    for start in range(0, len(rows), params.batch_size):
        texts = [r["text"] for r in rows[start:start + params.batch_size]]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=params.max_length, return_tensors="pt")
        with torch.no_grad():
            predicted += model(**batch).logits.argmax(-1).tolist()
        ctx.set_progress(len(predicted), len(rows))
        ctx.check_cancelled()
    summary, matrix = evaluation.classification_scores(labels, truth, predicted)
    majority = max(truth.count(i) for i in range(len(labels))) / len(truth)
    scored = [{"row": i + 1, "label": labels[t], "predicted": labels[p]}
                for i, (t, p) in enumerate(zip(truth, predicted, strict=True))]
    evaluation.record(ctx, {**summary, "majority_baseline": majority, "rows": len(rows)}, scored)
    (Path(ctx.run_dir) / "eval" / "confusion_matrix.json").write_text(json.dumps(
        {"labels": labels, "rows_are": "true label", "columns_are": "predicted label", "matrix": matrix}, indent=2))
