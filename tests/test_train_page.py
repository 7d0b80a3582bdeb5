"""The Train page's handlers without a browser: module-level functions of the page and named values (launch, sweep,
a run config, Clone's fill, the method's choice, another page sending the user here). The browser tests drive the
same handlers through Chromium."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_jsonl

from lab import datasets, jobspec, registry, run_config, runs
from lab.jobspec import JobSpec
from lab.ui import app
from lab.ui.tabs import train


@pytest.fixture
def page(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}] * 4))
    datasets.add(ws, "prefs", write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4))
    _, ui = app.assemble(ws)
    return ui.train


def named(page: train.TrainPage, spec: JobSpec) -> dict:
    """The values the page holds once `spec` is in the form (what Clone puts there)."""
    v = train.filled(spec, page.forms, page.default_trackers, None)
    return {**v, "experiment": spec.experiment}


def value(update):
    return update["value"] if isinstance(update, dict) else update


def test_launch_queues_the_form_and_opens_its_run(page):
    spec = JobSpec.of({"plugin": "sft", "model": "tiny", "dataset": "facts", "params": {"max_steps": 3},
                       "tags": ["a"], "priority": 4})
    out = train.launch(page, named(page, spec))
    assert out["message"] == "" and out["tabs"]["selected"] == "run"
    assert runs.spec_of(page.ui.settings, out["run_job"]) == spec


@pytest.mark.parametrize(("change", "words"), [
    ({"model": ""}, "pick a base model"),
    ({"dataset": None}, "pick a dataset"),
    ({"priority": 1.5}, "priority"),
    ({"eval_params": "limit"}, "key=value"),
])
def test_a_wrong_form_queues_nothing_and_says_why(page, change, words):
    spec = JobSpec.of({"plugin": "sft", "model": "tiny", "dataset": "facts",
                       "then_eval": {"plugin": "eval-perplexity"}})
    out = train.launch(page, {**named(page, spec), **change})
    assert "Nothing was queued" in out["message"] and words in out["message"], out["message"]
    assert set(out) == {"message"} and runs.list_jobs(page.ui.settings) == []


def test_a_wrong_parameter_in_the_form_is_named(page):
    spec = JobSpec.of({"plugin": "sft", "model": "tiny", "dataset": "facts"})
    v = named(page, spec)
    form = page.forms["sft"]
    v["held"]["sft"][form.names.index("learning_rate")] = -1
    out = train.launch(page, v)
    assert "learning_rate" in out["message"] and runs.list_jobs(page.ui.settings) == []


def test_html_in_a_text_field_is_shown_as_text(page):
    v = {**named(page, JobSpec.of({"plugin": "sft", "model": "tiny", "dataset": "facts"})),
         "dataset": "<img src=x onerror=alert(1)>"}
    out = train.launch(page, v)
    assert "<img" not in out["message"] and "&lt;img" in out["message"]


def test_a_sweep_queues_every_combination_as_one_group_and_opens_compare(page):
    spec = JobSpec.of({"plugin": "sft", "model": "tiny", "dataset": "facts", "params": {"max_steps": 2}})
    out = train.sweep(page, {**named(page, spec), "grid": "learning_rate=1e-4,2e-4\n\nlora_r=4,8"})
    group = value(out["compare_group"])
    jobs = runs.list_jobs(page.ui.settings, group=group)
    assert len(jobs) == 4 and len(value(out["compare_runs"])) == 4 and out["tabs"]["selected"] == "compare"
    out = train.sweep(page, {**named(page, spec), "grid": "learning_rate=oops"})
    assert "Nothing was queued" in out["message"] and len(runs.list_jobs(page.ui.settings)) == 4


def test_clone_puts_a_spec_back_in_the_form_exactly(page):
    spec = JobSpec.of({"plugin": "dpo", "model": "tiny", "dataset": "prefs", "params": {"beta": 0.2, "max_steps": 3},
                       "then_eval": {"plugin": "eval-perplexity", "dataset": "facts", "params": {"limit": 2}},
                       "memory_gb": 3.0, "report_to": "tensorboard", "group": "g", "tags": ["x", "y"]})
    out = page.fill(spec, None)
    assert value(out["plugin"]) == "dpo" and value(out["dpo.beta"]) == 0.2
    assert "facts" in out["eval_dataset"]["choices"]  # the follow-up's datasets offered with its value
    # the values the fill sets, read back as the page would send them, are the same spec
    v = {n: value(out[n]) for n in train.NAMED if n in out}
    v["eval_dataset"] = value(out["eval_dataset"])
    v["held"] = {"dpo": [value(out[f"dpo.{n}"]) for n in page.forms["dpo"].names]}
    assert train.launch(page, {**v, "experiment": spec.experiment})["message"] == ""
    assert runs.spec_of(page.ui.settings, runs.list_jobs(page.ui.settings)[0]["id"]) == spec


def test_a_run_config_is_saved_and_loaded_back(page, tmp_path):
    spec = JobSpec.of({"plugin": "sft", "model": "tiny", "dataset": "facts", "params": {"max_steps": 3}})
    out = train.save_config(page, {**named(page, spec), "grid": "lora_r=4,8"})
    (tmp_path / "x.yaml").write_text(Path(out["config_out"]).read_text())
    loaded = run_config.load(out["config_out"])
    assert JobSpec.of(loaded.spec) == spec and loaded.grid == {"lora_r": [4, 8]}
    out = train.save_config(page, {**named(page, spec), "grid": "lora_r=4,many"})
    assert "lora_r" in out["message"] and out["config_out"] is None
    # a path on the server is not an upload: the form is left alone
    out = train.load_config(page, {"load_config": str(tmp_path / "x.yaml"), "held": None})
    assert set(out) == {"message"} and "The form was not changed" in out["message"]


def test_choosing_a_method_shows_its_form_and_what_it_reads(page):
    out = train.choose_plugin(page, {"plugin": "dpo", "dataset": "facts", "model": "tiny"})
    shown = [n for n in out if n.startswith("form:") and out[n]["visible"]]
    assert shown == ["form:dpo"]
    assert out["dataset"]["choices"] == ["prefs"] and out["dataset"]["value"] == "prefs"  # the only one it reads
    assert out["model"]["value"] == "tiny"


def test_another_page_opens_train_on_a_method_and_its_data(page):
    out = page.open_with("reward", "prefs", "tiny")
    assert (out["plugin"], value(out["dataset"]), value(out["model"])) == ("reward", "prefs", "tiny")
    assert out["tabs"]["selected"] == "train"
    assert "model" in page.open_with("dpo", "prefs", "not-registered") and page.open_with(
        "dpo", "prefs", "not-registered")["model"].get("value") is None


def test_the_command_line_shown_is_the_specs(page):
    spec = JobSpec.of({"plugin": "sft", "model": "tiny", "dataset": "facts", "params": {"max_steps": 3}})
    out = train.command_and_estimate(page, named(page, spec))
    assert out["command"] == jobspec.command_line(spec) and "at the worst step" in out["estimate"]
    assert train.command_and_estimate(page, {"plugin": None}) == {"command": "", "estimate": ""}


def test_an_event_reads_the_components_by_name_and_answers_its_outputs(page):
    """The wiring: Gradio's {component: value} to named values and back (the forms' fields win over `held`)."""
    run, sent, outputs = page.event(train.launch, list(train.NAMED), ["message", "tabs", "run_job"], with_fields=True)
    data = {c: c.value for c in sent}
    data.update({page.w["model"]: "tiny", page.w["dataset"]: "facts", page.w["held"]: {}})
    data[page.component("sft.max_steps")] = 2
    out = run(data)
    assert set(out) <= set(outputs) and out[page.component("message")] == ""
    assert runs.spec_of(page.ui.settings, out[page.component("run_job")]).params["max_steps"] == 2
