"""People ranking the answers of a candidates dataset: the next item for an annotator (answers shuffled, models
hidden), verdicts stored one per item and annotator (the `rankings` table), preference pairs made from them,
agreement between annotators, and how often a reward model agrees with the people.

A verdict is one of:
    order       every answer, best first                     pairs: all ordered pairs, or best against each other
    best_worst  the best and the worst answer                pairs: best > each other, each other > worst (all), or
                                                                    best > each other (best-vs-rest)
    tie         all equally good                             no pair
    skip        not judged (unclear, unsafe, ...)            no pair; left out of the agreement figures
Answers are shown in an order fixed per item and annotator (a seeded shuffle), so `next` and `submit` agree on
what "answer 2" is without storing anything between them.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from itertools import combinations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from lab import datasets, formats
from lab.db import read_session, session
from lab.errors import LabError
from lab.settings import Settings
from lab.tables import Ranking

VERDICTS = ("order", "best_worst", "tie", "skip")
PAIR_MODES = ("all", "best-vs-rest")
MAX_ANNOTATOR = 64


def _candidates(settings: Settings, name: str):
    found = datasets.get(settings, name)
    if found.format != "candidates":
        raise LabError(f"{name} is a {found.format} dataset, not candidates",
                       "rank the output of a `generate` job (candidates-<job id>), or import prompt/candidates rows")
    return found


def items(settings: Settings, name: str) -> list[tuple[str, dict]]:
    """(item id, row) for every row of candidates dataset `name`, in stored order."""
    found = _candidates(settings, name)
    return [(str(row.get("id", i)), row) for i, row in enumerate(datasets.iter_rows(found.path), start=1)]


def check_annotator(annotator: str) -> str:
    name = (annotator or "").strip()
    if not name:
        raise LabError("give an annotator name: rankings are kept per person")
    if len(name) > MAX_ANNOTATOR or any(not ch.isprintable() for ch in name):
        raise LabError(f"an annotator name is up to {MAX_ANNOTATOR} printable characters")
    return name


def shown_order(fingerprint: str, item: str, annotator: str, k: int) -> list[int]:
    """The stored indices of an item's answers in the order this annotator sees them."""
    order = list(range(k))
    seed = int.from_bytes(hashlib.sha256(f"{fingerprint}\0{item}\0{annotator}".encode()).digest()[:8], "big")
    random.Random(seed).shuffle(order)
    return order


def _verdicts(settings: Settings, dataset_id: int, annotator: str | None = None) -> list[Ranking]:
    with read_session(settings) as s:
        query = select(Ranking).where(Ranking.dataset_id == dataset_id).order_by(Ranking.id)
        if annotator is not None:
            query = query.where(Ranking.annotator == annotator)
        return list(s.scalars(query))


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def progress(settings: Settings, name: str, annotator: str | None = None) -> dict:
    """How far the ranking is: items, items ranked by anyone, and per annotator (ranked, skipped)."""
    found = _candidates(settings, name)
    done = _verdicts(settings, found.id)
    per: dict[str, Counter] = {}
    for v in done:
        per.setdefault(v.annotator, Counter())[v.verdict] += 1
    ranked = {v.item for v in done if v.verdict != "skip"}
    out = {"dataset": name, "items": found.rows, "ranked_by_anyone": len(ranked),
           "annotators": {a: {"done": sum(c.values()), "skipped": c["skip"]} for a, c in sorted(per.items())}}
    if annotator is not None:
        out["done"] = out["annotators"].get(annotator, {}).get("done", 0)
    return out


