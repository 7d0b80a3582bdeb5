"""Sampling as a job: k answers to every prompt of a dataset, from one model or several, kept as a candidates
dataset to rank (the Rank page, `lab rank`), to judge (`eval-judge`), or to read.

    lab run generate --model sft-7 --dataset alpaca --set num_samples=4 --set also_models=smollm2-135m-instruct

For each model in turn, the prompts are answered in batches with the KV cache (left padding, each row stopping at
its own end of turn); sample j of every prompt comes from the sampling pass seeded `seed + j`. The result is
registered as dataset `candidates-<job id>`: per prompt its id, the prompt turns, and the answers, each with the
model and settings that produced it, its token count and its share of the generation time. A stopped or retried
job goes on from the batches it had finished (kept in checkpoints/answers.jsonl).
"""

from __future__ import annotations

import json
import time

from pydantic import BaseModel, ConfigDict, Field

from lab import evaluation, formats, modeling
from lab.formats import MAX_CANDIDATES
from lab.params import model_field

ID = "generate"
KIND = "data"
ACCEPTS = ("chat", "alpaca", "prompt_completion", "preference", "candidates", "text")
DESCRIPTION = "k sampled answers per prompt from one or more models: a candidates dataset to rank or judge."
PARTIAL = "answers.jsonl"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(4, ge=1, le=MAX_CANDIDATES, description="Answers per prompt from each model.")
    also_models: str = model_field(description="Further models, comma-separated, each giving num_samples answers "
                                               "too (a fine-tune beside its base, say).", kind="full|adapter",
                                   several=True)
    temperature: float = Field(0.8, ge=0, le=5, description="Sampling temperature; 0 for greedy (one answer per "
                                                             "model then).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens whose "
                                                       "probability reaches this.")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="Longest answer in tokens.")
    limit: int = Field(0, ge=0, le=1_000_000, description="Prompts answered from the start of the dataset; 0: all.")
    batch_size: int = Field(8, ge=1, le=512, description="Prompts answered at once.")
    seed: int = Field(0, description="Sample j of every prompt comes from the pass seeded seed + j.")


def further_models(params: Params) -> list[str]:
    return [m.strip() for m in params.also_models.split(",") if m.strip()]


def check(params: Params) -> list[str]:
    problems = []
    names = further_models(params)
    if len(set(names)) != len(names):
        problems.append("`also_models` names a model twice")
    if params.temperature == 0 and params.num_samples > 1:
        problems.append("`temperature` 0 gives the same answer every time: raise it above 0 for several samples, "
                        "or set num_samples=1 and compare models with `also_models`")
    return problems


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    problems = modeling.not_causal(model)
    names = further_models(params)
    if model is not None and model["name"] in names:
        problems.append(f"`also_models`: {model['name']} is already the job's model")
    for name in names:
        problems += modeling.writer_problems(settings, name, "also_models")
    total = params.num_samples * (1 + len(names))
    if not 2 <= total <= MAX_CANDIDATES:
        problems.append(f"{total} answer(s) per prompt: a candidates set holds 2 to {MAX_CANDIDATES} "
                        f"(num_samples × models)")
    return problems


def plan(params: Params, dataset: dict) -> str:
    """What the job will do, for the Train page (it trains nothing, so no memory estimate applies)."""
    prompts = min(dataset["rows"], params.limit or dataset["rows"])
    models = 1 + len(further_models(params))
    k = params.num_samples * models
    return (f"**{prompts:,} prompts × {k} answers** ({params.num_samples} from each of {models} model(s)) = "
            f"**{prompts * k:,} answers** of up to {params.max_new_tokens} tokens, {params.batch_size} prompts at "
            f"a time; the result is a candidates dataset to rank on the Rank page.")


