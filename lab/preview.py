"""What a model will see before anything is launched: a row with the chat template applied, which tokens count
towards the loss, and rough memory and tokens-per-step figures for a training form."""

from __future__ import annotations

import html
import json
from functools import lru_cache
from pathlib import Path

from lab import formats
from lab.datasets import iter_rows

CHAT_FORMATS = ("chat", "alpaca", "prompt_completion")


@lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    from lab.registry import CHATML_TEMPLATE

    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE  # what the sft plugin falls back to
    return tok


def _ids(tok, messages: list[dict], **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in transformers 5


def tokenize_row(tokenizer_path: str, fmt: str, row: dict, completion_only: bool = True) -> dict:
    """Tokens of one row as the sft plugin feeds them: [(text, counts_towards_loss)], with counts."""
    tok = _tokenizer(tokenizer_path)
    if fmt in CHAT_FORMATS:
        pair = formats.to_prompt_completion(fmt, row)
        prompt = _ids(tok, pair["prompt"], add_generation_prompt=True)
        full = _ids(tok, pair["prompt"] + pair["completion"])
        trained = [not completion_only or i >= len(prompt) for i in range(len(full))]
    else:
        full = tok(row.get("text", ""))["input_ids"]
        trained = [True] * len(full)
    pieces = [tok.decode([i]) for i in full]
    return {"tokens": list(zip(pieces, trained, strict=True)), "count": len(full), "trained": sum(trained)}


def sample_html(sample: dict) -> str:
    """Tokens as spans: trained ones highlighted, masked prompt tokens greyed; special tokens boxed."""
    spans = []
    for text, trained in sample["tokens"]:
        cls = "tok-train" if trained else "tok-mask"
        shown = html.escape(text).replace("\n", "↵<br>")
        spans.append(f'<span class="{cls}">{shown}</span>')
    legend = (f'<div class="tok-legend"><span class="tok-train">learned</span> {sample["trained"]} tokens · '
              f'<span class="tok-mask">masked prompt</span> {sample["count"] - sample["trained"]} tokens · '
              f'{sample["count"]} in all</div>')
    return legend + '<div class="tok-sample">' + "".join(spans) + "</div>"


@lru_cache(maxsize=32)
def _mean_tokens(tokenizer_path: str, dataset_path: str, fingerprint: str, fmt: str, limit: int = 64) -> float:
    counts = []
    for i, row in enumerate(iter_rows(dataset_path)):
        if i >= limit:
            break
        counts.append(tokenize_row(tokenizer_path, fmt, row)["count"])
    return sum(counts) / max(1, len(counts))


def _config(path: str) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def estimate(settings, model_name: str, dataset_name: str, params: dict) -> dict:
    """Rough training memory (GB) and tokens per optimizer step for a form's choices."""
    from lab import datasets, registry

    model = registry.get(settings, model_name)
    base = registry.base_of(settings, model)
    dataset = datasets.get(settings, dataset_name)
    cfg = _config(base.path)
    n = base.parameters or 0
    hidden, layers = cfg.get("hidden_size", 0), cfg.get("num_hidden_layers", 0)
    inter, vocab = cfg.get("intermediate_size", 4 * hidden), cfg.get("vocab_size", 0)
    kv = hidden * cfg.get("num_key_value_heads", 1) // max(1, cfg.get("num_attention_heads", 1))
    batch, accum = int(params.get("batch_size", 1)), int(params.get("grad_accum", 1))
    max_len = int(params.get("max_length", 1024))
    mean = _mean_tokens(model.path, dataset.path, dataset.fingerprint, dataset.format)
    seq = max_len if params.get("packing") else min(mean, max_len)
    if params.get("use_lora", True):
        r = int(params.get("lora_r", 16))  # LoRA on every linear layer: r * (inputs + outputs) each
        trainable = layers * r * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inter) * 3)
    else:
        trainable = n
    total = 4 * n + 12 * trainable  # fp32 weights; gradient and two Adam moments per trainable weight
    total += batch * seq * (hidden * layers * 34 + vocab * 8)  # activations and logits, a rule of thumb
    return {"memory_gb": round(total / 1e9, 3), "tokens_per_step": round(batch * accum * seq),
            "mean_row_tokens": round(mean, 1), "trainable_parameters": trainable, "parameters": n}
