"""What a model will see before anything is launched: a row with the chat template applied, which tokens count
towards the loss, and rough memory and tokens-per-step figures for a training form."""

from __future__ import annotations

import html
import json
from functools import lru_cache
from pathlib import Path

from lab import formats
from lab.datasets import iter_rows
from lab.dependencies import internal
from lab.errors import LabError

CHAT_FORMATS = ("chat", "alpaca", "prompt_completion")


@lru_cache(maxsize=8)
def _tokenizer(path: str):
    from lab import modeling

    return modeling.tokenizer(path, log=lambda m: None)  # exactly as the trainers load it (ChatML fallback, pad)


def sft_example(fmt: str, row: dict, completion_only: bool) -> dict:
    """One row as the sft plugin gives it to SFTTrainer: prompt/completion (the prompt masked) or whole messages."""
    return (formats.to_prompt_completion if completion_only else formats.to_messages)(fmt, row)


def sft_prepare(tokenizer, examples: list[dict], *, completion_only: bool, max_length: int | None):
    """The examples through TRL's own SFT preparation (`SFTTrainer._prepare_dataset`, the code that training runs):
    a datasets.Dataset with input_ids and labels (-100: not trained), truncated to max_length, rows left without a
    trained token dropped as TRL drops them; the column `lab_row` says which input row each one is."""
    import tempfile
    from types import SimpleNamespace

    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    from lab.modeling import trl

    module = trl()
    SFTConfig, SFTTrainer = module.SFTConfig, module.SFTTrainer  # noqa: N806 (the classes, under their names)
    data = Dataset.from_list([{**e, "lab_row": i} for i, e in enumerate(examples)])
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, use_cpu=True, report_to=[], max_length=max_length,
                         completion_only_loss=True if completion_only else None)
    first = examples[0] if examples else {}
    # the attributes of the trainer that its preparation reads, as SFTTrainer.__init__ sets them for these args
    stand_in = SimpleNamespace(
        _tokenizer=tokenizer, chat_template=None,
        completion_only_loss=("prompt" in first and "completion" in first) if args.completion_only_loss is None
        else args.completion_only_loss)
    disable_progress_bar()
    try:
        with internal("trl-preparation"):
            return SFTTrainer._prepare_dataset(stand_in, data, tokenizer, args, False, None, "preview")
    finally:
        enable_progress_bar()


def tokenize_row(tokenizer_path: str, fmt: str, row: dict, completion_only: bool = True,
                 max_length: int | None = None) -> dict:
    """Tokens of one row exactly as sft trains on them: [(text, state)] with state "train" (counts towards the
    loss), "mask" (seen, not learned) or "cut" (beyond max_length: never seen), and the counts."""
    tok = _tokenizer(tokenizer_path)
    if fmt in CHAT_FORMATS:
        full = sft_prepare(tok, [sft_example(fmt, row, completion_only)], completion_only=completion_only,
                           max_length=None)[0]
        ids, trained = full["input_ids"], [label != -100 for label in full["labels"]]
    else:
        ids = tok(row.get("text", ""))["input_ids"]
        trained = [True] * len(ids)
    return _sample(tok, ids, trained[:max_length], max_length)  # TRL's default truncation keeps the start


def _sample(tok, ids: list[int], trained: list, max_length: int | None) -> dict:
    """A tokenized row for the page: [(text, state)], state "train", "mask", or "cut" for the tokens past the
    `len(trained)` that training sees; with the counts."""
    states = [("train" if trained[i] else "mask") if i < len(trained) else "cut" for i in range(len(ids))]
    return {"tokens": list(zip([tok.decode([t]) for t in ids], states, strict=True)), "count": len(ids),
            "trained": states.count("train"), "cut": states.count("cut"), "max_length": max_length}


@lru_cache(maxsize=16)
def _truncated_rows(tokenizer_path: str, dataset_path: str, fingerprint: str, fmt: str, completion_only: bool,
                    max_length: int, limit: int) -> tuple[int, int, tuple[int, ...]]:
    from itertools import islice

    rows = list(islice(iter_rows(dataset_path), limit))
    examples = [sft_example(fmt, r, completion_only) for r in rows]
    kept = sft_prepare(_tokenizer(tokenizer_path), examples, completion_only=completion_only, max_length=max_length)
    lost = sorted(set(range(len(rows))) - set(kept["lab_row"]))
    return len(rows), len(lost), tuple(lost[:10])


