"""Rank: work through a candidates dataset (a `generate` job's output) one prompt at a time. The answers are shown
shuffled with their models hidden; the annotator orders them with the keyboard (type the numbers best first, Enter)
or the number buttons, marks best and worst, a tie, or skips; each verdict adds preference pairs to the chosen
dataset and reveals who wrote what (and a reward model's scores, when one is picked). Agreement between annotators
and with the reward model is shown below."""

from __future__ import annotations

import re
import threading

import gradio as gr

from lab import datasets, ranking, registry
from lab.errors import LabError
from lab.formats import MAX_CANDIDATES
from lab.ui.common import UI, user_errors
from lab.ui.html import error_box, md, tag, text

HELP = ("Type the answer numbers **best first** and press **Enter** (`2 1 3`; the last may be left out), or "
        "`b2 w3` for only the best and the worst, `t` for a tie, `s` to skip. The buttons do the same.")
CSS_CARDS = ("display:flex;gap:10px;flex-wrap:wrap")


def candidate_sets(ui: UI) -> list[str]:
    return [d["name"] for d in datasets.list_all(ui.settings) if d["format"] == "candidates"]


def preference_sets(ui: UI) -> list[str]:
    return [d["name"] for d in datasets.list_all(ui.settings) if d["format"] == "preference"]


def reward_models(ui: UI) -> list[str]:
    return [m["name"] for m in registry.list_all(ui.settings) if m["kind"] == "reward"]


_scores: dict[tuple[str, str, str], list[float]] = {}  # (reward model path, dataset fingerprint, item) -> scores
_scorers: dict[str, object] = {}
_lock = threading.Lock()


def scores_for(ui: UI, dataset: str, reward_model: str, wanted: set[str]) -> dict[str, list[float]]:
    """A reward model's scores for the answers of `wanted` items, computed once per model and dataset version."""
    from lab import evaluation

    info = registry.info(ui.settings, reward_model)
    fingerprint = datasets.info(ui.settings, dataset)["fingerprint"]
    with _lock:
        missing = {i for i in wanted if (info["path"], fingerprint, i) not in _scores}
        if missing:
            if info["path"] not in _scorers:
                _scorers.clear()  # one reward model in memory at a time
                _scorers[info["path"]] = evaluation.reward_scorer(info["path"])
            found = ranking.score_items(ui.settings, dataset, reward_model, only=missing,
                                        scorer=_scorers[info["path"]])
            _scores.update({(info["path"], fingerprint, i): s for i, s in found.items()})
        return {i: _scores[(info["path"], fingerprint, i)] for i in wanted}


def parse_entry(entry: str) -> dict:
    """What the annotator typed: an order, best and worst, a tie or a skip."""
    typed = (entry or "").strip().lower()
    if typed in ("t", "tie", "="):
        return {"verdict": "tie"}
    if typed in ("s", "skip"):
        return {"verdict": "skip"}
    found = re.fullmatch(r"b(?:est)?\s*(\d+)[\s,]*w(?:orst)?\s*(\d+)", typed)
    if found:
        return {"verdict": "best_worst", "best": int(found.group(1)), "worst": int(found.group(2))}
    if not typed:
        raise LabError("type the answer numbers best first (e.g. 2 1 3), b2 w3, t for a tie or s to skip")
    return {"verdict": "order", "order": typed}


def item_html(item: dict | None, name: str) -> tuple[str, str]:
    """(prompt, answers) as HTML; the answers side by side, numbered as shown."""
    if item is None:
        return tag("div", text(f"Every item of {name} is judged by this annotator."), cls="ok-box"), ""
    turns = "".join(tag("div", tag("b", text(m["role"]) + ": ") + text(m["content"])) for m in item["prompt"])
    cards = "".join(
        f'<div class="rank-card" style="flex:1 1 260px;border:1px solid var(--border-color-primary);'
        f'border-radius:8px;padding:10px;min-width:220px"><div style="font-weight:700;margin-bottom:6px">'
        f'{a["number"]}</div><div style="white-space:pre-wrap">{text(a["text"])}</div></div>'
        for a in item["answers"])
    return (tag("div", turns, cls="rank-prompt"),
            f'<div id="rank-cards" style="{CSS_CARDS}">{cards}</div>')


