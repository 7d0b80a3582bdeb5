"""Model-graded evaluation: a local model judges this model's answers against another's, pair by pair, asked in
both orders to cancel position bias.

    lab run eval-judge --model sft-7 --dataset candidates-12 --set judge=smollm2-135m-instruct --set against=tiny

The answers come from a candidates dataset (a `generate` job run with `also_models`: the first answer of this model
and of `against` for each prompt), or, for prompt datasets, both models answer greedily here. The judge reads a fixed
prompt (the question, answer A, answer B) and its choice is the likeliest of the next tokens "A", "B" and "C" (tie),
read from its logits: no free text to parse. Each pair is judged with this model's answer first and then second; a
pair wins when both orders prefer it (or one does and the other calls a tie), loses likewise, and is a tie
otherwise, including when the two orders disagree. Reported: win, tie and loss rates, the win rate (ties half) with
a 95 % confidence interval, how often the two orders disagree (position bias), and the mean preference: the judge's
probability of this model's answer over both, averaged over both orders (0.5: no preference; it shows a leaning
even when a small judge always names the same position).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from lab import evaluation, formats, modeling
from lab.params import model_field

ID = "eval-judge"
KIND = "eval"
ACCEPTS = ("candidates", "prompt_completion", "alpaca", "chat")
DESCRIPTION = "A local model judges this model's answers against another's, in both orders: win/tie/loss rates."
JUDGE_PROMPT = (
    "You are an impartial judge. Compare two answers to the same question and decide which one is more helpful, "
    "correct and clear.\n\n[Question]\n{question}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    "Reply with a single letter: A if answer A is better, B if answer B is better, C if they are equally good.")
CHOICES = ("A", "B", "C")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    judge: str = model_field(description="The model that judges; required (a bigger model judges better).",
                             kind="full|adapter")
    against: str = model_field(description="The model this one is compared with; required.", kind="full|adapter")
    limit: int = Field(100, ge=1, le=100_000, description="Prompts judged (from the start of the dataset).")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="Longest answer when the models answer here.")
    batch_size: int = Field(8, ge=1, le=512, description="Judgements (or answers) computed at once.")
    max_length: int = Field(2048, ge=64, le=32768, description="Judge prompts are cut to this many tokens "
                                                             "(the answers' ends go first).")


def check(params: Params) -> list[str]:
    return [f"`{f}` is required" for f in ("judge", "against") if not getattr(params, f)]


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    problems = modeling.not_causal(model)
    for field in ("judge", "against"):
        problems += modeling.writer_problems(settings, getattr(params, field), field)
    if model is not None and params.against == model["name"] and (dataset or {}).get("format") != "candidates":
        problems.append("`against` is the job's model: give another model (or a candidates dataset with two answers "
                        "by it)")
    if model is not None and dataset is not None and dataset["format"] == "candidates" and not problems:
        from lab.datasets import iter_rows

        for i, row in enumerate(iter_rows(dataset["path"])):
            if i >= params.limit or (why := missing_models(row, model["name"], params.against)):
                break
        else:
            why = None
        if why:
            problems.append(why)
    return problems


def examples(fmt: str, rows: list[dict]) -> list[list[dict]]:
    """The prompts judged: each row's prompt turns."""
    return [formats.prompt_of(fmt, row) for row in rows]


def answer_pairs(fmt: str, rows: list[dict], ours: str, theirs: str) -> list[tuple[list[dict], str, str]]:
    """(prompt, our answer, their answer) from a candidates dataset: each model's first answer to each prompt."""
    out = []
    for row in rows:
        by: dict[str, list[str]] = {}
        for c in row["candidates"]:
            by.setdefault(c.get("model"), []).append(c["text"])
        missing = missing_models(row, ours, theirs)
        if missing:
            raise ValueError(missing)
        out.append((formats.prompt_of(fmt, row), by[ours][0], by[theirs][1 if ours == theirs else 0]))
    return out


def answer_indices(row: dict, ours: str, theirs: str) -> tuple[int, int]:
    """The stored positions of the two answers answer_pairs takes from a candidates row."""
    mine = [i for i, c in enumerate(row["candidates"]) if c.get("model") == ours]
    other = [i for i, c in enumerate(row["candidates"]) if c.get("model") == theirs]
    return mine[0], other[1 if ours == theirs else 0]


def missing_models(row: dict, ours: str, theirs: str) -> str | None:
    """Why a candidates row cannot give the pair (no answer by a model; one model against itself needs two)."""
    counts: dict[str, int] = {}
    for c in row["candidates"]:
        counts[c.get("model")] = counts.get(c.get("model"), 0) + 1
    by = ", ".join(f"{m} ({n})" for m, n in counts.items())
    for name in dict.fromkeys((ours, theirs)):
        if name not in counts:
            return (f"item {row.get('id', '?')} has no answer by {name} (its answers are by {by}): run `generate` "
                    f"with both models (--set also_models=...)")
    if ours == theirs and counts[ours] < 2:
        return f"item {row.get('id', '?')} has one answer by {ours}: judging it against itself needs two"
    return None


def _question(prompt: list[dict]) -> str:
    return "\n\n".join(m["content"] if m["role"] == "user" else f"({m['role']}) {m['content']}" for m in prompt)


def choices_of(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    """The judge's probabilities of A, B and C as its next token after each judging prompt."""
    import torch

    ids = [tokenizer.encode(c, add_special_tokens=False)[0] for c in CHOICES]
    out = []
    for start in range(0, len(texts), batch_size):
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=False) for t in texts[start:start + batch_size]]
        batch = tokenizer(chats, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                          add_special_tokens=False)
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: rows start at 0
        with torch.no_grad():
            logits = model(**batch, position_ids=positions).logits[:, -1, :]  # every row's next token
        probs = torch.softmax(logits[:, ids].float(), dim=-1).tolist()
        out += [dict(zip(CHOICES, p, strict=True)) for p in probs]
    return out