def preference_row(tokenizer_path: str, row: dict, max_length: int | None = None) -> dict:
    """A preference pair exactly as dpo trains on it: TRL's own preparation (`DPOTrainer._prepare_dataset`) and
    collator (`DataCollatorForPreference`, which truncates to max_length and marks the answer tokens). Returns
    {"chosen": sample, "rejected": sample} with samples as `tokenize_row` gives them."""
    import tempfile
    from types import SimpleNamespace

    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    from lab.modeling import trl

    module = trl()
    DPOConfig, DPOTrainer = module.DPOConfig, module.DPOTrainer  # noqa: N806 (the classes, under their names)
    tok = _tokenizer(tokenizer_path)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, use_cpu=True, report_to=[], max_length=None)
    disable_progress_bar()
    try:
        with internal("trl-preparation"):
            DataCollatorForPreference = module.trainer.dpo_trainer.DataCollatorForPreference  # noqa: N806
            prepared = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), Dataset.from_list(
                [formats.to_preference_pair(row)]), tok, args, "preview")[0]
            example = {k: prepared[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
            full = DataCollatorForPreference(pad_token_id=tok.pad_token_id)([example])
            seen = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length)([example])
    finally:
        enable_progress_bar()
    out = {}
    for i, side in enumerate(("chosen", "rejected")):
        ids = full["input_ids"][i][:int(full["attention_mask"][i].sum())].tolist()
        trained = seen["completion_mask"][i][:int(seen["attention_mask"][i].sum())].tolist()
        out[side] = _sample(tok, ids, trained, max_length)
    return out


def _with_rows(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{**formats.to_preference_pair(r), "lab_row": i} for i, r in enumerate(rows)])


def _kept_by_preparation(method: str, tok, rows: list[dict], max_length: int) -> set[int]:
    """The pairs (row numbers) that dpo, kto or reward keep after their trainer's own preparation, which drops
    what max_length leaves nothing to learn from."""
    import tempfile
    from types import SimpleNamespace

    from lab.modeling import trl

    module = trl()
    config, trainer = {"dpo": (module.DPOConfig, module.DPOTrainer), "kto": (module.KTOConfig, module.KTOTrainer),
                       "reward": (module.RewardConfig, module.RewardTrainer)}[method]
    with tempfile.TemporaryDirectory() as tmp:
        args = config(output_dir=tmp, use_cpu=True, report_to=[], max_length=max_length)
    stand_in = SimpleNamespace(_tokenizer=tok, calculate_KL=False)  # what the preparation reads of the trainer
    with internal("trl-preparation"):
        prepared = trainer._prepare_dataset(stand_in, _with_rows(rows), tok, args, "preview")
    return set(prepared["lab_row"])  # kto unpairs: both examples of a pair share its prompt, and its row number


def orpo_trains(row: dict) -> bool:
    """Whether a pair as ORPO tokenized it (`tokenize_row`) keeps an answer token on both sides: ORPO averages
    each answer's log-probability over its tokens, so an answer cut to nothing makes the loss NaN."""
    return any(t != -100 for t in row["chosen_labels"]) and any(t != -100 for t in row["rejected_labels"])


def _kept_by_orpo(tok, rows: list[dict], max_length: int) -> set[int]:
    """The pairs ORPO can train on: its own tokenization (`ORPOTrainer.tokenize_row`, after the same prompt and
    chat-template steps) cuts both answers when prompt plus the longer answer pass max_length, and a pair whose
    shorter answer keeps no token gives a NaN loss (the orpo plugin drops those)."""
    from types import SimpleNamespace

    from lab.modeling import trl

    module = trl()
    ORPOTrainer = module.experimental.orpo.ORPOTrainer  # noqa: N806 (the class, under its name)
    data_utils = module.data_utils
    stand_in = SimpleNamespace(processing_class=tok, is_encoder_decoder=False, max_length=max_length,
                               max_completion_length=None, padding_value=tok.pad_token_id, label_pad_token_id=-100)
    stand_in.build_tokenized_answer = lambda prompt, answer: ORPOTrainer.build_tokenized_answer(stand_in, prompt,
                                                                                               answer)
    kept = set()
    for i, row in enumerate(_with_rows(rows)):
        row = data_utils.maybe_apply_chat_template(data_utils.maybe_extract_prompt(row), tok)
        with internal("trl-orpo"):
            tokenized = ORPOTrainer.tokenize_row(stand_in, {k: row[k] for k in ("prompt", "chosen", "rejected")})
        if orpo_trains(tokenized):
            kept.add(i)
    return kept


PAIR_METHODS = ("dpo", "kto", "reward", "orpo")