def next_item(settings: Settings, name: str, annotator: str) -> dict | None:
    """The first item this annotator has not judged: its id, prompt and answers in the order shown (numbered from
    1, models hidden), with the annotator's progress; None when every item is done."""
    annotator = check_annotator(annotator)
    found = _candidates(settings, name)
    seen = {v.item for v in _verdicts(settings, found.id, annotator)}
    for position, (item, row) in enumerate(items(settings, name)):
        if item in seen:
            continue
        order = shown_order(found.fingerprint, item, annotator, len(row["candidates"]))
        return {"dataset": name, "item": item, "position": position, "prompt": formats.prompt_of("candidates", row),
                "answers": [{"number": n, "text": row["candidates"][i]["text"]} for n, i in enumerate(order, 1)],
                "done": len(seen), "total": found.rows}
    return None


def parse_numbers(text: str | list | None, k: int, what: str) -> list[int]:
    """Answer numbers as shown (1..k) from '2,1,3', '2 1 3', '213' (k < 10) or a list, as 0-based positions."""
    if text is None or text == "" or text == []:
        return []
    if isinstance(text, list):
        parts = [str(x) for x in text]
    else:
        cleaned = text.replace(",", " ").replace(">", " ").split()
        parts = list(cleaned[0]) if len(cleaned) == 1 and cleaned[0].isdigit() and k < 10 and len(cleaned[0]) > 1 \
            else cleaned
    numbers = []
    for p in parts:
        if not str(p).strip().isdigit() or not 1 <= int(p) <= k:
            raise LabError(f"{what}: {p!r} is not an answer number (1 to {k})")
        numbers.append(int(p) - 1)
    if len(set(numbers)) != len(numbers):
        raise LabError(f"{what}: an answer is named twice")
    return numbers


def pairs_for(verdict: str, ranking: list[int], k: int, mode: str) -> list[tuple[int, int]]:
    """(chosen, rejected) stored indices for a verdict (see the module's table)."""
    if verdict == "order":
        if mode == "best-vs-rest":
            return [(ranking[0], r) for r in ranking[1:]]
        return [(ranking[a], ranking[b]) for a, b in combinations(range(len(ranking)), 2)]
    if verdict == "best_worst":
        best, worst = ranking
        middle = [i for i in range(k) if i not in (best, worst)]
        out = [(best, i) for i in middle] + [(best, worst)]
        return out if mode == "best-vs-rest" else out + [(i, worst) for i in middle]
    return []


