"""Sequence-classification fine-tuning (e.g. spam versus ham) with transformers' Trainer: LoRA or full.

    lab run classify --model smollm2-135m-instruct --dataset sms-spam --set max_steps=80 --set max_length=128

Labels are read from the data and the label map is saved with the model (config id2label). A causal LM gets a
fresh scoring head. Held-out rows (`eval_split`) give accuracy, macro F1 and per-class precision and recall; the
confusion matrix is saved to the run's `eval/confusion_matrix.json`. The output is a full classifier (a LoRA is
merged in before saving), registered as model `classify-<job id>`.
"""

from __future__ import annotations

import json

from pydantic import ConfigDict, Field

from lab import evaluation, modeling
from lab.errors import DataError
from lab.params import Lora, Optimiser, Passthrough, Precision, Split, TrainParams, advanced

ID = "classify"
KIND = "train"
DISTRIBUTED = True  # data-parallel under torchrun (the Trainer shards the data)
ACCEPTS = ("classification",)
DESCRIPTION = "Classification fine-tuning on text/label data, e.g. spam vs ham (LoRA or full)."
CONFIG = "transformers.TrainingArguments"


class Params(TrainParams, Optimiser, Lora, Split, Precision, Passthrough):
    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(128, ge=8, le=131072, description="Longest text in tokens; longer ones are cut.")
    use_lora: bool = Field(True, description="Train a LoRA adapter (and the new scoring head), not every weight.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (2e-4 for LoRA, 3e-5 full).")
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per device per step.")
    eval_split: float = Field(0.1, ge=0, lt=0.5, description="Fraction of rows held out for accuracy and F1.",
                              json_schema_extra={"widget": "slider"})
    logging_steps: int = Field(5, **advanced(ge=1, description="Record metrics every this many steps."))


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    """A classifier needs two labels at least: refused before queueing, not after loading the model."""
    if dataset is None:
        return []
    from lab.datasets import iter_rows

    labels = set()
    for row in iter_rows(dataset["path"]):
        labels.add(str(row.get("label")))
        if len(labels) > 1:
            return []
    return [f"dataset {dataset['name']} has a single label ({', '.join(labels) or 'none'}): classification needs "
            "two at least"]


def examples(fmt: str, rows: list[dict]) -> list[dict]:
    """The rows as the classifier learns them: the text, and its label as text (1 and "1" are one label)."""
    return [{"text": r["text"], "label": str(r["label"])} for r in rows]


def run(ctx, params: Params) -> None:
    import numpy as np
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    # 1. data: labels as read from the rows, in a stable order
    rows = examples(ctx.dataset["format"], ctx.rows())
    labels = sorted({r["label"] for r in rows})
    if len(labels) < 2:
        raise DataError(f"classification needs at least two labels; the data has only {labels}")
    index = {label: i for i, label in enumerate(labels)}
    data = Dataset.from_list([{"text": r["text"], "label": index[r["label"]]} for r in rows])
    train, held_out = ctx.split(data, params)
    majority = max(np.bincount(train["label"])) / len(train)
    ctx.log(f"[lab] labels {labels}; majority-class share {majority:.3f}")

    # 2. model: a scoring head on the base (an earlier run's adapter is merged in first)
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
    base = modeling.merged_folder(ctx.model, ctx.run_dir / "base-merged", log=ctx.log)
    model = modeling.sequence_classifier(base, len(labels), tokenizer.pad_token_id, labels)
    if params.use_lora:
        model = get_peft_model(model, ctx.lora(params, task_type="SEQ_CLS"))
    bf16 = ctx.use_bf16(params.precision, model, tokenizer)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=params.max_length)

    train = train.map(tokenize, batched=True, remove_columns=["text"])
    held_out = held_out.map(tokenize, batched=True, remove_columns=["text"]) if held_out else None

    def compute_metrics(prediction):
        logits, truth = prediction
        return evaluation.classification_scores(labels, list(truth), list(np.argmax(logits, axis=-1)))[0]

    # 3. configuration, 4. trainer, 5. train
    args = ctx.trainer_args(TrainingArguments, params, model=model, bf16=bf16, evaluate=held_out is not None,
                            include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics)
    ctx.train(trainer, params)

    # the final scores on the held-out rows, and the confusion matrix
    if held_out is not None:
        prediction = trainer.predict(held_out)
        predicted = list(np.argmax(prediction.predictions, -1))
        found, matrix = evaluation.classification_scores(labels, list(prediction.label_ids), predicted)
        ctx.log_metrics(trainer.state.global_step, {f"final/{k}": v for k, v in found.items()}
                        | {"final/majority_baseline": majority})
        if ctx.is_main:
            (ctx.run_dir / "eval").mkdir(exist_ok=True)
            (ctx.run_dir / "eval" / "confusion_matrix.json").write_text(json.dumps(
                {"labels": labels, "rows_are": "true label", "columns_are": "predicted label", "matrix": matrix,
                 **found, "majority_baseline": majority}, indent=2) + "\n")
        ctx.log(f"[lab] held-out accuracy {found['accuracy']:.3f} (majority class {majority:.3f}), "
                f"macro F1 {found['macro_f1']:.3f}")

    # 6. save a plain classifier (LoRA merged in) with its label map, and the tokenizer (rank 0 under torchrun)
    ctx.save(trainer.model, tokenizer, what=f"the classifier ({len(labels)} labels)")
