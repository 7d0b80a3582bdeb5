"""The playground's engine: a cached model loader with a memory budget, streamed chat answers, tokenizer views,
and rankings of answers stored as preference pairs."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from lab import datasets, ranking, registry
from lab.errors import LabError
from lab.settings import Settings
from lab.speed import available_memory

GB = 1024**3


class ModelCache:
    """Loaded models, least recently used first out, within a memory budget. A load waits for no one: when the
    memory is not there (a training job holds it), it says so instead of pushing the machine into swap."""

    def __init__(self, budget_bytes: int, headroom_bytes: int = GB // 2):
        self.budget, self.headroom = budget_bytes, headroom_bytes
        self.loaded: OrderedDict[str, tuple] = OrderedDict()  # name -> (model, tokenizer, bytes)
        self.lock = threading.Lock()

    def size_of(self, info: dict, settings: Settings) -> int:
        base = registry.base_of(settings, registry.get(settings, info["name"]))
        return 4 * (base.parameters or 0) + 4 * (info["parameters"] or 0 if info["kind"] == "adapter" else 0)

    def get(self, settings: Settings, name: str, running_jobs: list[int] | None = None):
        """(model, tokenizer) for a registered model, loading it when needed."""
        with self.lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return self.loaded[name][:2]
            info = registry.info(settings, name)
            if info["kind"] in ("reward", "classifier"):
                raise LabError(f"{name} is a {info['kind']} model: it scores text, it does not write any")
            if info["architecture"].endswith("ForMaskedLM"):
                raise LabError(f"{name} is a masked LM: it fills in blanks, it does not write answers")
            need = self.size_of(info, settings)
            if need > self.budget:
                raise LabError(f"{name} needs about {need / GB:.1f} GB; the playground may use "
                               f"{self.budget / GB:.1f} GB", "raise LAB_PLAYGROUND_GB")
            while self.loaded and sum(v[2] for v in self.loaded.values()) + need > self.budget:
                self.loaded.popitem(last=False)
            free = available_memory()
            if free is not None and free - need < self.headroom:
                busy = f" while training job(s) {', '.join(map(str, running_jobs))} run" if running_jobs else ""
                raise LabError(f"not enough free memory to load {name}{busy}: {free / GB:.1f} GB free, "
                               f"{need / GB:.1f} GB needed", "try again when the job is done, or pick a smaller model")
            from lab import evaluation

            model, tokenizer = evaluation.load_generator(info, log=lambda m: None)
            self.loaded[name] = (model, tokenizer, need)
            return model, tokenizer

    def names(self) -> list[str]:
        return list(self.loaded)


_cache: ModelCache | None = None


def cache() -> ModelCache:
    global _cache
    if _cache is None:
        _cache = ModelCache(int(float(os.environ.get("LAB_PLAYGROUND_GB", "4")) * GB))
    return _cache


def stream_answer(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.7,
                  top_p: float = 0.95, seed: int = 0):
    """Yield the answer as it grows (a background thread generates; TextIteratorStreamer hands over text)."""
    import torch

    from lab.dependencies import IMPORTS

    with IMPORTS:  # the playground streams from the web server's threads
        from transformers import TextIteratorStreamer

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tokenizer([text], return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False}
    errors: list[BaseException] = []

    def work():
        try:
            torch.manual_seed(seed)
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=max_new_tokens, streamer=streamer,
                               pad_token_id=tokenizer.pad_token_id, **sampling)
        except BaseException as exc:  # surfaced to the page below
            errors.append(exc)
            streamer.on_finalized_text("", stream_end=True)

    threading.Thread(target=work, daemon=True).start()
    answer = ""
    for piece in streamer:
        answer += piece
        yield answer
    if errors:
        raise LabError(f"generation failed: {errors[0]}")


def answer(model, tokenizer, messages: list[dict], **kwargs) -> str:
    text = ""
    for partial in stream_answer(model, tokenizer, messages, **kwargs):
        text = partial
    return text.strip()


def tokenize(settings: Settings, name: str, text: str) -> list[tuple[str, int]]:
    """How a model's tokenizer splits `text`: (piece, id) pairs."""
    from lab import modeling

    tok = modeling.tokenizer(registry.info(settings, name)["path"], log=lambda m: None)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [(tok.decode([i]), i) for i in ids]


def record_ranking(settings: Settings, dataset: str, prompt: str, answers: dict[str, str], winner: str | None,
                   system: str = "") -> dict:
    """Store a ranking: the winner's answer as `chosen` against each other answer as `rejected`, appended to
    the preference dataset `dataset` (created when new). A tie (winner None) adds no pair but is logged.
    Every ranking also goes to the dataset folder's rankings.jsonl with the models' names."""
    if not prompt.strip():
        raise LabError("ask something first: there is no prompt to rank answers for")
    if len(answers) < 2 or any(not a.strip() for a in answers.values()):
        raise LabError("rank needs two or more answers")
    if winner is not None and winner not in answers:
        raise LabError(f"{winner} gave no answer here")
    rows = [] if winner is None else [
        ranking.pair_row(prompt, answers[winner], text, winner, m, system=system)
        for m, text in answers.items() if m != winner and text.strip() != answers[winner].strip()]
    if winner is not None and not rows:
        raise LabError("the answers are the same: there is no preference to record")
    existing = {d["name"] for d in datasets.list_all(settings)}
    if rows:
        ranking.add_pairs(settings, dataset, rows, "playground rankings")
    elif dataset not in existing:
        raise LabError(f"no dataset named {dataset!r} yet: a tie adds no pair, so it cannot start one")
    info = datasets.info(settings, dataset)
    log = {"time": time.time(), "prompt": prompt, "system": system, "answers": answers, "winner": winner}
    with open(Path(info["path"]) / "rankings.jsonl", "a") as f:
        f.write(json.dumps(log, ensure_ascii=False) + "\n")
    return {"dataset": dataset, "added": len(rows), "pairs": info["rows"]}