def prompts_of(fmt: str, rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(id, prompt turns) for each row: a candidates row keeps its id, others are numbered from 1."""
    return [(str(row.get("id", i)) if fmt == "candidates" else str(i), formats.prompt_of(fmt, row))
            for i, row in enumerate(rows, start=1)]


def examples(fmt: str, rows: list[dict]) -> list[list[dict]]:
    """The prompts answered: each row's prompt turns."""
    return [p for _, p in prompts_of(fmt, rows)]


def _done(path) -> dict[tuple[str, int], list[list[dict]]]:
    """The batches a stopped attempt finished: (model, first prompt) -> answers per prompt. A line cut short by the
    stop is ignored (it is answered again)."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(entry["model"], entry["start"])] = entry["answers"]
    return done


def run(ctx, params: Params) -> None:
    rows = ctx.rows()
    items = prompts_of(ctx.dataset["format"], rows[: params.limit or None])
    models = [ctx.model] + ctx.models["also_models"]
    partial = ctx.checkpoints_dir / PARTIAL
    done = _done(partial)
    if done:
        ctx.log(f"[lab] {len(done)} batch(es) answered by an earlier attempt are kept")
    batches = [(m, start) for m in models for start in range(0, len(items), params.batch_size)]
    answers: dict[str, list[list[dict]]] = {m["name"]: [] for m in models}
    began, made, tokens = time.perf_counter(), 0, 0
    loaded = None
    with open(partial, "a") as keep:
        for n, (info, start) in enumerate(batches):
            prompts = [p for _, p in items[start:start + params.batch_size]]
            found = done.get((info["name"], start))
            if found is None:
                if loaded is None or loaded[0] != info["name"]:
                    ctx.set_phase("loading")
                    loaded = None  # free the last model before loading the next
                    loaded = (info["name"], *evaluation.load_generator(info, log=ctx.log))
                    ctx.set_phase("generating")
                passes = [evaluation.sample(loaded[1], loaded[2], prompts, params.max_new_tokens, params.temperature,
                                            params.top_p, seed=params.seed + j, batch_size=params.batch_size)
                          for j in range(params.num_samples)]
                found = [[passes[j][i] | {"seed": params.seed + j} for j in range(params.num_samples)]
                         for i in range(len(prompts))]
                keep.write(json.dumps({"model": info["name"], "start": start, "answers": found}) + "\n")
                keep.flush()
                made += len(prompts) * params.num_samples
                tokens += sum(a["tokens"] for per in found for a in per)
            answers[info["name"]] += found
            ctx.set_progress(n + 1, len(batches))
            ctx.check_cancelled()
    seconds = time.perf_counter() - began
    settings = {"temperature": params.temperature, "top_p": params.top_p, "max_new_tokens": params.max_new_tokens}
    out = []
    for i, (item_id, prompt) in enumerate(items):
        candidates = [{"text": a["text"], "model": m["name"], **settings, "seed": a["seed"], "tokens": a["tokens"],
                       "prompt_tokens": a["prompt_tokens"], "finish": a["finish"], "seconds": a["seconds"]}
                      for m in models for a in answers[m["name"]][i]]
        out.append({"id": item_id, "prompt": prompt, "candidates": candidates})
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    with open(ctx.output_dir / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    names = ", ".join(m["name"] for m in models)
    source = (f"generate job {ctx.job_id}: {params.num_samples} answer(s) each from {names} to {len(items)} prompts "
              f"of {ctx.dataset['name']}")
    (ctx.output_dir / "dataset.json").write_text(json.dumps({"format": "candidates", "prefix": "candidates",
                                                             "source": source}, indent=2) + "\n")
    if made:
        ctx.log_metrics(len(batches), {"generate/answers_per_s": made / seconds, "generate/tokens_per_s":
                                       tokens / seconds, "generate/answers": made})
    ctx.log(f"[lab] {len(out)} prompts × {len(out[0]['candidates']) if out else 0} answers; {made} generated in "
            f"{seconds:.1f} s ({made / max(seconds, 1e-9):.2f} answers/s)")
