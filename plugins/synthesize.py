"""Synthetic instruction data: new instructions and their answers written by a local model from a few seed tasks
(self-instruct), or answers to an existing set of prompts (distillation from a bigger model).

    lab run synthesize --model smollm2-135m-instruct --dataset seeds --set num_instructions=50

Self-instruct (Wang et al., 2023), as the lab does it: each request shows the model a few tasks drawn from the seed
pool (seed tasks, and one it already wrote once there are some) and asks for one new task; what comes back is
cleaned (numbering and quotes removed, the first line kept) and filtered: unparseable (no words), too short, too long,
or a near-duplicate (ROUGE-L F1 against every seed and every task already kept at or above `rouge_threshold`). The
model then answers each kept task; empty answers are dropped. What each filter removed is counted in the log, the
metrics (`synth/...`) and output/filters.json. With `mode=answers`, the dataset's prompts are answered instead.
The result is an instruction dataset (alpaca or chat rows) registered as `synthetic-<job id>`, for `sft`. Seeds come
from the dataset (its prompts) and/or `seed_tasks`, one per line. A stopped job goes on from its last round.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lab import evaluation, formats, modeling
from lab.errors import LabError

ID = "synthesize"
KIND = "data"
ACCEPTS = ("alpaca", "chat", "prompt_completion", "text", "candidates", "preference")
NEEDS_DATASET = "optional"
DESCRIPTION = "Self-instruct: new instructions and answers from a few seed tasks, filtered; or answers to prompts."
STATE = "synthesize.json"
TEMPLATE = ("Here are some example tasks a person might give an AI assistant:\n\n{tasks}\n\nWrite one new task, "
            "different from these. Reply with the task only, in one line, without numbering.")
PREFIX = re.compile(r"^\s*(?:(?:your\s+)?(?:new\s+)?task\s*\d*\s*[:.)\-]\s*|\d+\s*[.):\-]\s*|[-*•]\s+)",
                    re.IGNORECASE)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["self-instruct", "answers"] = Field("self-instruct", description="self-instruct: new tasks from "
                                                      "the seeds, then their answers; answers: answer the dataset's "
                                                      "prompts (distillation).")
    seed_tasks: str = Field("", description="Seed tasks, one per line (beside or instead of the dataset's prompts).")
    num_instructions: int = Field(20, ge=1, le=100_000, description="New tasks to keep (self-instruct).")
    examples_per_request: int = Field(3, ge=1, le=8, description="Tasks shown to the model in each request.")
    rouge_threshold: float = Field(0.7, gt=0, le=1, description="A new task this similar (ROUGE-L F1) to a seed or "
                                                                "a kept task is a near-duplicate and dropped.")
    min_words: int = Field(3, ge=1, le=1000, description="Shorter tasks are dropped.")
    max_words: int = Field(150, ge=1, le=10_000, description="Longer tasks are dropped.")
    max_rounds: int = Field(20, ge=1, le=10_000, description="Requests are made in rounds of batch_size; the job "
                                                            "stops after this many rounds even if short of tasks.")
    temperature: float = Field(1.0, ge=0, le=5, description="Sampling temperature for new tasks.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling for new tasks and answers.")
    answer_temperature: float = Field(0.0, ge=0, le=5, description="For the answers; 0: greedy.")
    max_task_tokens: int = Field(64, ge=4, le=1024, description="Longest new task in tokens.")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="Longest answer in tokens.")
    output_format: Literal["alpaca", "chat"] = Field("alpaca", description="The rows written.")
    limit: int = Field(0, ge=0, le=1_000_000, description="Prompts read from the dataset; 0: all.")
    batch_size: int = Field(8, ge=1, le=512, description="Requests generated at once.")
    seed: int = Field(0, description="Random seed for the examples drawn and the sampling.")


def typed_seeds(params: Params) -> list[str]:
    return [line.strip() for line in params.seed_tasks.splitlines() if line.strip()]


def check(params: Params) -> list[str]:
    if params.min_words > params.max_words:
        return ["`min_words` is above `max_words`: every task would be dropped"]
    return []


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    problems = modeling.not_causal(model)
    if params.mode == "answers" and dataset is None:
        problems.append("`mode` answers needs a dataset of prompts to answer")
    if params.mode == "self-instruct" and dataset is None and len(typed_seeds(params)) < 2:
        problems.append("self-instruct needs seed tasks: a dataset of instructions, or two or more `seed_tasks` "
                        "(one per line)")
    return problems


def plan(params: Params, dataset: dict | None) -> str:
    """What the job will do, for the Train page."""
    if params.mode == "answers":
        n = min(dataset["rows"], params.limit or dataset["rows"]) if dataset else 0
        return (f"**{n:,} prompts answered** (up to {params.max_new_tokens} tokens each) into {params.output_format} "
                "rows.")
    seeds = (min(dataset["rows"], params.limit or dataset["rows"]) if dataset else 0) + len(typed_seeds(params))
    return (f"**{params.num_instructions:,} new tasks** from {seeds:,} seed task(s), at most {params.max_rounds} "
            f"rounds of {params.batch_size} requests, each task then answered; near-duplicates (ROUGE-L ≥ "
            f"{params.rouge_threshold}), too short (< {params.min_words} words) and too long (> {params.max_words}) "
            "are dropped and counted.")


def examples(fmt: str, rows: list[dict]) -> list[list[dict]]:
    """The prompts read (seed tasks, or the prompts to answer): each row's prompt turns."""
    return [formats.prompt_of(fmt, row) for row in rows]