def submit(settings: Settings, name: str, item: str, annotator: str, *, verdict: str = "order",
           order: str | list | None = None, best: int | None = None, worst: int | None = None,
           into: str | None = None, pairs: str = "all") -> dict:
    """Record one annotator's verdict on one item (answer numbers as `next_item` showed them, from 1) and append
    its preference pairs to dataset `into` (created when new). All or nothing: a bad verdict stores nothing."""
    annotator = check_annotator(annotator)
    if verdict not in VERDICTS:
        raise LabError(f"unknown verdict {verdict!r}", f"one of {', '.join(VERDICTS)}")
    if pairs not in PAIR_MODES:
        raise LabError(f"unknown pairs mode {pairs!r}", f"one of {', '.join(PAIR_MODES)}")
    found = _candidates(settings, name)
    rows = dict(items(settings, name))
    if str(item) not in rows:
        raise LabError(f"{name} has no item {item!r}", f"`lab rank next {name} --annotator {annotator}` gives one")
    item = str(item)
    row = rows[item]
    k = len(row["candidates"])
    shown = shown_order(found.fingerprint, item, annotator, k)
    if verdict == "order":
        positions = parse_numbers(order, k, "order")
        if len(positions) == k - 1:  # the last one is implied
            positions.append(next(p for p in range(k) if p not in positions))
        if len(positions) != k:
            raise LabError(f"order: give all {k} answers best first (or {k - 1}: the last is implied), got "
                           f"{len(positions)}", "or mark only the best and the worst, a tie, or skip")
    elif verdict == "best_worst":
        if best is None or worst is None:
            raise LabError("best_worst needs both the best and the worst answer")
        positions = parse_numbers([best, worst], k, "best/worst")
    else:
        positions = []
    ranking = [shown[p] for p in positions]
    chosen_rejected = pairs_for(verdict, ranking, k, pairs)
    texts = [c["text"] for c in row["candidates"]]
    new_rows = [pair_row(row["prompt"], texts[c], texts[r], row["candidates"][c].get("model") or "",
                         row["candidates"][r].get("model") or "", annotator=annotator, item=item, candidates=name)
                for c, r in chosen_rejected if texts[c].strip() != texts[r].strip()]
    identical = len(chosen_rejected) - len(new_rows)
    target = (into or "").strip() or None
    existing: dict[str, dict] = {}
    if new_rows and target is None:
        raise LabError("name the preference dataset the pairs go into (--into)")
    if target is not None:
        existing = {d["name"]: d for d in datasets.list_all(settings)}
        if target in existing and existing[target]["format"] != "preference":
            raise LabError(f"{target} is a {existing[target]['format']} dataset: pairs go into a preference dataset")
    with read_session(settings) as s:
        if s.scalar(select(Ranking.id).where(Ranking.dataset_id == found.id, Ranking.item == item,
                                             Ranking.annotator == annotator)) is not None:
            raise LabError(f"{annotator} has already judged item {item} of {name}",
                           f"`lab rank next {name} --annotator {annotator}` gives the next one")
    record = Ranking(dataset_id=found.id, item=item, annotator=annotator, verdict=verdict, ranking=ranking,
                     shown=shown, into_dataset=target, pairs_mode=pairs, pairs_added=len(new_rows))
    try:
        with session(settings) as s:  # the verdict and its pairs in one transaction
            s.add(record)
            s.flush()  # a verdict given twice at once fails here, before any pair is written
            if new_rows:
                add_pairs(settings, target, new_rows, f"rankings of {name}", db=s)
    except IntegrityError:
        raise LabError(f"{annotator} has already judged item {item} of {name}") from None
    total = datasets.info(settings, target)["rows"] if target and (new_rows or target in existing) else None
    return {"dataset": name, "item": item, "annotator": annotator, "verdict": verdict, "added": len(new_rows),
            "identical_skipped": identical, "into": target, "pairs": total,
            "models": [row["candidates"][i].get("model") or "" for i in shown],
            "ranking": [shown.index(i) + 1 for i in ranking]}


def pair_row(prompt: str | list[dict], chosen: str, rejected: str, chosen_model: str, rejected_model: str,
             system: str = "", **provenance) -> dict:
    """One preference pair as every ranking stores it (the Rank page and the Playground alike): a conversational
    prompt (the system message first when there is one), one assistant message each for chosen and rejected, the
    models that wrote them, then where the verdict came from (annotator, item, ...)."""
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "chosen_model": chosen_model,
            "rejected_model": rejected_model, **provenance}


def _plain(row: dict) -> dict:
    """A pair in the shape of a preference dataset made before rankings were conversational (plain text prompt and
    answers): appended to such a dataset, new pairs keep its one shape."""
    user = [m["content"] for m in row["prompt"] if m["role"] == "user"]
    return {**row, "prompt": user[-1] if user else "", "chosen": row["chosen"][-1]["content"],
            "rejected": row["rejected"][-1]["content"]}


def add_pairs(settings: Settings, into: str, rows: list[dict], source: str, db=None) -> dict:
    """Append preference pairs (`pair_row`) to dataset `into`, or create it with them: the one way rankings store
    pairs. With `db`, inside the caller's open session (a verdict and its pairs commit together)."""
    found = {d["name"]: d for d in datasets.list_all(settings)}
    if into not in found:
        return datasets.add_rows(settings, into, rows, "preference", source=source, db=db)
    if found[into]["format"] != "preference":
        raise LabError(f"{into} is a {found[into]['format']} dataset: pairs go into a preference dataset")
    first = next(iter(datasets.preview(settings, into, 1)), None)
    if first is not None and isinstance(first.get("prompt"), str):
        rows = [_plain(r) for r in rows]
    return datasets.append_rows(settings, into, rows, db=db)