def progress_md(ui: UI, found: dict, annotator: str, target: str | None) -> str:
    done = found["annotators"].get(annotator, {}).get("done", 0)
    sets = {d["name"]: d for d in datasets.list_all(ui.settings)}
    pairs = (f" · **{sets[target]['rows']} pairs** in {md(target)}" if target in sets
             and sets[target]["format"] == "preference" else "")
    return (f"**{done} of {found['items']} judged by {md(annotator)}** · {found['ranked_by_anyone']} ranked by "
            f"anyone · {len(found['annotators'])} annotator(s){pairs}")


def agreement_html(ui: UI, name: str, reward_model: str | None) -> str:
    rows = ranking.agreement(ui.settings, name)
    parts = []
    if rows:
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        body = "".join(tag("tr", "".join(tag("td", text(c)) for c in (
            " & ".join(r["annotators"]), r["items"], r["pairs"], fmt(r["agreement"]), fmt(r["kappa"])))) for r in rows)
        head = "".join(tag("th", text(h)) for h in ("annotators", "items both judged", "answer pairs",
                                                   "agreement", "Cohen's kappa"))
        parts.append(tag("table", tag("tr", head) + body))
    else:
        parts.append(text("Agreement appears when two annotators have judged the same item."))
    if reward_model:
        judged = ranking.judged_items(ui.settings, name)
        scores = scores_for(ui, name, reward_model, judged)
        found = ranking.reward_agreement(ui.settings, name, scores)
        parts.append(tag("div", text(ranking.reward_agreement_text(reward_model, found)), cls="rank-reward"))
    return "".join(parts)


