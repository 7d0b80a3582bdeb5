"""The RLHF loop at full size: sampling as a job (a candidates dataset), people ranking the answers through the API
and the command line, the pairs they make, agreement between annotators and with a reward model, and a reward
model trained on the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import lab_cli, stop_worker_mid_job, write_jsonl
from test_stages import run_job

from lab import datasets, jobstore, ranking, registry, runs
from lab.errors import LabError

PROMPTS = [{"prompt": f"Question number {i}: what comes next?", "completion": "ok"} for i in range(10)]


@pytest.fixture
def lab(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    registry.add_folder(ws, "tiny-b", tiny_model_dir)
    datasets.add(ws, "questions", write_jsonl(tmp_path / "questions.jsonl", PROMPTS))
    return ws


def candidates_rows(k: int = 3, n: int = 5) -> list[dict]:
    return [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"Prompt {i}?"}],
             "candidates": [{"text": f"answer {chr(97 + j)} to {i}", "model": f"m{j % 2}"} for j in range(k)]}
            for i in range(n)]


@pytest.fixture
def cands(ws, tmp_path):
    datasets.add(ws, "cands", write_jsonl(tmp_path / "cands.jsonl", candidates_rows()))
    return ws


def shown_numbers(s, name: str, annotator: str, texts: list[str]) -> str:
    """The numbers the annotator sees for answers given by their text, best first."""
    item = ranking.next_item(s, name, annotator)
    where = {a["text"]: a["number"] for a in item["answers"]}
    return ",".join(str(where[t]) for t in texts)


def test_generate_samples_k_answers_per_prompt_with_their_settings(lab, jobs_worker):
    job = run_job(lab, "generate", "tiny", "questions", num_samples=3, max_new_tokens=6, temperature=1.0, seed=7,
                  batch_size=4)
    name = job["output_dataset"]
    assert name == f"candidates-{job['id']}" and job["output_model"] is None
    info = datasets.info(lab, name)
    assert info["format"] == "candidates" and info["rows"] == 10 and info["job_id"] == job["id"]
    assert "generate job" in info["source"] and "tiny" in info["source"] and "questions" in info["source"]
    rows = datasets.preview(lab, name, 10)
    answers = [c for r in rows for c in r["candidates"]]
    assert len(answers) == 30
    assert [r["prompt"][-1]["content"] for r in rows] == [p["prompt"] for p in PROMPTS]
    for c in answers:
        assert c["model"] == "tiny" and c["temperature"] == 1.0 and c["top_p"] == 0.95 and c["max_new_tokens"] == 6
        assert 1 <= c["tokens"] <= 6 and c["finish"] in ("stop", "length") and c["seconds"] >= 0
    assert sorted({c["seed"] for c in answers}) == [7, 8, 9]
    assert len({c["text"] for c in answers}) > 3, "sampling at temperature 1 gives different answers"
    metrics = runs.metrics(lab, [job["id"]])[job["id"]]
    assert metrics["generate/answers"][0][1] == 30 and metrics["generate/answers_per_s"][0][1] > 0
    again = run_job(lab, "generate", "tiny", "questions", num_samples=3, max_new_tokens=6, temperature=1.0, seed=7,
                    batch_size=4)
    texts = lambda found: [[c["text"] for c in r["candidates"]] for r in found]  # noqa: E731
    assert texts(datasets.preview(lab, again["output_dataset"], 10)) == texts(rows), "the same seed, the same answers"


def test_generate_from_several_models_gives_k_answers_from_each(lab, jobs_worker):
    job = run_job(lab, "generate", "tiny", "questions", num_samples=2, also_models="tiny-b", max_new_tokens=4,
                  limit=3)
    rows = datasets.preview(lab, job["output_dataset"], 10)
    assert len(rows) == 3
    assert all([c["model"] for c in r["candidates"]] == ["tiny", "tiny", "tiny-b", "tiny-b"] for r in rows)
    # the same weights under two names, the same seeds and batches: the same answers
    assert all(r["candidates"][0]["text"] == r["candidates"][2]["text"] for r in rows)


@pytest.mark.parametrize(("params", "message"), [
    ({"num_samples": 1}, r"1 answer\(s\) per prompt"),
    ({"num_samples": 9, "also_models": "tiny-b"}, r"18 answer\(s\) per prompt"),
    ({"also_models": "nope"}, "no model named 'nope'"),
    ({"also_models": "tiny"}, "already the job's model"),
    ({"temperature": 0, "num_samples": 3}, "gives the same answer every time"),
])
def test_generate_refuses_bad_settings_and_queues_nothing(lab, params, message):
    with pytest.raises(LabError, match=message):
        runs.submit(lab, "generate", model="tiny", dataset="questions", params={k: str(v) for k, v in params.items()})
    assert runs.list_jobs(lab) == []


def test_a_stopped_generate_job_keeps_its_finished_batches(lab, jobs_worker):
    job_id = runs.submit(lab, "generate", model="tiny", dataset="questions",
                         params={"num_samples": "2", "max_new_tokens": "64", "batch_size": "1",
                                 "temperature": "1.0"})
    stop_worker_mid_job(lab, job_id, 3, "three batches")
    assert jobstore.get(lab, job_id).status == "queued"
    kept = Path(runs.get_job(lab, job_id)["run_dir"]) / "checkpoints" / "answers.jsonl"
    before = [json.loads(line) for line in kept.read_text().splitlines() if line.strip()]
    assert len(before) >= 3
    jobs_worker(lab).serve(once=True)
    job = runs.get_job(lab, job_id)
    assert job["status"] == "completed", job["log_tail"]
    log = (Path(job["run_dir"]) / "log.txt").read_text()
    assert f"{len(before)} batch(es) answered by an earlier attempt are kept" in log
    rows = datasets.preview(lab, job["output_dataset"], 10)
    for entry in before:  # the kept answers are the ones in the dataset
        assert [c["text"] for c in rows[entry["start"]]["candidates"]] == [a["text"] for a in entry["answers"][0]]


@pytest.mark.parametrize(("verdict", "mode", "per_item"), [
    ({"verdict": "order", "order": "1,2,3"}, "all", 3),
    ({"verdict": "order", "order": "2 3"}, "all", 3),  # the last one implied
    ({"verdict": "order", "order": "312"}, "best-vs-rest", 2),
    ({"verdict": "best_worst", "best": 1, "worst": 3}, "all", 3),
    ({"verdict": "best_worst", "best": 2, "worst": 1}, "best-vs-rest", 2),
    ({"verdict": "tie"}, "all", 0),
    ({"verdict": "skip"}, "all", 0),
])
def test_ranking_five_prompts_gives_the_expected_pairs(cands, verdict, mode, per_item):
    for n in range(5):
        item = ranking.next_item(cands, "cands", "ann")
        assert item["done"] == n and item["total"] == 5 and len(item["answers"]) == 3
        assert "model" not in json.dumps(item["answers"]), "models stay hidden until the vote"
        done = ranking.submit(cands, "cands", item["item"], "ann", into="prefs", pairs=mode, **verdict)
        assert done["added"] == per_item
    assert ranking.next_item(cands, "cands", "ann") is None
    if per_item:
        rows = datasets.preview(cands, "prefs", 100)
        assert len(rows) == 5 * per_item
        assert {r["annotator"] for r in rows} == {"ann"} and {r["item"] for r in rows} == {f"q{i}" for i in range(5)}
        assert {r["chosen_model"] for r in rows} <= {"m0", "m1"} and all(r["candidates"] == "cands" for r in rows)
    else:
        assert "prefs" not in [d["name"] for d in datasets.list_all(cands)]
    assert ranking.progress(cands, "cands")["annotators"]["ann"]["done"] == 5


def test_the_order_maps_shown_numbers_to_the_right_answers(cands):
    rows = candidates_rows()
    texts = [c["text"] for c in rows[0]["candidates"]]  # a, b, c as stored
    order = shown_numbers(cands, "cands", "ann", [texts[2], texts[0], texts[1]])
    done = ranking.submit(cands, "cands", "q0", "ann", order=order, into="prefs")
    pairs = {(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in datasets.preview(cands, "prefs", 10)}
    assert pairs == {(texts[2], texts[0]), (texts[2], texts[1]), (texts[0], texts[1])}
    assert done["ranking"] == [int(n) for n in order.split(",")]
    assert sorted(done["models"]) == ["m0", "m0", "m1"], "the models are revealed after the vote"
    other = ranking.next_item(cands, "cands", "bob")
    assert other["item"] == "q0", "each annotator has their own progress"


def test_agreement_between_two_annotators_is_computed_as_by_hand(cands):
    rows = {r["id"]: [c["text"] for c in r["candidates"]] for r in candidates_rows()}

    def order(who: str, item: str, letters: str) -> None:
        texts = rows[item]
        while ranking.next_item(cands, "cands", who)["item"] != item:  # skip to the item (skips count nowhere)
            ranking.submit(cands, "cands", ranking.next_item(cands, "cands", who)["item"], who, verdict="skip")
        if letters == "=":
            ranking.submit(cands, "cands", item, who, verdict="tie")
            return
        shown = shown_numbers(cands, "cands", who, [texts["abc".index(x)] for x in letters])
        ranking.submit(cands, "cands", item, who, order=shown, into="prefs")

    order("ann", "q0", "abc")
    order("bob", "q0", "acb")
    order("ann", "q1", "=")
    order("bob", "q1", "bac")
    order("ann", "q2", "cba")
    order("bob", "q2", "cba")
    order("bob", "q3", "abc")  # only bob: not shared
    # pairs (a,b), (a,c), (b,c) per item; ann: > > > | = = = | < < <; bob: > > < | < > > | < < <
    # agreement 5 of 9; chance: ann (3 >, 3 =, 3 <), bob (4 >, 5 <): (3*4 + 3*5) / 81 = 1/3; kappa (5/9-1/3)/(2/3)
    found, = ranking.agreement(cands, "cands")
    assert found["annotators"] == ["ann", "bob"] and found["items"] == 3 and found["pairs"] == 9
    assert found["agreement"] == pytest.approx(5 / 9)
    assert found["kappa"] == pytest.approx(1 / 3)
    # a reward model that scores a > b > c everywhere agrees on (strict verdicts only; ann's tie has no pair):
    # ann q0 3/3, q2 0/3; bob q0 2/3 (c > b wrong), q1 2/3 (b > a wrong), q2 0/3, q3 3/3
    scores = {f"q{i}": [3.0, 2.0, 1.0] for i in range(5)}
    agree = ranking.reward_agreement(cands, "cands", scores)
    assert agree["pairs"] == 18 and agree["agreement"] == pytest.approx(10 / 18)
    # each verdict's standing (wins minus losses) against the scores, by scipy; kappa over the pairs' labels: people
    # ann > > > | < < <, bob > > < | < > > | < < < | > > >; the model > > > everywhere
    from scipy.stats import kendalltau, spearmanr

    orders = ["abc", "acb", "bac", "cba", "cba", "abc"]  # ann q0, bob q0, bob q1, ann q2, bob q2, bob q3
    standing = [[2 - 2 * o.index(x) for x in "abc"] for o in orders]
    assert agree["kendall"] == pytest.approx(np.mean([kendalltau(s, [3, 2, 1]).statistic for s in standing]))
    assert agree["spearman"] == pytest.approx(np.mean([spearmanr(s, [3, 2, 1]).statistic for s in standing]))
    assert agree["rankings"] == 6
    people = list(">>>") + list(">><") + list("<>>") + list("<<<") * 2 + list(">>>")
    observed, expected = people.count(">") / 18, people.count(">") / 18  # the model says > on every pair
    assert agree["kappa"] == pytest.approx((observed - expected) / (1 - expected))  # 0: no better than chance
    assert ranking.reward_agreement(cands, "cands", scores, annotator="ann") == {
        "pairs": 6, "agreement": 0.5, "kappa": 0.0, "kendall": 0.0, "spearman": 0.0, "rankings": 2}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"item": "nope", "order": "1,2,3"}, "has no item 'nope'"),
    ({"order": "1,1,2"}, "named twice"),
    ({"order": "1,2,4"}, "'4' is not an answer number"),
    ({"order": "1"}, "give all 3 answers"),
    ({"order": "<b>1</b>"}, "is not an answer number"),
    ({"verdict": "best_worst", "best": 1}, "needs both"),
    ({"verdict": "best_worst", "best": 2, "worst": 2}, "named twice"),
    ({"verdict": "maybe"}, "unknown verdict"),
    ({"order": "1,2,3", "pairs": "some"}, "unknown pairs mode"),
    ({"order": "1,2,3", "annotator": "  "}, "give an annotator name"),
    ({"order": "1,2,3", "annotator": "x" * 65}, "up to 64"),
    ({"order": "1,2,3", "into": ""}, "name the preference dataset"),
    ({"order": "1,2,3", "into": "cands"}, "is a candidates dataset: pairs go into a preference dataset"),
])
def test_a_bad_verdict_stores_nothing(cands, kwargs, message):
    args = {"item": "q0", "annotator": "ann", "into": "prefs", **kwargs}
    with pytest.raises(LabError, match=message):
        ranking.submit(cands, "cands", args.pop("item"), args.pop("annotator"), **args)
    assert ranking.progress(cands, "cands")["annotators"] == {}
    assert "prefs" not in [d["name"] for d in datasets.list_all(cands)]


def test_a_verdict_is_given_once_per_annotator_and_item(cands):
    ranking.submit(cands, "cands", "q0", "ann", order="1,2,3", into="prefs")
    with pytest.raises(LabError, match="already judged item q0"):
        ranking.submit(cands, "cands", "q0", "ann", order="3,2,1", into="prefs")
    assert datasets.info(cands, "prefs")["rows"] == 3


def test_only_candidates_datasets_are_ranked_and_their_ids_are_unique(cands, tmp_path):
    with pytest.raises(LabError, match="not candidates"):
        ranking.next_item(cands, "prefs-none" if False else _preference(cands, tmp_path), "ann")
    rows = candidates_rows()
    rows[1]["id"] = "q0"
    with pytest.raises(LabError) as caught:
        datasets.add(cands, "dup", write_jsonl(tmp_path / "dup.jsonl", rows))
    assert "`id` 'q0' is already used (line 1)" in "\n".join(caught.value.problems)
    one = [{"prompt": "Hi?", "candidates": [{"text": "only one"}]}]
    with pytest.raises(LabError) as caught:
        datasets.add(cands, "one", write_jsonl(tmp_path / "one.jsonl", one))
    assert "list of 2 to 16 answers, got 1 of them" in "\n".join(caught.value.problems)


def _preference(s, tmp_path) -> str:
    datasets.add(s, "pairs", write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    return "pairs"


def test_the_command_line_ranks_like_the_api(cands):
    found = json.loads(lab_cli("rank", "next", "cands", "--annotator", "cli", "--json", check=True).stdout)
    assert found["item"] == "q0" and [a["number"] for a in found["answers"]] == [1, 2, 3]
    done = lab_cli("rank", "submit", "cands", "q0", "--annotator", "cli", "--order", "2,1,3", "--into", "prefs",
                   "--pairs", "best-vs-rest", check=True)
    assert "2 pair(s) added to prefs" in done.stdout
    bad = lab_cli("rank", "submit", "cands", "q1", "--annotator", "cli", "--order", "1,2,3", "--tie")
    assert bad.returncode == 2 and "give one verdict" in bad.stderr and "Traceback" not in bad.stderr
    status = json.loads(lab_cli("rank", "status", "cands", "--json", check=True).stdout)
    assert status["annotators"] == {"cli": {"done": 1, "skipped": 0}} and status["agreement"] == []


def test_a_reward_model_trains_on_ranked_pairs_and_scores_the_candidates(lab, jobs_worker):
    job = run_job(lab, "generate", "tiny", "questions", num_samples=3, max_new_tokens=5, temperature=1.5)
    name = job["output_dataset"]
    while (item := ranking.next_item(lab, name, "ann")) is not None:
        ranking.submit(lab, name, item["item"], "ann", order="1,2,3", into="prefs")
    prefs = datasets.info(lab, "prefs")
    assert prefs["format"] == "preference" and 20 <= prefs["rows"] <= 30  # identical answers make no pair
    reward = run_job(lab, "reward", "tiny", "prefs", use_lora=False, max_steps=3, eval_split=0, precision="fp32")
    assert registry.info(lab, reward["output_model"])["kind"] == "reward"
    scores = ranking.score_items(lab, name, reward["output_model"], only={"1", "2"})
    assert set(scores) == {"1", "2"} and all(len(v) == 3 for v in scores.values())
    found = ranking.reward_agreement(lab, name, scores)
    assert found["pairs"] >= 4 and 0 <= found["agreement"] <= 1


def test_rankings_their_pairs_and_agreement_on_any_database(any_ws, tmp_path):
    datasets.add(any_ws, "cands", write_jsonl(tmp_path / "cands.jsonl", candidates_rows()))
    for who in ("ann", "bob"):
        for _ in range(2):
            item = ranking.next_item(any_ws, "cands", who)
            ranking.submit(any_ws, "cands", item["item"], who, order="1,2,3", into="prefs")
    with pytest.raises(LabError, match="already judged"):
        ranking.submit(any_ws, "cands", "q0", "ann", order="1,2,3", into="prefs")
    assert datasets.info(any_ws, "prefs")["rows"] == 12
    found, = ranking.agreement(any_ws, "cands")
    assert found["items"] == 2 and found["pairs"] == 6 and 0 <= found["agreement"] <= 1
    assert ranking.progress(any_ws, "cands")["annotators"] == {"ann": {"done": 2, "skipped": 0},
                                                               "bob": {"done": 2, "skipped": 0}}


def test_a_verdict_that_fails_half_way_leaves_nothing_and_the_same_submit_then_works(cands, monkeypatch):
    real_add = datasets.add_rows

    def add_then_die(*args, **kwargs):
        real_add(*args, **kwargs)  # the new dataset's folder is in place, its row not yet committed
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "add_rows", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        ranking.submit(cands, "cands", "q0", "ann", order="1,2,3", into="prefs")
    assert "prefs" not in [d["name"] for d in datasets.list_all(cands)]
    assert ranking.progress(cands, "cands")["annotators"] == {}, "no verdict without its pairs"
    monkeypatch.setattr(datasets, "add_rows", real_add)
    done = ranking.submit(cands, "cands", "q0", "ann", order="1,2,3", into="prefs")
    assert done["added"] == 3 and datasets.info(cands, "prefs")["rows"] == 3


def test_the_rank_page_says_how_a_reward_model_agrees_with_the_people(cands, monkeypatch):
    from lab.ui.common import UI
    from lab.ui.tabs import rank as rank_tab

    for item in ("q0", "q1"):
        shown = shown_numbers(cands, "cands", "ann", [c["text"] for c in dict(
            (r["id"], r["candidates"]) for r in candidates_rows())[item]])
        ranking.submit(cands, "cands", item, "ann", order=shown, into="prefs")
    monkeypatch.setattr(rank_tab, "scores_for", lambda ui, name, model, wanted: {i: [3.0, 2.0, 1.0] for i in wanted})
    html = rank_tab.agreement_html(UI(cands), "cands", "<b>rm</b>")
    assert "&lt;b&gt;rm&lt;/b&gt; agrees with the people on 1.000 of 6 ranked answer pairs" in html
    assert "Kendall&#x27;s tau 1.000 and Spearman&#x27;s rho 1.000 (mean of 2)" in html
    assert "Cohen&#x27;s kappa —" in html, "the people said > on every pair and so did the model: kappa undefined"
