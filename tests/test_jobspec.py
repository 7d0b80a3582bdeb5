"""One job spec (lab.jobspec.JobSpec) built by all four entry points: the Train form, `lab run` / `lab sweep`, the
API's JSON and a run config file give the same spec, field by field; the command line, the config file and
job.json are derived from it and round-trip exactly."""

from __future__ import annotations

import json
import re
import shlex

import gradio as gr
import pytest
from conftest import lab_cli, write_jsonl

from lab import datasets, jobspec, plugins, registry, run_config, runs
from lab.errors import LabError
from lab.jobspec import JobSpec
from lab.ui import forms
from lab.ui.tabs import train

# every field away from its default (a field added to JobSpec fails the first test until it is here, and then the
# four entry points, all generated from the fields, carry it without being touched)
FULL = {"plugin": "sft", "model": "tiny", "dataset": "facts", "experiment": "spec", "params": {"max_steps": 3,
        "learning_rate": 0.0001}, "priority": 5, "max_attempts": 2, "time_limit_min": 7.5, "processes": 2,
        "devices": 2, "report_to": "tensorboard,mlflow", "nodes": 2, "memory_gb": 12.0,
        "then_eval": {"plugin": "eval-perplexity", "dataset": "facts", "params": {"limit": 2}}, "group": "g1",
        "tags": ["first", "second"]}


@pytest.fixture
def sws(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}] * 4))
    return ws


def test_the_sample_sets_every_field_away_from_its_default():
    spec = JobSpec.of(FULL)
    assert set(FULL) == set(jobspec.FIELDS)
    for name in jobspec.FIELDS:
        if name != "plugin":
            assert getattr(spec, name) != jobspec.default(name), name
    assert spec.changed() == {**FULL, "then_eval": FULL["then_eval"]}


def _through_the_form(ws, data: dict) -> JobSpec:
    """The Train page's way: named widget values (as the widgets hold them) into spec_from_form."""
    found, _ = plugins.discover(ws)
    default_trackers = []
    with gr.Blocks():
        form = forms.build(found[data["plugin"]])
    values = {"plugin": data["plugin"], "model": data["model"], "dataset": data["dataset"],
              "experiment": data["experiment"], "held": {data["plugin"]: form.fill(data["params"])},
              "then_eval": data["then_eval"]["plugin"], "eval_dataset": data["then_eval"]["dataset"],
              "eval_params": "\n".join(f"{k}={v}" for k, v in data["then_eval"]["params"].items()),
              **{n: train.to_widget(n, data[n], default_trackers) for n in train.GENERATED}}
    return train.spec_from_form(values, found, {data["plugin"]: form}, default_trackers)


def _api_handler(ws):
    from lab.ui.app import build

    demo = build(ws)
    return next(fn.fn for fn in demo.fns.values() if fn.api_name == "submit_job")


def test_the_four_entry_points_build_the_same_spec(sws, tmp_path):
    expected = JobSpec.of(FULL)
    # 1. the command line, as jobspec.command_line writes it
    line = jobspec.command_line(expected)
    done = lab_cli(*shlex.split(line)[1:], check=True)
    from_cli = runs.spec_of(sws, int(done.stdout.split()[-1]))
    # 2. a run config file, as the Train page saves it
    (tmp_path / "run.yaml").write_text(jobspec.to_config(expected))
    from_file = runs.spec_of(sws, runs.submit(sws, JobSpec.of(run_config.load(tmp_path / "run.yaml").spec)))
    done = lab_cli("run", "--config", str(tmp_path / "run.yaml"), check=True)
    from_file_cli = runs.spec_of(sws, int(done.stdout.split()[-1]))
    # 3. the API's JSON
    job = _api_handler(sws)(json.dumps(FULL))
    from_api = runs.spec_of(sws, job["id"])
    # 4. the Train form
    from_form = runs.spec_of(sws, runs.submit(sws, _through_the_form(sws, FULL)))
    for name in jobspec.FIELDS:
        seen = {where: getattr(spec, name) for where, spec in [
            ("cli", from_cli), ("file", from_file), ("file via cli", from_file_cli), ("api", from_api),
            ("form", from_form)]}
        assert all(v == getattr(expected, name) for v in seen.values()), (name, seen)
    assert sorted(shlex.split(jobspec.command_line(from_form))) == sorted(shlex.split(line))  # --set order aside
    # the job's own columns say the same
    stored = runs.get_job(sws, job["id"])
    assert (stored["priority"], stored["report_to"], stored["tags"]) == (5, "tensorboard,mlflow", ["first", "second"])


def test_every_field_has_a_command_line_option_a_form_widget_and_a_config_key(sws):
    help_text = lab_cli("run", "--help", check=True).stdout + lab_cli("sweep", "--help", check=True).stdout
    for name in jobspec.FIELDS:
        if name != "plugin":
            assert help_text.count(jobspec.meta(name)["flags"][0]) >= 2, name  # in run's help and in sweep's
        assert name in train.NAMED or name == "params", name  # params: the plugin's own form
        assert name in run_config.KEYS
    assert jobspec.meta("time_limit_min")["flags"][0] == "--time-limit"