def build(ui: UI) -> None:
    gr.Markdown("Rank the answers of a **candidates** dataset (made by a `generate` job on the Train page, or "
                "`lab run generate`). Each verdict adds preference pairs to the dataset below, ready for "
                "`reward` and `dpo`. " + HELP)
    with gr.Row():
        source = gr.Dropdown(label="Candidates", choices=[], value=None, scale=2, elem_id="rank-source")
        annotator = gr.Textbox(label="Annotator", value="", scale=1, elem_id="rank-annotator",
                               placeholder="your name")
        into = gr.Dropdown(label="Pairs go into (pick, or type a new name)", choices=[], value="rankings",
                           allow_custom_value=True, scale=2, elem_id="rank-into")
        pairs = gr.Radio(["all", "best-vs-rest"], value="all", label="Pairs from a ranking", scale=1,
                         elem_id="rank-pairs")
        reward = gr.Dropdown(label="Reward model (optional)", choices=[("none", "")], value="", scale=1,
                             elem_id="rank-reward")
        start = gr.Button("Start", variant="primary", scale=1, elem_id="rank-start")
    status = gr.Markdown(elem_id="rank-progress")
    prompt = gr.HTML(elem_id="rank-prompt")
    answers = gr.HTML(elem_id="rank-answers")
    with gr.Row():
        numbers = [gr.Button(str(n), scale=0, min_width=48, visible=False, elem_id=f"rank-n{n}")
                   for n in range(1, MAX_CANDIDATES + 1)]
    with gr.Row():
        entry = gr.Textbox(label="Best first (Enter records it)", placeholder="2 1 3 · b2 w3 · t · s", scale=3,
                           elem_id="rank-entry")
        submit = gr.Button("Record", variant="primary", scale=1, elem_id="rank-submit")
        tie = gr.Button("Tie", scale=1, elem_id="rank-tie")
        skip = gr.Button("Skip", scale=1, elem_id="rank-skip")
        undo = gr.Button("Clear", scale=1, elem_id="rank-clear")
    result = gr.HTML(elem_id="rank-result")
    with gr.Accordion("Agreement", open=True):
        agreement = gr.HTML(elem_id="rank-agreement")
    with gr.Row():
        to_reward = gr.Button("Train a reward model on the pairs", scale=1, elem_id="rank-to-reward")
        to_dpo = gr.Button("Tune with DPO on the pairs", scale=1, elem_id="rank-to-dpo")
    current = gr.State(None)  # the item on the page: {dataset, item, k}
    ui.c.update(rank_source=source, rank_into=into, rank_reward=reward)

    def show(name: str, who: str, reward_model: str, target: str | None):
        item = ranking.next_item(ui.settings, name, who)
        found = ranking.progress(ui.settings, name)
        p, a = item_html(item, name)
        k = len(item["answers"]) if item else 0
        state = {"dataset": name, "item": item["item"], "k": k} if item else None
        return [progress_md(ui, found, ranking.check_annotator(who), (target or "").strip()), p, a, state,
                agreement_html(ui, name, reward_model or None),
                *[gr.update(visible=n <= k) for n in range(1, MAX_CANDIDATES + 1)]]

    view = [status, prompt, answers, current, agreement, *numbers]

    @user_errors
    def on_start(name, who, reward_model, target):
        if not name:
            raise LabError("pick a candidates dataset first: run a `generate` job to make one")
        return [*show(name, who, reward_model, target), "", ""]

    start.click(on_start, [source, annotator, reward, into], [*view, entry, result])

    def record(how: dict):
        @user_errors
        def handler(state, typed, name, who, target, mode, reward_model):
            if not state or state.get("dataset") != name:
                raise LabError("press Start to load an item first")
            given = parse_entry(typed) if how.get("verdict") is None else how
            try:
                done = ranking.submit(ui.settings, name, state["item"], who, into=target, pairs=mode, **given)
            except LabError as exc:
                return [gr.update() for _ in view] + [gr.update(), error_box(str(exc))]
            models = done["models"]
            scores = None
            if reward_model:
                scores = scores_for(ui, name, reward_model, {done["item"]})[done["item"]]
                order = ranking.shown_order(datasets.info(ui.settings, name)["fingerprint"], done["item"],
                                            done["annotator"], len(models))
                scores = [scores[i] for i in order]
            cells = []
            for n, model in enumerate(models, 1):
                if done["verdict"] == "best_worst":
                    rank = dict(zip(done["ranking"], (" · your best", " · your worst"), strict=True)).get(n, "")
                else:
                    rank = f" · your #{done['ranking'].index(n) + 1}" if n in done["ranking"] else ""
                score = f" · reward {scores[n - 1]:.3f}" if scores is not None else ""
                cells.append(tag("li", text(f"answer {n}: {model or '(unknown model)'}{rank}{score}")))
            added = (f"{done['added']} pair(s) added to {done['into']} (now {done['pairs']})" if done["added"]
                     else "no pair added")
            summary = tag("div", text(f"Item {done['item']}: {done['verdict'].replace('_', ' and ')} recorded; "
                                      f"{added}.") + tag("ul", "".join(cells)), cls="ok-box")
            return [*show(name, who, reward_model, target), "", summary]
        return handler

    inputs = [current, entry, source, annotator, into, pairs, reward]
    outputs = [*view, entry, result]
    entry.submit(record({}), inputs, outputs)
    submit.click(record({}), inputs, outputs)
    tie.click(record({"verdict": "tie"}), inputs, outputs)
    skip.click(record({"verdict": "skip"}), inputs, outputs)
    # in the browser, without a round trip: quick clicks append in the order they were made
    undo.click(None, [], [entry], js="() => ''")
    for n, button in enumerate(numbers, 1):
        button.click(None, [entry], [entry], js=f"(t) => ((t || '').trim() + ' {n}').trim()")

    def go_train(plugin: str):
        @user_errors
        def handler(page, v: dict) -> dict:
            if v["rank_into"] not in preference_sets(ui):
                raise LabError("rank some answers first: the preference dataset does not exist yet")
            rows = ranking.items(ui.settings, v["rank_source"]) if v.get("rank_source") else []
            first = next((c.get("model") for _, r in rows[:1] for c in r["candidates"]), None)
            return page.open_with(plugin, v["rank_into"], first)
        return handler

    for button, plugin in ((to_reward, "reward"), (to_dpo, "dpo")):
        ui.train.on(button.click, go_train(plugin), ["rank_into", "rank_source"],
                    ["tabs", "plugin", "dataset", "model"]).success(*ui.train.after_plugin())
    ui.on_refresh(lambda _: refresh(ui), [ui[n] for n in ("rank_source", "rank_into", "rank_reward")])



def refresh(ui: UI) -> dict:
    return {ui["rank_source"]: gr.update(choices=candidate_sets(ui)),
            ui["rank_into"]: gr.update(choices=preference_sets(ui)),
            ui["rank_reward"]: gr.update(choices=[("none", "")] + [(m, m) for m in reward_models(ui)])}