# --- agreement ------------------------------------------------------------------------------------------------


def relations(verdict: str, ranking: list[int], k: int) -> dict[tuple[int, int], str]:
    """For each pair i < j of stored indices that the verdict decides: '>' (i better), '<' or '='."""
    out = {}
    if verdict == "tie":
        return {(i, j): "=" for i, j in combinations(range(k), 2)}
    better = set(pairs_for(verdict, ranking, k, "all"))
    for i, j in combinations(range(k), 2):
        if (i, j) in better:
            out[(i, j)] = ">"
        elif (j, i) in better:
            out[(i, j)] = "<"
    return out


def kappa(labels_a: list[str], labels_b: list[str]) -> float | None:
    """Cohen's kappa of two annotators' labels on the same things; None when chance agreement is certain."""
    n = len(labels_a)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(labels_a, labels_b, strict=True)) / n
    ca, cb = Counter(labels_a), Counter(labels_b)
    expected = sum(ca[c] * cb[c] for c in set(ca) | set(cb)) / (n * n)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def agreement(settings: Settings, name: str) -> list[dict]:
    """Per pair of annotators: the items both judged (skips left out), the answer pairs both decided, the share on
    which they agree, and Cohen's kappa over those pairs (labels better / worse / tie)."""
    found = _candidates(settings, name)
    sizes = {item: len(row["candidates"]) for item, row in items(settings, name)}
    by: dict[str, dict[str, dict]] = {}
    for v in _verdicts(settings, found.id):
        if v.verdict != "skip" and v.item in sizes:
            by.setdefault(v.annotator, {})[v.item] = relations(v.verdict, v.ranking, sizes[v.item])
    out = []
    for a, b in combinations(sorted(by), 2):
        shared = sorted(set(by[a]) & set(by[b]))
        la, lb = [], []
        for item in shared:
            for pair in sorted(set(by[a][item]) & set(by[b][item])):
                la.append(by[a][item][pair])
                lb.append(by[b][item][pair])
        agree = sum(x == y for x, y in zip(la, lb, strict=True))
        out.append({"annotators": [a, b], "items": len(shared), "pairs": len(la),
                    "agreement": agree / len(la) if la else None, "kappa": kappa(la, lb)})
    return out


def reward_agreement(settings: Settings, name: str, scores: dict[str, list[float]],
                     annotator: str | None = None) -> dict:
    """How a reward model's scores (per item, one per stored answer) agree with the people's verdicts (ties and
    skips left out): the share of ranked answer pairs it orders the same way (a score tie counts half); Cohen's
    kappa over those pairs (each pair's label: the first answer better, worse, or for the model also equal); and,
    per verdict, Kendall's tau and Spearman's rho between the answers' standing in it (wins minus losses) and their
    scores, averaged over the verdicts where both are defined."""
    from lab import significance

    found = _candidates(settings, name)
    agree = total = 0.0
    people, model, taus, rhos = [], [], [], []
    for v in _verdicts(settings, found.id, annotator):
        if v.item not in scores or v.verdict in ("tie", "skip"):
            continue
        s = scores[v.item]
        standing = [0] * len(s)
        for c, r in pairs_for(v.verdict, v.ranking, len(s), "all"):
            total += 1
            agree += 1.0 if s[c] > s[r] else 0.5 if s[c] == s[r] else 0.0
            standing[c] += 1
            standing[r] -= 1
        decided = relations(v.verdict, v.ranking, len(s))
        for (i, j), label in decided.items():
            people.append(label)
            model.append(">" if s[i] > s[j] else "<" if s[i] < s[j] else "=")
        placed = sorted({i for pair in decided for i in pair})
        tau = significance.kendall_tau([standing[i] for i in placed], [s[i] for i in placed])
        rho = significance.spearman([standing[i] for i in placed], [s[i] for i in placed])
        taus += [tau] if tau is not None else []
        rhos += [rho] if rho is not None else []
    return {"pairs": int(total), "agreement": agree / total if total else None,
            "kappa": kappa(people, model) if people else None,
            "kendall": sum(taus) / len(taus) if taus else None,
            "spearman": sum(rhos) / len(rhos) if rhos else None, "rankings": len(taus)}