def verdict(first: str, second: str) -> tuple[str, bool]:
    """Combine the two orders (ours as A, then ours as B) into win/tie/loss, and whether they disagree."""
    ours_first = {"A": 1, "B": -1, "C": 0}[first]
    ours_second = {"B": 1, "A": -1, "C": 0}[second]
    total = ours_first + ours_second
    return ("win" if total > 0 else "loss" if total < 0 else "tie"), ours_first != ours_second


def preference(first: dict, second: dict) -> float:
    """How much the judge prefers this model's answer, from its probabilities in both orders: 0.5 is none."""
    ours, theirs = first["A"] + second["B"], first["B"] + second["A"]
    return ours / (ours + theirs) if ours + theirs else 0.5


def summary_of(outcomes: list[str], disagreements: list[bool], preferences: list[float] | None = None) -> dict:
    n = len(outcomes)
    scores = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes]
    mean = sum(scores) / n
    spread = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(1, n - 1)) if n > 1 else 0.0
    half = 1.96 * spread / math.sqrt(n)
    return {"win_rate": mean, "win_rate_low": max(0.0, mean - half), "win_rate_high": min(1.0, mean + half),
            "wins": outcomes.count("win") / n, "ties": outcomes.count("tie") / n, "losses": outcomes.count("loss") / n,
            "position_disagreement": sum(disagreements) / n, "rows": n,
            **({"mean_preference": sum(preferences) / n} if preferences else {})}


def run(ctx, params: Params) -> None:
    fmt = ctx.dataset["format"]
    rows = ctx.rows()[: params.limit]
    ours_name = ctx.model["name"]
    if fmt == "candidates":
        pairs = answer_pairs(fmt, rows, ours_name, params.against)
    else:
        prompts = examples(fmt, rows)
        answers = {}
        for info in (ctx.model, ctx.models["against"]):
            ctx.set_phase("loading")
            model, tokenizer = evaluation.load_generator(info, log=ctx.log)
            ctx.set_phase("generating")
            answers[info["name"]] = evaluation.generate(model, tokenizer, prompts, params.max_new_tokens,
                                                        batch_size=params.batch_size)
            del model
            ctx.check_cancelled()
        pairs = [(p, a, b) for p, a, b in zip(prompts, answers[ours_name], answers[params.against], strict=True)]
    ctx.set_phase("loading")
    judge, tokenizer = evaluation.load_generator(ctx.models["judge"], log=ctx.log)
    ctx.set_phase("evaluating")
    texts = []
    for prompt, ours, theirs in pairs:
        q = _question(prompt)
        texts += [JUDGE_PROMPT.format(question=q, a=ours, b=theirs), JUDGE_PROMPT.format(question=q, a=theirs, b=ours)]
    probs = []
    for start in range(0, len(texts), params.batch_size * 2):
        probs += choices_of(judge, tokenizer, texts[start:start + params.batch_size * 2], params.batch_size,
                            params.max_length)
        ctx.set_progress(len(probs) // 2, len(pairs))
        ctx.check_cancelled()
    outcomes, disagreements, preferences, scored = [], [], [], []
    for i, (prompt, ours, theirs) in enumerate(pairs):
        first, second = probs[2 * i], probs[2 * i + 1]
        pick = [max(p, key=p.get) for p in (first, second)]
        outcome, disagree = verdict(*pick)
        outcomes.append(outcome)
        disagreements.append(disagree)
        preferences.append(preference(first, second))
        scored.append({"row": i + 1, "prompt": prompt[-1]["content"], "answer": ours, "other_answer": theirs,
                       "outcome": outcome, "preference": preferences[-1], "ours_first": pick[0],
                       "ours_second": pick[1],
                       "probabilities_ours_first": first, "probabilities_ours_second": second})
    found = summary_of(outcomes, disagreements, preferences)
    if fmt == "candidates":  # where people ranked the same answers (the Rank page): does the judge agree?
        found.update(with_people(ctx, rows, ours_name, params.against, outcomes, preferences))
    ctx.log(f"[lab] {ours_name} against {params.against}, judged by {params.judge}: win rate "
            f"{found['win_rate']:.3f} ({found['win_rate_low']:.3f}-{found['win_rate_high']:.3f}), the two orders "
            f"disagree on {found['position_disagreement']:.0%}")
    evaluation.record(ctx, found, scored)


def with_people(ctx, rows: list[dict], ours: str, theirs: str, outcomes: list[str], preferences: list[float]) -> dict:
    """The judge's agreement with the people's verdicts on the same pairs (lab.ranking.agreement_with_people):
    metrics only where someone ranked them."""
    from lab import ranking

    ids = [str(row.get("id", i)) for i, row in enumerate(rows, start=1)]
    pairs = {item: answer_indices(row, ours, theirs) for item, row in zip(ids, rows, strict=True)}
    people = ranking.people_on(ctx.settings, ctx.dataset["name"], pairs)
    if not people:
        return {}
    judged = {item: ({"win": ">", "loss": "<", "tie": "="}[o], p)
              for item, o, p in zip(ids, outcomes, preferences, strict=True)}
    found = ranking.agreement_with_people(judged, people)
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    ctx.log(f"[lab] the judge agrees with the people on {fmt(found['people_agreement'])} of "
            f"{found['people_pairs']} verdicts, Cohen's kappa {fmt(found['people_kappa'])}, Kendall's tau "
            f"{fmt(found['people_kendall'])}, Spearman's rho {fmt(found['people_spearman'])}")
    return {k: v for k, v in found.items() if v is not None}