def clean(text: str) -> str:
    """A generated task as kept: its first non-empty line after any preamble ending in a colon ("Here is a new
    task:"), numbering and surrounding quotes removed; empty when there is none."""
    lines = [part.strip() for part in text.splitlines() if part.strip()]
    while lines and lines[0].endswith(":"):
        lines.pop(0)
    line = lines[0] if lines else ""
    line = PREFIX.sub("", line).strip()
    return line.strip("\"'“”‘’` ").strip()


class Filter:
    """The self-instruct filters, counting what each removes."""

    def __init__(self, params: Params, seeds: list[str], kept: list[str], counts: Counter):
        from rouge_score import rouge_scorer

        self.params, self.counts = params, counts
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.known = [*seeds, *kept]

    def similarity(self, a: str, b: str) -> float:
        return self.scorer.score(a, b)["rougeL"].fmeasure

    def keep(self, task: str) -> bool:
        words = len(task.split())
        has_words = any(ch.isalnum() for ch in task)
        reason = ("unparseable" if not has_words else "too_short" if words < self.params.min_words
                  else "too_long" if words > self.params.max_words else None)
        if reason is None and any(self.similarity(k, task) >= self.params.rouge_threshold for k in self.known):
            reason = "near_duplicate"
        self.counts[f"removed_{reason}" if reason else "kept"] += 1
        if reason is None:
            self.known.append(task)
        return reason is None


def _save(ctx, state: dict) -> None:
    tmp = ctx.checkpoints_dir / f".{STATE}.new"
    tmp.write_text(json.dumps(state, ensure_ascii=False))
    tmp.replace(ctx.checkpoints_dir / STATE)


