"""Model-graded evaluation (eval-judge: both orders, win/tie/loss, position disagreement) and synthetic data
(synthesize: self-instruct with its filters, and answers to prompts), on tiny models."""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl
from test_stages import run_job

from lab import compare, datasets, formats, ranking, registry, runs
from lab.errors import LabError
from plugins import eval_judge, synthesize

PROMPTS = [{"prompt": f"Question number {i}: what comes next?", "completion": "ok"} for i in range(8)]
SEEDS = ("Write a poem about the sea.\nList three fruits.\nExplain why the sky is blue.\n"
         "Translate hello into French.\nGive a synonym for happy.")


@pytest.fixture
def lab(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    registry.add_folder(ws, "tiny-b", tiny_model_dir)
    datasets.add(ws, "questions", write_jsonl(tmp_path / "questions.jsonl", PROMPTS))
    return ws


def results(job: dict) -> dict:
    return json.loads((Path(job["run_dir"]) / "output" / "results.json").read_text())["results"]


@pytest.mark.parametrize(("first", "second", "outcome", "disagree"), [
    ("A", "B", "win", False), ("B", "A", "loss", False), ("A", "C", "win", True), ("C", "A", "loss", True),
    ("A", "A", "tie", True), ("B", "B", "tie", True), ("C", "C", "tie", False),
])
def test_the_two_orders_combine_into_one_verdict(first, second, outcome, disagree):
    assert eval_judge.verdict(first, second) == (outcome, disagree)


def test_the_summary_counts_ties_half_and_gives_an_interval():
    found = eval_judge.summary_of(["win", "win", "tie", "loss"], [False, False, True, False])
    assert found["win_rate"] == pytest.approx(0.625) and found["position_disagreement"] == 0.25
    assert (found["wins"], found["ties"], found["losses"]) == (0.5, 0.25, 0.25)
    assert 0 <= found["win_rate_low"] < 0.625 < found["win_rate_high"] <= 1


def test_a_model_judged_against_itself_wins_half_with_its_position_bias_shown(lab, jobs_worker):
    job = run_job(lab, "eval-judge", "tiny", "questions", judge="tiny", against="tiny-b", max_new_tokens=6)
    found = results(job)
    # the same weights answer the same way: whatever the judge says, it can only be position bias, so every pair is
    # a tie (both orders agree on a tie) or a disagreement
    assert found["win_rate"] == 0.5 and found["wins"] == 0 and found["losses"] == 0 and found["rows"] == 8
    assert 0 <= found["position_disagreement"] <= 1 and found["mean_preference"] == pytest.approx(0.5, abs=1e-6)
    examples = [json.loads(line) for line in (Path(job["run_dir"]) / "eval" / "examples.jsonl").open()]
    assert len(examples) == 8 and all(e["answer"] == e["other_answer"] for e in examples)
    disagreeing = sum(e["ours_first"] != {"A": "B", "B": "A", "C": "C"}[e["ours_second"]] for e in examples)
    assert found["position_disagreement"] == disagreeing / 8
    assert {"eval/win_rate", "eval/position_disagreement"} <= set(runs.metrics(lab, [job["id"]])[job["id"]])
    assert compare.direction("eval/win_rate") == "higher", "the leaderboard marks the best win rate"


def test_eval_judge_reads_a_candidates_dataset_and_refuses_one_without_both_models(lab, jobs_worker):
    gen = run_job(lab, "generate", "tiny", "questions", num_samples=2, max_new_tokens=5, limit=4)
    name = gen["output_dataset"]
    # people ranked some of the same answers first: ann the first answer better, better, worse; bob a tie
    fingerprint, ids = datasets.info(lab, name)["fingerprint"], [item for item, _ in ranking.items(lab, name)]
    for item, first_better in zip(ids, (True, True, False), strict=False):
        shown = ranking.shown_order(fingerprint, item, "ann", 2)
        ranking.submit(lab, name, item, "ann", into="prefs", order=",".join(
            str(shown.index(i) + 1) for i in ((0, 1) if first_better else (1, 0))))
    ranking.submit(lab, name, ids[0], "bob", verdict="tie")
    job = run_job(lab, "eval-judge", "tiny", name, judge="tiny", against="tiny")  # its two samples, one another
    found = results(job)
    assert found["rows"] == 4 and 0 <= found["win_rate"] <= 1
    # the judge against the people, recomputed from its examples (scipy for the rank correlations)
    from scipy.stats import kendalltau, spearmanr

    judged = [json.loads(line) for line in (Path(job["run_dir"]) / "eval" / "examples.jsonl").open()]
    label = {"win": ">", "loss": "<", "tie": "="}
    people = [(0, ">"), (0, "="), (1, ">"), (2, "<")]
    ours = [label[judged[row]["outcome"]] for row, _ in people]
    assert found["people_pairs"] == 4
    assert found["people_agreement"] == pytest.approx(sum(a == b for a, (_, b) in zip(ours, people, strict=True)) / 4)
    soft, hard = [judged[row]["preference"] for row, _ in people], [{">": 1, "=": 0.5, "<": 0}[b] for _, b in people]
    for key, ref in (("people_spearman", spearmanr), ("people_kendall", kendalltau)):
        expected = ref(soft, hard).statistic
        assert found.get(key) == (None if np.isnan(expected) else pytest.approx(expected)), key
    assert "the judge agrees with the people on" in (Path(job["run_dir"]) / "log.txt").read_text()
    with pytest.raises(LabError, match="has no answer by tiny-b"):
        runs.submit(lab, "eval-judge", model="tiny", dataset=name, params={"judge": "tiny", "against": "tiny-b"})
    with pytest.raises(LabError, match="`against` is required"):
        runs.submit(lab, "eval-judge", model="tiny", dataset="questions", params={"judge": "tiny"})
    assert [j["plugin"] for j in runs.list_jobs(lab)].count("eval-judge") == 1


@pytest.mark.parametrize(("raw", "kept"), [
    ("Task 4: Write a haiku about rain.", "Write a haiku about rain."),
    ('4. "Name two rivers."\nMore text', "Name two rivers."),
    ("\n\n- Describe a cat.", "Describe a cat."),
    ("New task: Sort these numbers", "Sort these numbers"),
    ("   ", ""),
    ("What a delightful task! Here's a new task:", ""),
    ("Here is a new task:\n\nPlan a picnic for four.", "Plan a picnic for four."),
    ("Your task: Write a limerick.", "Write a limerick."),
])
def test_a_generated_task_is_cleaned_to_its_first_line(raw, kept):
    assert synthesize.clean(raw) == kept


def test_the_filters_drop_near_duplicates_and_count_every_reason():
    params = synthesize.Params(min_words=2, max_words=6)
    counts = Counter()
    screen = synthesize.Filter(params, ["Write a poem about the sea."], [], counts)
    decisions = [screen.keep(t) for t in ["Write a poem about seas.", "Hi", "!!! ???",
                                          "one two three four five six seven", "List three fruits.",
                                          "List three red fruits."]]
    assert decisions == [False, False, False, False, True, False]
    assert counts == {"removed_near_duplicate": 2, "removed_too_short": 1, "removed_unparseable": 1,
                      "removed_too_long": 1, "kept": 1}


def test_self_instruct_from_five_seeds_makes_valid_rows_and_no_near_duplicates(lab, jobs_worker):
    job = run_job(lab, "synthesize", "tiny", None, seed_tasks=SEEDS, num_instructions=6, min_words=1,
                  temperature=1.5, answer_temperature=1.0, max_task_tokens=12, max_new_tokens=8, max_rounds=10)
    name = job["output_dataset"]
    assert name == f"synthetic-{job['id']}"
    info = datasets.info(lab, name)
    assert info["format"] == "alpaca" and 1 <= info["rows"] <= 6 and info["job_id"] == job["id"]
    assert "self-instruct by tiny from 5 seed task(s)" in info["source"]
    rows = datasets.preview(lab, name, 10)
    assert all(formats.check_row("alpaca", r) == [] for r in rows)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    tasks = [r["instruction"] for r in rows] + SEEDS.splitlines()
    for a, b in combinations(tasks, 2):
        assert scorer.score(a, b)["rougeL"].fmeasure < 0.7, (a, b)
    counts = json.loads((Path(job["run_dir"]) / "output" / "filters.json").read_text())
    removed = sum(v for k, v in counts.items() if k.startswith("removed_") and k != "removed_empty_answer")
    assert counts["generated"] == counts["kept"] + removed
    assert counts["rows"] == info["rows"] == counts["kept"] - counts.get("removed_empty_answer", 0)
    assert runs.metrics(lab, [job["id"]], ["synth/kept"])[job["id"]]["synth/kept"][0][1] == counts["kept"]


def test_answers_mode_answers_every_prompt_as_chat_rows(lab, jobs_worker):
    job = run_job(lab, "synthesize", "tiny", "questions", mode="answers", output_format="chat",
                  answer_temperature=1.0, max_new_tokens=6)
    rows = datasets.preview(lab, job["output_dataset"], 20)
    assert rows and all(formats.check_row("chat", r) == [] for r in rows)
    assert [r["messages"][0]["content"] for r in rows] == [p["prompt"] for p in PROMPTS][: len(rows)]
    counts = json.loads((Path(job["run_dir"]) / "output" / "filters.json").read_text())
    assert len(rows) + counts.get("removed_empty_answer", 0) == 8


@pytest.mark.parametrize(("dataset", "params", "message"), [
    (None, {"seed_tasks": "only one"}, "needs seed tasks"),
    (None, {"mode": "answers"}, "needs a dataset of prompts"),
    ("questions", {"min_words": 5, "max_words": 2}, "above `max_words`"),
])
def test_synthesize_refuses_what_cannot_work_and_queues_nothing(lab, dataset, params, message):
    with pytest.raises(LabError, match=message):
        runs.submit(lab, "synthesize", model="tiny", dataset=dataset, params={k: str(v) for k, v in params.items()})
    assert runs.list_jobs(lab) == []


def test_a_stopped_synthesize_job_goes_on_from_its_last_round(lab, jobs_worker):
    from conftest import stop_worker_mid_job

    from lab import jobstore

    params = {"seed_tasks": SEEDS, "num_instructions": 30, "min_words": 1, "max_rounds": 500, "batch_size": 1,
              "temperature": 1.5, "answer_temperature": 1.0, "max_task_tokens": 24, "max_new_tokens": 4}
    job_id = runs.submit(lab, "synthesize", model="tiny", params={k: str(v) for k, v in params.items()})
    stop_worker_mid_job(lab, job_id, 3, "three tasks kept")
    assert jobstore.get(lab, job_id).status == "queued"
    state = json.loads((Path(runs.get_job(lab, job_id)["run_dir"]) / "checkpoints" / "synthesize.json").read_text())
    assert len(state["kept"]) >= 3 and state["round"] >= 3
    jobs_worker(lab).serve(once=True)
    job = runs.get_job(lab, job_id)
    assert job["status"] == "completed", job["log_tail"]
    assert f"going on from round {state['round']}" in (Path(job["run_dir"]) / "log.txt").read_text()
    final = json.loads((Path(job["run_dir"]) / "checkpoints" / "synthesize.json").read_text())
    assert final["kept"][: len(state["kept"])] == state["kept"], "the earlier tasks are kept"
    rows = datasets.preview(lab, job["output_dataset"], 100)
    assert {r["instruction"] for r in rows} <= set(final["kept"]) and len(final["kept"]) == 30
