"""What the evaluation plugins share: answering prompts with a model, the text metrics, and recording results in
one tidy shape (metrics in the database under `eval/...`, one JSON line per example in the run's eval/ folder,
and a summary in output/results.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lab import formats, modeling


def load_generator(info: dict, log=print):
    """A causal LM (an adapter merged in) and its tokenizer padded on the left, ready to generate."""
    model = modeling.causal_lm(info, adapter="merge", log=log).eval()
    tokenizer = modeling.tokenizer(info["path"], log=log, padding_side="left")
    return model, tokenizer


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 8) -> list[str]:
    """Answers to chat prompts (greedy when temperature is 0), with the model's chat template."""
    return [a["text"] for a in sample(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed,
                                      batch_size)]


def _stop_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def sample(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, batch_size: int = 8) -> list[dict]:
    """Answers to chat prompts in batches (left padding, the KV cache, each row stopping at its own end of turn):
    one {text, tokens, prompt_tokens, finish ("stop" or "length"), seconds (the batch's time shared out)} each.
    The seed is set once, so the answers repeat for the same seed and batch size."""
    import time

    import torch

    torch.manual_seed(seed)
    stops = _stop_ids(model, tokenizer)
    out = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in prompts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False}
        began = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **sampling)
        share = (time.perf_counter() - began) / len(texts)
        new = ids[:, batch["input_ids"].shape[1]:].tolist()
        for row, mask in zip(new, batch["attention_mask"].tolist(), strict=True):
            end = next((i for i, t in enumerate(row) if t in stops), None)
            kept = row if end is None else row[:end]
            out.append({"text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                        "tokens": len(kept) + (end is not None), "prompt_tokens": sum(mask),
                        "finish": "length" if end is None else "stop", "seconds": round(share, 4)})
    return out


def prompts_and_references(fmt: str, rows: list[dict]) -> tuple[list[list[dict]], list[str]]:
    prompts, references = [], []
    for row in rows:
        pair = formats.to_prompt_completion(fmt, row)
        prompts.append(pair["prompt"])
        references.append(pair["completion"][0]["content"])
    return prompts, references


def text_scores(answers: list[str], references: list[str]) -> tuple[dict, list[dict]]:
    """ROUGE-1/2/L F1 (rouge-score), corpus BLEU and chrF (sacrebleu), exact match and contains, all in 0..1
    except BLEU and chrF (0..100, as sacrebleu reports them); with the per-example scores."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    per = []
    for a, r in zip(answers, references, strict=True):
        rouge = scorer.score(r, a)
        per.append({"rouge1": rouge["rouge1"].fmeasure, "rouge2": rouge["rouge2"].fmeasure,
                    "rougeL": rouge["rougeL"].fmeasure, "exact_match": float(a.strip() == r.strip()),
                    "contains": float(r.strip().lower() in a.lower())})
    n = max(1, len(per))
    summary = {k: sum(p[k] for p in per) / n for k in ("rouge1", "rouge2", "rougeL", "exact_match", "contains")}
    summary["bleu"] = sacrebleu.corpus_bleu(answers, [references]).score
    summary["chrf"] = sacrebleu.corpus_chrf(answers, [references]).score
    return summary, per


def record(ctx, summary: dict, examples: list[dict] | None = None, step: int = 0) -> None:
    """Store an evaluation's results: `eval/<name>` metrics, eval/examples.jsonl, output/results.json."""
    clean = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    ctx.log_metrics(step, {f"eval/{k}": v for k, v in clean.items()})
    folder = Path(ctx.run_dir) / "eval"
    folder.mkdir(exist_ok=True)
    if examples is not None:
        with open(folder / "examples.jsonl", "w") as f:
            for row in examples:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    record = {"plugin": ctx.plugin, "model": ctx.model and ctx.model["name"],
              "dataset": ctx.dataset and ctx.dataset["name"], "results": clean,
              "examples": str(folder / "examples.jsonl") if examples is not None else None}
    (Path(ctx.output_dir) / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    ctx.log("[lab] " + ", ".join(f"{k} {v:.4g}" for k, v in clean.items()))


def _answer_text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


REWARD_BATCH = 8


def reward_scorer(path: str):
    """A reward model (a `reward` run's output) as a function: it scores prompt + answer conversations,
    f(prompts, completions, **_) -> list of floats (the shape TRL's GRPO takes for a reward function)."""
    import torch

    with modeling.IMPORTS:
        from transformers import AutoModelForSequenceClassification
    tok = modeling.tokenizer(path, log=lambda m: None, padding_side="right")
    scorer = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    def reward_model(prompts, completions, **_):
        texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": _answer_text(c)}], tokenize=False)
                 for p, c in zip(prompts, completions, strict=True)]
        # batches of texts of about the same length (scored shortest first, returned in the callers' order): a
        # batch pads to its longest text, and on a CPU a padded position costs as much as a real one
        lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=1024)["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = [0.0] * len(texts)
        for start in range(0, len(order), REWARD_BATCH):
            chosen = order[start:start + REWARD_BATCH]
            batch = tok([texts[i] for i in chosen], padding=True, truncation=True, max_length=1024,
                        return_tensors="pt")
            with torch.no_grad():
                for i, value in zip(chosen, scorer(**batch).logits[:, 0].float().tolist(), strict=True):
                    out[i] = value
        return out

    return reward_model


def classification_scores(labels: list[str], truth: list[int], predicted: list[int]) -> tuple[dict, list[list[int]]]:
    """Accuracy, macro F1, per-class precision and recall, and the confusion matrix (rows: truth)."""
    import re

    k = len(labels)
    matrix = [[0] * k for _ in range(k)]
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    out = {"accuracy": sum(matrix[i][i] for i in range(k)) / max(1, len(truth))}
    f1s = []
    for i, label in enumerate(labels):
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:40]
        tp, predicted_i, actual_i = matrix[i][i], sum(matrix[r][i] for r in range(k)), sum(matrix[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        out[f"precision/{key}"], out[f"recall/{key}"] = precision, recall
    out["macro_f1"] = sum(f1s) / k
    return out, matrix
