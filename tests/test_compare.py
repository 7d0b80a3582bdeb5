"""The Compare page's data functions on synthetic runs, sweeps, and follow-up evaluations."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import insert

from lab import compare, experiments, jobstore, runs
from lab.db import session
from lab.errors import LabError
from lab.tables import Metric, utcnow
from lab.ui.tabs import compare as compare_tab


def _run(s, params: dict, metrics: dict[str, list[float]], plugin: str = "instant") -> int:
    exp = experiments.get_or_create(s, "cmp")
    job_id = jobstore.enqueue(s, experiment_id=exp, plugin=plugin, params=params)
    t0 = utcnow()
    with session(s) as db:
        db.execute(insert(Metric), [
            {"job_id": job_id, "step": i + 1, "key": key, "value": v, "time": t0 + timedelta(seconds=i)}
            for key, values in metrics.items() for i, v in enumerate(values)])
    return job_id


def test_diff_shows_only_the_settings_that_differ(ws):
    a = _run(ws, {"steps": 3, "record": ""}, {"loss": [1.0]})
    b = _run(ws, {"steps": 5, "record": ""}, {"loss": [1.0]})
    columns, rows = compare.config_diff(ws, [a, b])
    assert [r["setting"] for r in rows] == ["steps"]
    assert rows[0][columns[1]] == 3 and rows[0][columns[2]] == 5
    _, every = compare.config_diff(ws, [a, b], only_differences=False)
    assert {r["setting"] for r in every} == {"plugin", "model", "dataset", "steps", "record"}


def test_leaderboard_marks_the_best_value_of_each_column(any_ws):
    a = _run(any_ws, {}, {"loss": [3.0, 2.0, 2.5], "accuracy": [0.5, 0.9]})
    b = _run(any_ws, {}, {"loss": [3.0, 1.0, 1.5], "accuracy": [0.6, 0.7]})
    columns, rows, best = compare.leaderboard(any_ws, [a, b])
    by_id = {r["id"]: r for r in rows}
    assert by_id[a]["loss"] == 2.5 and by_id[a]["best loss"] == 2.0  # final, and the lowest seen
    assert by_id[a]["best accuracy"] == 0.9  # accuracy: higher is better
    assert best["loss"] == b and best["best loss"] == b and best["accuracy"] == a and best["best accuracy"] == a
    ranked = sorted(rows, key=lambda r: r["loss"])
    assert [r["id"] for r in ranked] == [b, a], "sorting the leaderboard by a column orders the runs right"
    assert compare.best_run(any_ws, [a, b], "best accuracy") == a
    c = _run(any_ws, {}, {"loss": [2.0, 1.5], "accuracy": [0.9, 0.4]})  # ties a for the best accuracy, 0.9
    columns, rows, best = compare.leaderboard(any_ws, [a, b, c])
    assert "best accuracy" not in best and best["best loss"] == b and best["accuracy"] == a
    top = compare.leaders(columns, rows)
    assert top["best accuracy"] == [a, c] and top["accuracy"] == [a] and "run" not in top, "a tie names both runs"
    tie = compare_tab.winner_line(columns, rows, "best accuracy")
    assert tie.startswith("A tie by **best accuracy** (0.9)") and f"**\\#{a} " in tie and f"**\\#{c} " in tie, tie
    assert "none is marked best" in tie and f"**\\#{b} " not in tie
    assert compare_tab.winner_line(columns, rows, "accuracy").startswith(f"Best by **accuracy**: **\\#{a} "), "one"
    assert compare_tab.winner_line(columns, rows, "status") == "", "a column that ranks nothing names nobody"
    other = _run(any_ws, {}, {"zeta": [1.0], "aardvark": [2.0]})
    assert compare.keys(any_ws, [a, b]) == ["accuracy", "loss"], "the runs' metrics only, sorted"
    assert compare.keys(any_ws, [other, b]) == ["aardvark", "accuracy", "loss", "zeta"]
    assert compare.keys(any_ws, [10_000]) == [] and compare.keys(any_ws, []) == []



@pytest.mark.parametrize(("key", "way"), [
    ("loss", "lower"), ("eval_loss", "lower"), ("best loss", "lower"), ("eval/perplexity", "lower"),
    ("eval_accuracy", "higher"), ("final/macro_f1", "higher"), ("eval/bleu", "higher"), ("eval/rougeL", "higher"),
    ("rewards/margins", "higher"), ("rewards/accuracies", "higher"), ("reward", "higher"), ("eval_fewshot:accuracy",
                                                                                          "higher"),
    ("grad_norm", None), ("entropy", None), ("kl", None), ("tokens_per_s", None), ("mfu", None),
    ("rewards/rejected", None), ("logps/chosen", None), ("learning_rate", None), ("eval-judge:people_kappa", "higher"),
    ("eval/people_spearman", "higher"), ("eval/people_pairs", None)])
def test_every_metric_has_a_direction_or_none(key, way):
    assert compare.direction(key) == way


def test_diagnostics_are_never_marked_best_and_the_scores_come_first(any_ws):
    a = _run(any_ws, {}, {"grad_norm": [1.0, 3.0], "entropy": [2.0, 1.0], "loss": [2.0, 1.0],
                          "eval_accuracy": [0.5, 0.8]})
    b = _run(any_ws, {}, {"grad_norm": [1.0, 2.0], "entropy": [2.0, 1.5], "loss": [2.0, 1.5],
                          "eval_accuracy": [0.5, 0.6]})
    columns, _, best = compare.leaderboard(any_ws, [a, b])
    assert "grad_norm" not in best and "entropy" not in best and "best grad_norm" not in columns
    assert best["loss"] == a and best["eval_accuracy"] == a
    assert columns[2:5] == ["eval_accuracy", "loss", "best eval_accuracy"], columns
    assert columns.index("grad_norm") > columns.index("best loss"), "diagnostics last"
    shown = compare.shown_columns(columns)
    assert "grad_norm" not in shown and "entropy" not in shown and {"run", "status", "loss", "eval_accuracy"} <= set(
        shown), "diagnostics only when asked"
    assert compare.shown_columns(columns, diagnostics=True) == columns

def test_curves_downsample_keeping_extremes_and_align_on_tokens(any_ws):
    values = [float(i % 50) for i in range(3000)]
    values[1234] = -100.0
    a = _run(any_ws, {}, {"loss": values, "num_tokens": [100.0 * (i + 1) for i in range(3000)]})
    drawn = compare.curves(any_ws, [a], "loss", buckets=100)
    assert len(drawn) <= 200 and drawn["value"].min() == -100.0 and drawn["value"].max() == 49.0
    assert list(drawn["x"]) == sorted(drawn["x"]), "points stay in order"
    by_tokens = compare.curves(any_ws, [a], "loss", x="tokens", buckets=100)
    assert by_tokens["x"].max() == 300_000.0
    by_time = compare.curves(any_ws, [a], "loss", x="time", buckets=100)
    assert by_time["x"].max() == 2999.0
    logged = compare.curves(any_ws, [a], "loss", log_scale=True, buckets=5000)
    assert len(logged) == 3000 - 61, "zeros and negatives have no logarithm"
    assert compare.smooth([1.0, 3.0], 0.5).tolist() == pytest.approx([1.0, 7 / 3])  # (0.5*1 + 3) / 1.5


def test_select_the_last_n_runs_of_an_experiment(ws):
    ids = [runs.submit(ws, "instant", experiment="sel") for _ in range(4)]
    runs.submit(ws, "instant", experiment="other")
    assert [j["id"] for j in compare.select_runs(ws, experiment="sel", last=2)] == ids[::-1][:2]


def test_a_sweep_queues_its_grid_as_a_group_and_follow_up_evaluations_run(ws, tiny_model_dir, tmp_path, jobs_worker):
    group, ids = runs.sweep(ws, {"plugin": "instant", "experiment": "sw", "params": {"record": ""}},
                            runs.parse_grid(["steps=1,2,3"]))
    jobs = runs.list_jobs(ws, group=group)
    assert sorted(j["id"] for j in jobs) == ids and sorted(j["params"]["steps"] for j in runs.jobs_by_id(ws, ids)) \
        == [1, 2, 3]
    with pytest.raises(LabError, match="already exists"):
        runs.sweep(ws, {"plugin": "instant", "experiment": "sw", "group": group}, {"steps": [1]})
    with pytest.raises(LabError, match="--grid expects"):
        runs.parse_grid(["steps"])
    with pytest.raises(LabError, match="the grid has 300 configurations; 256 at most"):
        runs.sweep(ws, {"plugin": "instant"}, {"steps": list(range(20)), "tokens": list(range(15))})
    before = len(runs.list_jobs(ws))
    with pytest.raises(LabError):  # one bad value refuses the whole grid
        runs.sweep(ws, {"plugin": "instant", "experiment": "sw"}, {"steps": [1, -1]})
    assert len(runs.list_jobs(ws)) == before

    # a training run with an evaluation to follow: the evaluation runs on its output, and its score is in the
    # training run's leaderboard row
    from conftest import write_jsonl

    from lab import datasets, registry

    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "qa", write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "hi", "completion": "hello"}] * 4))
    with pytest.raises(LabError, match="must be an eval plugin"):
        runs.submit(ws, "sft", model="tiny", dataset="qa", then_eval={"plugin": "sft", "dataset": "qa"})
    train = runs.submit(ws, "sft", model="tiny", dataset="qa", params={"max_steps": 2, "precision": "fp32"},
                        then_eval={"plugin": "eval-generate", "dataset": "qa", "params": {"max_new_tokens": 2}})
    jobs_worker().serve(until_empty=True)  # the sweep, the training, then its evaluation
    follow = [j for j in runs.list_jobs(ws) if j["plugin"] == "eval-generate"]
    assert len(follow) == 1 and follow[0]["status"] == "completed"
    assert follow[0]["model"] == runs.get_job(ws, train)["output_model"]
    _, rows, _ = compare.leaderboard(ws, [train])
    assert "eval-generate:rouge1" in rows[0]


def test_a_finished_runs_curve_is_read_once_and_again_when_the_run_starts_again(ws):
    from sqlalchemy import update

    from lab.tables import Job

    a = _run(ws, {}, {"loss": [3.0, 2.0]})
    with session(ws) as db:
        db.execute(update(Job).where(Job.id == a).values(status="completed", attempts=1, finished_at=utcnow()))
    assert list(compare.curves(ws, [a], "loss")["value"]) == [3.0, 2.0]
    assert (a, "loss") in {k[:2] for k in compare._SERIES}, "kept in memory"
    assert list(compare.curves(ws, [a], "loss", smoothing=0.5)["value"]) == pytest.approx([3.0, 2 + 1 / 3])
    with session(ws) as db:  # resumed: it runs again and logs more
        db.execute(update(Job).where(Job.id == a).values(status="running", attempts=2, finished_at=None))
        db.execute(insert(Metric), [{"job_id": a, "step": 3, "key": "loss", "value": 1.0, "time": utcnow()}])
    assert list(compare.curves(ws, [a], "loss")["value"]) == [3.0, 2.0, 1.0]


def test_a_finished_runs_leaderboard_figures_are_read_once_and_again_when_it_starts_again(any_ws):
    from sqlalchemy import update

    from lab.tables import Job

    a = _run(any_ws, {}, {"loss": [3.0, 2.0]})
    b = _run(any_ws, {}, {"loss": [4.0, 1.0], "accuracy": [0.5, 0.7]})
    with session(any_ws) as db:
        db.execute(update(Job).where(Job.id.in_([a, b])).values(status="completed", attempts=1, finished_at=utcnow()))
    _, rows, best = compare.leaderboard(any_ws, [a, b])
    assert (rows[1]["loss"], rows[1]["best loss"], rows[1]["accuracy"], best["loss"]) == (1.0, 1.0, 0.7, b)
    with session(any_ws) as db:  # a finished run's points do not change: had they, the figures kept would stay
        db.execute(update(Metric).where(Metric.job_id == b, Metric.value == 1.0).values(value=9.0))
    assert compare.leaderboard(any_ws, [a, b])[1][1]["loss"] == 1.0, "read from memory, not again"
    assert compare.leaderboard(any_ws, [b], ["accuracy"])[0] == ["run", "status", "accuracy", "best accuracy"]
    with session(any_ws) as db:  # resumed: it runs again and logs more
        db.execute(update(Job).where(Job.id == b).values(status="running", attempts=2, finished_at=None))
        db.execute(insert(Metric), [{"job_id": b, "step": 3, "key": "loss", "value": 2.5, "time": utcnow()}])
    _, rows, best = compare.leaderboard(any_ws, [a, b])
    assert (rows[1]["loss"], rows[1]["best loss"], best["loss"]) == (2.5, 2.5, a)  # 9.0 and 2.5 now: a's 2.0 wins
    with session(any_ws) as db:  # a running run is read on every call
        db.execute(insert(Metric), [{"job_id": b, "step": 4, "key": "loss", "value": 0.5, "time": utcnow()}])
    assert compare.leaderboard(any_ws, [a, b])[1][1]["loss"] == 0.5


def _evaluation(s, tmp_path, scores: list, plugin: str = "eval-generate", params: dict | None = None) -> int:
    """A completed evaluation whose eval/examples.jsonl holds one `accuracy` per example (a judge's: an
    `outcome`)."""
    import json

    from sqlalchemy import update

    from lab.tables import Job

    job_id = _run(s, params or {}, {"eval/rows": [len(scores)]}, plugin=plugin)
    folder = tmp_path / f"run{job_id}"
    (folder / "eval").mkdir(parents=True)
    field = "outcome" if plugin == "eval-judge" else "accuracy"
    (folder / "eval" / "examples.jsonl").write_text("".join(
        json.dumps({"row": i + 1, "prompt": f"q{i}", field: v, "answer": "x", "probabilities": {"A": 0.5}}) + "\n"
        for i, v in enumerate(scores)))
    with session(s) as db:
        db.execute(update(Job).where(Job.id == job_id).values(status="completed", run_dir=str(folder)))
    return job_id


def test_compare_says_whether_a_difference_in_scores_is_real(ws, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.5).astype(float)
    better = np.where(rng.random(400) < 0.2, 1.0, base)  # right on a fifth more of the examples
    noise = base.copy()  # ten examples flipped each way: the same mean, a different run
    noise[np.flatnonzero(base == 1)[:10]] = 0
    noise[np.flatnonzero(base == 0)[:10]] = 1
    a, b, c = (_evaluation(ws, tmp_path, list(x)) for x in (base, better, noise))
    rows = compare.differences(ws, [a, b, c])
    by_run = {r["run"].split()[0]: r for r in rows if r["score"] == "eval-generate:accuracy"}
    assert by_run[f"#{b}"]["significant"] and by_run[f"#{b}"]["difference"].startswith("+0.")
    assert not by_run[f"#{c}"]["significant"] and by_run[f"#{c}"]["examples"] == 400
    assert {r["score"] for r in rows} == {"eval-generate:accuracy"}, "text fields are not scores"
    assert compare.differences(ws, [a]) == []


def test_a_judged_run_gets_a_sign_test_of_its_wins_against_its_losses(ws, tmp_path):
    from scipy.stats import binomtest

    clear = _evaluation(ws, tmp_path, ["win"] * 15 + ["loss"] * 3 + ["tie"] * 2, "eval-judge", {"against": "base"})
    close = _evaluation(ws, tmp_path, ["win"] * 9 + ["loss"] * 8 + ["tie"] * 3, "eval-judge", {"against": "base"})
    rows = compare.differences(ws, [clear, close])
    signs = {r["run"].split()[0]: r for r in rows if r["score"] == "eval-judge:wins against losses"}
    p = binomtest(15, 18).pvalue
    assert signs[f"#{clear}"]["difference"] == f"15 wins, 3 losses, 2 ties: p = {p:.3g}, significant"
    assert signs[f"#{clear}"]["against"] == "base" and signs[f"#{clear}"]["examples"] == 20
    assert not signs[f"#{close}"]["significant"] and f"p = {binomtest(9, 17).pvalue:.3g}," in \
        signs[f"#{close}"]["difference"]
    # the two judged runs against each other, example by example: a win counts 1, a tie a half
    paired = [r for r in rows if r["score"] == "eval-judge:win"]
    assert len(paired) == 1 and paired[0]["difference"].startswith(f"{(9 + 1.5 - 15 - 1) / 20:+.3g} ± ")
    assert {r["score"] for r in rows} == {"eval-judge:wins against losses", "eval-judge:win"}, "row numbers and " \
        "probabilities are not scores"


def test_lab_compare_prints_the_runs_and_whether_their_difference_is_real(ws, tmp_path):
    from conftest import lab_cli

    a = _evaluation(ws, tmp_path, [0.0, 1.0] * 50)
    b = _evaluation(ws, tmp_path, [1.0, 1.0] * 50)
    found = json.loads(lab_cli("compare", str(a), str(b), "--json", check=True).stdout)
    assert [r["id"] for r in found["runs"]] == [a, b]
    assert found["differences"] == compare.differences(ws, [a, b])
    assert found["differences"][0]["difference"].startswith("+0.5 ± ")
    shown = lab_cli("compare", str(a), str(b), check=True).stdout
    assert "is the difference real" in shown and "significant" in shown and f"#{b}" in shown
    for args, message in ((["999"], "no job 999"), ([], "name the runs to compare"),
                          (["--group", "<b>none</b>"], "no runs in the group '<b>none</b>'")):
        failed = lab_cli("compare", *args)
        assert failed.returncode != 0 and message in failed.stderr and "Traceback" not in failed.stderr