def _load(ctx) -> dict | None:
    path = ctx.checkpoints_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def new_tasks(ctx, params: Params, model, tokenizer, seeds: list[str], state: dict) -> list[str]:
    """Self-instruct rounds until `num_instructions` tasks are kept or `max_rounds` have run."""
    counts = Counter(state["counts"])
    kept: list[str] = state["kept"]
    screen = Filter(params, seeds, kept, counts)
    while len(kept) < params.num_instructions and state["round"] < params.max_rounds:
        rng = random.Random(params.seed * 100_003 + state["round"])
        requests = []
        for _ in range(params.batch_size):
            shots = rng.sample(seeds, min(params.examples_per_request - (1 if kept else 0), len(seeds)))
            shots += rng.sample(kept, 1) if kept else []
            rng.shuffle(shots)
            tasks = "\n".join(f"Task {i}: {t}" for i, t in enumerate(shots, 1))
            requests.append([{"role": "user", "content": TEMPLATE.format(tasks=tasks)}])
        outs = evaluation.sample(model, tokenizer, requests, params.max_task_tokens, params.temperature, params.top_p,
                                 seed=params.seed + state["round"], batch_size=params.batch_size)
        for out in outs:
            counts["generated"] += 1
            task = clean(out["text"])
            if screen.keep(task):
                kept.append(task)
                if len(kept) >= params.num_instructions:
                    break
        state.update(round=state["round"] + 1, kept=kept, counts=dict(counts))
        _save(ctx, state)
        ctx.set_progress(len(kept), params.num_instructions)
        ctx.check_cancelled()
    return kept


def run(ctx, params: Params) -> None:
    rows = ctx.rows()[: params.limit or None] if ctx.dataset else []
    prompts = examples(ctx.dataset["format"], rows) if ctx.dataset else []
    state = _load(ctx) or {"round": 0, "kept": [], "counts": {}, "answers": []}
    if state["round"] or state["answers"]:
        ctx.log(f"[lab] going on from round {state['round']} ({len(state['kept'])} tasks kept, "
                f"{len(state['answers'])} answered)")
    model, tokenizer = evaluation.load_generator(ctx.model, log=ctx.log)
    ctx.set_phase("generating")
    if params.mode == "self-instruct":
        seeds = list(dict.fromkeys([p[-1]["content"].strip() for p in prompts] + typed_seeds(params)))
        tasks = new_tasks(ctx, params, model, tokenizer, seeds, state)
        requests = [[{"role": "user", "content": t}] for t in tasks]
    else:
        requests = prompts
    counts = Counter(state["counts"])
    answers: list[dict] = state["answers"]
    for start in range(len(answers), len(requests), params.batch_size):
        answers += evaluation.sample(model, tokenizer, requests[start:start + params.batch_size],
                                     params.max_new_tokens, params.answer_temperature, params.top_p,
                                     seed=params.seed + start, batch_size=params.batch_size)
        state["answers"] = answers
        _save(ctx, state)
        ctx.set_progress(len(answers), len(requests))
        ctx.check_cancelled()
    out = []
    for request, answer in zip(requests, answers, strict=True):
        if not answer["text"].strip():
            counts["removed_empty_answer"] += 1
            continue
        counts["answers_cut_at_max_new_tokens"] += answer["finish"] == "length"
        if params.output_format == "chat":
            out.append({"messages": [*request, {"role": "assistant", "content": answer["text"]}]})
        else:
            out.append({"instruction": request[-1]["content"], "input": "", "output": answer["text"]})
    counts["rows"] = len(out)
    ctx.log("[lab] " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(counts.items())))
    ctx.log_metrics(state["round"], {f"synth/{k}": v for k, v in counts.items()})
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    (ctx.output_dir / "filters.json").write_text(json.dumps(dict(counts), indent=2) + "\n")
    if not out:
        raise LabError(f"the model wrote no usable row ({', '.join(f'{k} {v}' for k, v in counts.items())})",
                       "try more rounds (max_rounds), a higher temperature or answer_temperature, other seeds, or a "
                       "bigger model")
    with open(ctx.output_dir / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    where = f"{len(rows)} prompts of {ctx.dataset['name']}" if ctx.dataset else ""
    what = (f"answers by {ctx.model['name']} to {where}" if params.mode == "answers" else
            f"self-instruct by {ctx.model['name']} from {len(seeds)} seed task(s)"
            + (f" ({where} and typed ones)" if where and typed_seeds(params) else f" ({where})" if where else ""))
    source = f"synthesize job {ctx.job_id}: {what}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    (ctx.output_dir / "dataset.json").write_text(json.dumps({"format": params.output_format, "prefix": "synthetic",
                                                             "source": source}, indent=2) + "\n")