@lru_cache(maxsize=16)
def _lost_pairs(method: str, tokenizer_path: str, dataset_path: str, fingerprint: str, max_length: int,
                limit: int) -> tuple[int, int, tuple[int, ...]]:
    from itertools import islice

    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    rows = list(islice(iter_rows(dataset_path), limit))
    tok = _tokenizer(tokenizer_path)
    disable_progress_bar()
    try:
        kept = _kept_by_orpo(tok, rows, max_length) if method == "orpo" else _kept_by_preparation(
            method, tok, rows, max_length)
    finally:
        enable_progress_bar()
    lost = sorted(set(range(len(rows))) - kept)
    return len(rows), len(lost), tuple(lost[:10])


TRUNCATION_SAMPLE = 5000  # rows checked before launch (the first ones; the warning says so when there are more)


def truncation(settings, model_name: str, dataset_name: str, params: dict, method: str = "sft") -> dict | None:
    """How many rows (sft) or pairs (dpo, kto, reward, orpo) max_length leaves nothing to learn from: the rows
    the trainer drops before training, counted by its own preparation. None when there is nothing to check."""
    from lab import datasets, registry

    dataset = datasets.info(settings, dataset_name)
    path = registry.info(settings, model_name)["path"]
    max_length = int(params["max_length"])
    if method == "sft" and dataset["format"] in CHAT_FORMATS and not params.get("packing"):
        checked, lost, first = _truncated_rows(path, dataset["path"], dataset["fingerprint"], dataset["format"],
                                               bool(params.get("completion_only", True)), max_length,
                                               TRUNCATION_SAMPLE)
        unit = "rows"
    elif method in PAIR_METHODS and dataset["format"] == "preference":
        checked, lost, first = _lost_pairs(method, path, dataset["path"], dataset["fingerprint"], max_length,
                                           TRUNCATION_SAMPLE)
        unit = "pairs"
    else:
        return None
    return {"checked": checked, "rows": dataset["rows"], "lost": lost, "first_lost": list(first),
            "max_length": max_length, "unit": unit}


def nothing_to_learn(settings, method: str, model: dict | None, dataset: dict | None, params,
                     also: str = "") -> list[str]:
    """Before queueing an sft, dpo, kto, reward or orpo job: a problem when max_length leaves every row or pair of
    the dataset nothing to learn from (checked when the dataset is small enough to check whole); `also`: another
    way out, after "raise max_length"."""
    if model is None or dataset is None or model.get("kind") == "classifier":
        return []
    found = truncation(settings, model["name"], dataset["name"], params.model_dump(), method=method)
    if found and found["lost"] and found["lost"] == found["checked"] == found["rows"]:
        return [f"every {found['unit'][:-1]} of {dataset['name']} loses all its trained tokens to max_length="
                f"{params.max_length}: nothing would be learned; raise max_length{also}"]
    return []


def sample_html(sample: dict) -> str:
    """Tokens as spans: trained ones highlighted, masked prompt tokens greyed, tokens beyond max_length struck."""
    spans = []
    for text, state in sample["tokens"]:
        shown = html.escape(text).replace("\n", "↵<br>")
        spans.append(f'<span class="tok-{state}">{shown}</span>')
    cut = (f' · <span class="tok-cut">cut by max_length={sample["max_length"]}</span> {sample["cut"]} tokens'
           if sample.get("cut") else "")
    legend = (f'<div class="tok-legend"><span class="tok-train">learned</span> {sample["trained"]} tokens · '
              f'<span class="tok-mask">masked prompt</span> '
              f'{sample["count"] - sample["trained"] - sample.get("cut", 0)} tokens{cut} · '
              f'{sample["count"]} in all</div>')
    if sample["count"] and not sample["trained"]:
        legend += ('<div class="error-box">No token of this row is trained: training drops it '
                   '(raise max_length, or turn off completion_only).</div>')
    return legend + '<div class="tok-sample">' + "".join(spans) + "</div>"


def _mean_tokens(tokenizer_path: str, dataset_path: str, fingerprint: str, fmt: str, max_length: int) -> float:
    """Tokens a row (or a preference pair: prompt and chosen, prompt and rejected) puts through the model, each
    sequence cut to max_length, on average over the first rows."""
    counts = _sequence_lengths(tokenizer_path, dataset_path, fingerprint, fmt)
    return sum(sum(min(n, max_length) for n in row) for row in counts) / max(1, len(counts))


@lru_cache(maxsize=32)
def _sequence_lengths(tokenizer_path: str, dataset_path: str, fingerprint: str, fmt: str,
                      limit: int = 64) -> tuple[tuple[int, ...], ...]:
    """The token count of each sequence a row sends through the model (two for a preference pair), for the first
    rows: tokenized once per dataset, whatever max_length the form tries."""
    from itertools import islice

    out = []
    for row in islice(iter_rows(dataset_path), limit):
        if fmt == "preference":
            pair = preference_row(tokenizer_path, row)
            out.append((pair["chosen"]["count"], pair["rejected"]["count"]))
        else:
            out.append((tokenize_row(tokenizer_path, fmt, row)["count"],))
    return tuple(out)


