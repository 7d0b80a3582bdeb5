"""Standard benchmarks through lm-evaluation-harness (the eval-harness plugin): a task from local files scores as
the harness's own command line scores it, its figures and standard errors reach the Compare leaderboard, and a
task whose data is not on the machine is refused or fails naming what it needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

from lab import compare, registry, runs, significance
from lab.errors import LabError

COLOURS = [("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("coal", "black"), ("blood", "red"),
           ("a banana", "yellow"), ("an orange", "orange"), ("a plum", "purple")]


def _task_folder(root: Path) -> Path:
    """A harness task `colours` whose data lies in a subfolder, named relative to the task file."""
    folder = root / "benchmarks"
    names = [c for _, c in COLOURS]
    rows = []
    for i, (thing, colour) in enumerate(COLOURS * 2):
        choices = sorted({colour, names[(i + 1) % len(names)], names[(i + 3) % len(names)]})
        rows.append({"question": f"What colour is {thing}?", "choices": choices, "answer": choices.index(colour)})
    write_jsonl((folder / "data").mkdir(parents=True) or folder / "data" / "colours.jsonl", rows)
    (folder / "colours.yaml").write_text(
        "task: colours\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/colours.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        "metadata:\n  version: 1.0\n")
    return folder


@pytest.fixture
def harness(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    return ws, _task_folder(tmp_path)


def test_a_local_task_scores_as_the_harness_command_line_and_reaches_the_leaderboard(harness, tiny_model_dir,
                                                                                     tmp_path, jobs_worker):
    ws, tasks = harness
    job_id = runs.submit(ws, "eval-harness", model="tiny",
                         params={"tasks": "colours,capitals", "task_dir": str(tasks), "limit": "10"})
    jobs_worker(ws).serve(once=True)
    job = runs.get_job(ws, job_id)
    assert job["status"] == "completed", f"{job['error']}\n{job['log_tail']}"
    results = json.loads((Path(job["run_dir"]) / "output" / "results.json").read_text())["results"]
    assert {"colours/acc", "colours/acc_stderr", "colours/acc_norm", "capitals/acc", "capitals/acc_stderr"} <= set(
        results)
    lines = (Path(job["run_dir"]) / "eval" / "examples.jsonl").read_text().splitlines()
    examples = [json.loads(line) for line in lines]
    assert [(r["task"], r["doc_id"]) for r in examples] == [("capitals", i) for i in range(10)] + [
        ("colours", i) for i in range(10)]
    assert sum(r["colours/acc"] for r in examples if r["task"] == "colours") / 10 == pytest.approx(
        results["colours/acc"])
    harness_json = json.loads((Path(job["run_dir"]) / "output" / "harness.json").read_text())
    assert harness_json["n-samples"]["colours"] == {"original": 16, "effective": 10}

    # the harness's own command line, on the same model files and task, gives the same figures
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                           f"pretrained={tiny_model_dir},dtype=float32", "--include_path", str(tasks),
                           "--tasks", "colours", "--limit", "10", "--output_path", str(out)],
                          cwd=tasks, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["colours"]
    assert results["colours/acc"] == pytest.approx(theirs["acc,none"], abs=1e-9)
    assert results["colours/acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], abs=1e-9)
    assert results["colours/acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-9)

    columns, rows, _ = compare.leaderboard(ws, [job_id])
    assert rows[0]["eval/colours/acc"] == pytest.approx(results["colours/acc"])
    shown = compare.shown_columns(columns)
    assert shown.index("eval/colours/acc_stderr") == shown.index("eval/colours/acc") + 1, "each figure, its error"
    assert compare.direction("eval/colours/acc") == "higher" and compare.direction("eval/colours/acc_stderr") is None


def test_two_harness_runs_are_paired_by_task_and_example_not_by_position():
    a = [{"task": "t1", "doc_id": 0, "t1/acc": 1.0}, {"task": "t1", "doc_id": 1, "t1/acc": 0.0},
         {"task": "t2", "doc_id": 0, "t2/acc": 1.0}]
    b = [{"task": "t2", "doc_id": 0, "t2/acc": 0.0}, {"task": "t1", "doc_id": 1, "t1/acc": 1.0}]
    assert significance.paired_examples(a, b, "t1/acc") == ([0.0], [1.0])
    assert significance.paired_examples(a, b, "t2/acc") == ([1.0], [0.0])


@pytest.mark.parametrize("params, message", [
    ({"tasks": "colours"}, "needs {missing}, which is not on this machine"),
    ({"tasks": "<script>alert(1)</script>"}, "is not a task name"),
    ({"tasks": " , "}, "name at least one task"),
    ({"tasks": "colours", "task_dir": "/no/such/folder"}, "/no/such/folder is not a folder"),
    ({"tasks": "capitals", "limit": "-1"}, "limit"),
])
def test_a_task_that_cannot_run_here_is_refused_and_nothing_is_queued(harness, params, message):
    ws, tasks = harness
    missing = tasks / "data" / "colours.jsonl"
    missing.unlink()
    with pytest.raises(LabError, match=message.format(missing=missing).replace("(", r"\(")):
        runs.submit(ws, "eval-harness", model="tiny", params={"task_dir": str(tasks), **params})
    assert runs.list_jobs(ws) == []


def test_an_unknown_task_or_one_whose_data_is_on_the_hub_fails_saying_what_it_needs(harness, tmp_path, monkeypatch,
                                                                                  jobs_worker):
    ws, _ = harness
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # no datasets cached
    typo = runs.submit(ws, "eval-harness", model="tiny", params={"tasks": "capitalz"})
    hub = runs.submit(ws, "eval-harness", model="tiny", params={"tasks": "arc_easy", "limit": "5"})
    jobs_worker(ws).serve(until_empty=True)
    job = runs.get_job(ws, typo)
    assert (job["status"], job["failure"]) == ("failed", "data"), job
    assert "no harness task named 'capitalz' (did you mean capitals" in job["error"]
    job = runs.get_job(ws, hub)
    assert (job["status"], job["failure"]) == ("failed", "data"), job
    assert "task arc_easy reads allenai/ai2_arc (ARC-Easy), which is not on this machine" in job["error"]
    assert "never downloads" in job["next_step"]