def people_on(settings: Settings, name: str, pairs: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """Every person's label for one pair of stored answers (i, j) per item: '>' (i better), '<', or '=' (a tie
    verdict); skips, and verdicts that leave the pair undecided (best and worst only), are left out."""
    found = _candidates(settings, name)
    sizes = {item: len(row["candidates"]) for item, row in items(settings, name)}
    out: dict[str, list[str]] = {}
    for v in _verdicts(settings, found.id):
        if v.verdict == "skip" or v.item not in pairs or v.item not in sizes:
            continue
        i, j = pairs[v.item]
        label = relations(v.verdict, v.ranking, sizes[v.item]).get((min(i, j), max(i, j)))
        if label is not None:
            out.setdefault(v.item, []).append(label if i < j else {">": "<", "<": ">", "=": "="}[label])
    return out


def agreement_with_people(judged: dict[str, tuple[str, float]], people: dict[str, list[str]]) -> dict:
    """How a judge agrees with the people on the same pairs of answers. judged: {item: (its label '>', '<' or '=',
    its preference for the first answer in 0-1)}; people: {item: their labels} (people_on). Over every (item,
    person): the share of the same label, Cohen's kappa, and Kendall's tau and Spearman's rho between the judge's
    preference and the person's (1 better, 0.5 tie, 0 worse); None where undefined."""
    from lab import significance

    theirs, ours, soft, hard = [], [], [], []
    for item, labels in people.items():
        if item in judged:
            for label in labels:
                theirs.append(label)
                ours.append(judged[item][0])
                soft.append(judged[item][1])
                hard.append({">": 1.0, "=": 0.5, "<": 0.0}[label])
    n = len(theirs)
    return {"people_pairs": n,
            "people_agreement": sum(a == b for a, b in zip(ours, theirs, strict=True)) / n if n else None,
            "people_kappa": kappa(theirs, ours) if n else None,
            "people_kendall": significance.kendall_tau(soft, hard) if n > 1 else None,
            "people_spearman": significance.spearman(soft, hard) if n > 1 else None}


def reward_agreement_text(name: str, found: dict) -> str:
    """One sentence of reward_agreement's figures (the Rank page and `lab rank status` say the same)."""
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"{name} agrees with the people on {fmt(found['agreement'])} of {found['pairs']} ranked answer pairs "
            f"(a score tie counts half), Cohen's kappa {fmt(found['kappa'])}; per ranking, Kendall's tau "
            f"{fmt(found['kendall'])} and Spearman's rho {fmt(found['spearman'])} (mean of {found['rankings']}).")


def score_items(settings: Settings, name: str, reward_model: str, only: set[str] | None = None,
                scorer=None) -> dict[str, list[float]]:
    """A reward model's score for every answer of the items in `only` (all when None)."""
    from lab import evaluation, registry

    info = registry.info(settings, reward_model)
    if info["kind"] != "reward":
        raise LabError(f"{reward_model} is a {info['kind']} model, not a reward model")
    score = scorer or evaluation.reward_scorer(info["path"])
    out = {}
    for item, row in items(settings, name):
        if only is not None and item not in only:
            continue
        prompt = formats.prompt_of("candidates", row)
        out[item] = score([prompt] * len(row["candidates"]), [c["text"] for c in row["candidates"]])
    return out


def judged_items(settings: Settings, name: str) -> set[str]:
    found = _candidates(settings, name)
    return {v.item for v in _verdicts(settings, found.id) if v.verdict not in ("skip",)}


def prompt_preview(row: dict, width: int = 80) -> str:
    text = _prompt_text(row["prompt"])
    return text if len(text) <= width else text[: width - 1] + "…"