def test_command_line_and_config_round_trip(sws, tmp_path):
    spec = JobSpec.of({"plugin": "instant", "params": {"steps": 2}, "tags": ["x"]})
    assert jobspec.command_line(spec) == "lab run instant --experiment default --set steps=2 --tag x"
    assert jobspec.command_line(spec, {"steps": [1, 2]}) == ("lab sweep instant --experiment default --set steps=2 "
                                                             "--tag x --grid steps=1,2")
    (tmp_path / "sweep.yaml").write_text(jobspec.to_config(spec, {"steps": [1, 2]}))
    loaded = run_config.load(tmp_path / "sweep.yaml")
    assert JobSpec.of(loaded.spec) == spec and loaded.grid == {"steps": [1, 2]}
    done = lab_cli("sweep", "--config", str(tmp_path / "sweep.yaml"), "--group", "from-file", "--processes", "1",
                   check=True)
    assert "queued 2 jobs as group from-file" in done.stdout
    specs = [runs.spec_of(sws, j["id"]) for j in runs.list_jobs(sws, group="from-file")]
    assert sorted(s.params["steps"] for s in specs) == [1, 2] and {s.group for s in specs} == {"from-file"}


@pytest.mark.parametrize(("data", "message"), [
    ({"plugin": "sft", "priority": True}, "priority must be a whole number, got True"),
    ({"plugin": "sft", "priority": 1.5}, "priority must be a whole number, got 1.5"),
    ({"plugin": "sft", "processes": 65}, "processes must be a whole number from 1 to 64"),
    ({"plugin": "sft", "devices": 2, "processes": 3}, "one process per device"),
    ({"plugin": "sft", "time_limit_min": 0}, "the time limit must be a number of minutes above 0"),
    ({"plugin": "sft", "time_limit_min": float("nan")}, "the time limit must be a number of minutes above 0"),
    ({"plugin": "sft", "memory_gb": 1e9}, "memory must be a number of GB above 0 and at most 65536"),
    ({"plugin": "sft", "report_to": "comet"}, "unknown tracker 'comet'"),
    ({"plugin": "sft", "group": "<b>x</b>"}, "invalid group name"),
    ({"plugin": "sft", "tags": ["../x"]}, "invalid tag name"),
    ({"plugin": "sft", "experiment": "a/b"}, "invalid experiment name"),
    ({"plugin": "sft", "lr": 1}, "unknown key `lr` in the job"),
    ({"plugin": "sft", "then_eval": {"plugin": "eval-perplexity", "sets": {}}}, "unknown key `then_eval.sets`"),
    ({"plugin": "sft", "time_limit": 3, "time_limit_min": 3}, "give time_limit or time_limit_min, not both"),
    ({"plugin": ""}, "which plugin?"),
    ({}, "`plugin` is missing"),
])
def test_a_wrong_spec_is_named_and_queues_nothing(sws, data, message):
    with pytest.raises(LabError, match=re.escape(message)):
        runs.submit(sws, data)
    assert runs.list_jobs(sws) == []


def test_an_older_job_without_a_stored_spec_is_read_back_from_its_columns(sws):
    from sqlalchemy import update

    from lab.db import session
    from lab.tables import Job

    job_id = runs.submit(sws, FULL)
    with session(sws) as s:
        s.execute(update(Job).where(Job.id == job_id).values(spec=None))
    legacy = runs.spec_of(sws, job_id)
    full = JobSpec.of(FULL)
    for name in jobspec.FIELDS:
        if name not in ("params", "then_eval"):  # those are stored resolved (every default) in the columns
            assert getattr(legacy, name) == getattr(full, name), name
    assert legacy.params["max_steps"] == 3 and legacy.then_eval.params["limit"] == 2


def test_a_config_file_written_before_the_spec_still_loads(tmp_path):
    (tmp_path / "old.yaml").write_text("plugin: sft\ntime_limit: 5\nreport_to: [tensorboard, mlflow]\n")
    spec = JobSpec.of(run_config.load(tmp_path / "old.yaml").spec)
    assert (spec.time_limit_min, spec.report_to) == (5.0, "tensorboard,mlflow")


def test_job_json_records_the_spec_and_its_command(sws, jobs_worker):
    job_id = runs.submit(sws, {"plugin": "instant", "params": {"steps": 2}, "tags": ["t"], "priority": 1})
    jobs_worker().serve(until_empty=True)
    job = runs.get_job(sws, job_id)
    assert job["status"] == "completed", job["log_tail"]
    from pathlib import Path

    record = json.loads((Path(job["run_dir"]) / "job.json").read_text())
    assert JobSpec.of(record["spec"]) == runs.spec_of(sws, job_id)
    assert record["command"] == "lab run instant --experiment default --set steps=2 --priority 1 --tag t"
    again = lab_cli("run", "--from-job-json", str(Path(job["run_dir"]) / "job.json"), check=True)
    assert runs.spec_of(sws, int(again.stdout.split()[-1])) == runs.spec_of(sws, job_id)