def _config(path: str) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def estimate(settings, model_name: str, dataset_name: str, params: dict, method: str = "sft") -> dict:
    """Training memory at the worst step (GB, and its parts in MiB: lab.memory) and tokens per optimizer step for
    a form's choices."""
    from lab import datasets, memory, registry, speed

    model = registry.get(settings, model_name)
    base = registry.base_of(settings, model)
    dataset = datasets.get(settings, dataset_name)
    cfg = _config(base.path)
    n = base.parameters or 0
    hidden, layers = cfg.get("hidden_size", 0), cfg.get("num_hidden_layers", 0)
    inter = cfg.get("intermediate_size", 4 * hidden)
    kv = hidden * cfg.get("num_key_value_heads", 1) // max(1, cfg.get("num_attention_heads", 1))
    batch, accum = int(params.get("batch_size", 1)), int(params.get("grad_accum", 1))
    max_len = int(params.get("max_length", 1024))
    lengths = _sequence_lengths(model.path, dataset.path, dataset.fingerprint, dataset.format)
    mean = _mean_tokens(model.path, dataset.path, dataset.fingerprint, dataset.format, max_len)
    full = not params.get("use_lora", True)
    if full:
        trainable = n
    else:
        r = int(params.get("lora_r", 16))  # LoRA on every linear layer: r * (inputs + outputs) each
        trainable = layers * r * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inter) * 3)
    step = memory.step_of(method, params, max((k for row in lengths for k in row), default=max_len))
    precision = str(params.get("precision", "fp32"))
    by_part = memory.parts(cfg, n, trainable, full, method, step, precision, float(params.get("lora_dropout", 0.05)))
    available, total = speed.available_memory(), speed.total_memory()
    # gradient checkpointing as the run will choose it (lab.speed.choose_checkpointing's rule, one process)
    asked = str(params.get("gradient_checkpointing", "auto"))
    vocab = cfg.get("vocab_size", 0)
    on = asked == "on" or (asked == "auto" and available is not None and speed.activation_bytes(
        hidden, layers, vocab, batch, max_len, cfg.get("num_attention_heads", 1), method,
        params) > speed.CHECKPOINT_SHARE * available)
    if on:
        by_part = memory.checkpointed(by_part, cfg, step, precision)
    need = sum(by_part.values())
    return {"memory_gb": round(need / 1e9, 3), "parts": by_part,
            "available_gb": round(available / 1e9, 3) if available else None,
            "total_gb": round(total / 1e9, 3) if total else None,
            "verdict": memory.verdict(need, available), "checkpointing": on,
            "remedies": memory.remedies(by_part, method, full, step, checkpointing=on),
            "worst_step": f"{step.sequences} x {step.length} tokens{' (one flat sequence)' if step.flat else ''}",
            "tokens_per_step": round(batch * accum * (max_len if params.get("packing") else mean)),
            "mean_row_tokens": round(mean, 1), "trainable_parameters": trainable, "parameters": n}


def does_not_fit(settings, spec, params: dict) -> LabError | None:
    """Why a run of `spec` (its parameters as the plugin read them) would not fit the memory it will have, or None:
    the memory_gb it asks for, else this machine's whole memory when a local worker runs it here (the Train page's
    label compares with the memory available now). Only for the methods and the device the estimate was measured
    on (lab.memory.MEASURED, the CPU); a failed estimate never blocks a launch."""
    from lab import memory, speed

    if spec.plugin not in memory.MEASURED or not (spec.model and spec.dataset) or speed.device() != "cpu":
        return None
    if spec.memory_gb is not None:
        room, where = spec.memory_gb * 1e9, f"the {spec.memory_gb:g} GB it asks for (memory_gb)"
    elif settings.executor == "local":  # all of it: the jobs running now end before a queued one starts
        room, where = speed.total_memory(), "this machine's memory"
    else:
        return None
    try:
        est = estimate(settings, spec.model, spec.dataset, params, method=spec.plugin)
    except Exception:  # a courtesy, like the Train page's estimate
        return None
    need = est["memory_gb"] * 1e9 * spec.processes  # each process holds its own copy
    if not room or need <= room:
        return None
    return LabError(f"{spec.plugin} on {spec.model} would need about {need / 1e9:.1f} GB at its worst step "
                    f"({est['worst_step']}{', per process' if spec.processes > 1 else ''}), more than {where}, "
                    f"{room / 1e9:.1f} GB",
                    "to need less: " + "; ".join(est["remedies"] or ["a smaller batch_size or max_length"])
                    + ". If it will run on another machine with more memory, set memory_gb to that memory")
