"""The `lab` command as a user runs it: the contract's names, --json, one clear line for bad input."""

from __future__ import annotations

import json

import pytest
from conftest import lab_cli, write_jsonl

from lab import runs


def _listed_jobs(s) -> list:
    return runs.list_jobs(s)


def test_whole_flow_from_the_command_line(ws, tmp_path, tiny_model_dir, jobs_worker):
    lab_cli("models", "add", "tiny", str(tiny_model_dir), check=True)
    rows = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]
    added = lab_cli("datasets", "add", "sums", str(write_jsonl(tmp_path / "sums.jsonl", rows)), check=True)
    assert "2 rows, format prompt_completion" in added.stdout
    done = lab_cli("run", "sft", "--model", "tiny", "--dataset", "sums", "--experiment", "cli", "--set",
                   "max_steps=3", "--wait", check=True)
    job_id = int(done.stdout.split()[0])
    assert "registered as model sft-" in done.stderr
    listed = json.loads(lab_cli("jobs", "list", "--json", check=True).stdout)
    assert [(j["id"], j["status"], j["experiment"]) for j in listed] == [(job_id, "completed", "cli")]
    shown = json.loads(lab_cli("jobs", "show", str(job_id), "--json", check=True).stdout)
    assert shown["params"]["max_steps"] == 3 and shown["exit_code"] == 0
    assert "[lab] step 3/3" in lab_cli("jobs", "logs", str(job_id), check=True).stdout
    model = json.loads(lab_cli("models", "show", shown["output_model"], "--json", check=True).stdout)
    assert (model["kind"], model["base_model"], model["job_id"]) == ("adapter", "tiny", job_id)
    assert {m["name"] for m in json.loads(lab_cli("models", "list", "--json", check=True).stdout)} == {
        "tiny", shown["output_model"]}
    ds = json.loads(lab_cli("datasets", "show", "sums", "--rows", "1", "--json", check=True).stdout)
    assert ds["preview"] == [rows[0]]
    assert json.loads(lab_cli("datasets", "list", "--json", check=True).stdout)[0]["rows"] == 2
    assert "learning_rate" in lab_cli("plugins", "show", "sft", check=True).stdout
    assert "sft" in {p["id"] for p in json.loads(lab_cli("plugins", "list", "--json", check=True).stdout)["plugins"]}


def test_wait_exits_non_zero_when_the_job_fails(ws, jobs_worker):
    done = lab_cli("run", "failing", "--wait")
    assert done.returncode == 1
    assert "failed (plugin_error): RuntimeError: boom from the plugin" in done.stderr
    assert "next step: the traceback is at the end of the run's log.txt" in done.stderr
    assert "last lines of its log" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope"], "unknown plugin 'nope'"),
        (["run", "sft", "--dataset", "x"], "plugin sft needs a model"),
        (["run", "sft", "--model", "ghost", "--dataset", "x"], "no model named 'ghost'"),
        (["run", "instant", "--set", "steps=-4"], "`steps`: Input should be greater than or equal to 0"),
        (["run", "instant", "--set", "steps"], "--set expects key=value"),
        (["run", "instant", "--set", "colour=red"], "unknown parameter `colour`"),
        (["run", "instant", "--experiment", "../up"], "invalid experiment name"),
        (["run", "instant", "--model", "m"], "plugin instant takes no model"),
        (["jobs", "show", "77"], "no job 77"),
        (["jobs", "cancel", "77"], "no job 77"),
        (["jobs", "show", "100000000000000000000"], "a number is too large for the database"),
        (["jobs", "cancel", "100000000000000000000"], "a number is too large for the database"),
        (["datasets", "add", "x", "/no/such.jsonl"], "no such file"),
        (["datasets", "show", "x"], "no dataset named 'x'"),
        (["models", "add", "m", "/no/such/folder"], "no such folder"),
        (["models", "show", "smollm2-135m-instruct"], "hint: run `lab models starter`"),
    ],
)
def test_bad_input_is_one_clear_line_and_queues_nothing(ws, args, message):
    done = lab_cli(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert _listed_jobs(ws) == []


def test_a_dataset_in_the_wrong_format_is_refused_before_queueing(ws, tmp_path, tiny_model_dir):
    lab_cli("models", "add", "tiny", str(tiny_model_dir), check=True)
    lab_cli("datasets", "add", "spam", str(write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": "x"}])),
            check=True)
    done = lab_cli("run", "sft", "--model", "tiny", "--dataset", "spam")
    assert done.returncode == 2
    expected = ("dataset spam is in classification format (columns text, label); plugin sft accepts chat, alpaca, "
                "prompt_completion: chat (missing messages); alpaca (missing instruction, output); prompt_completion "
                "(missing prompt, completion)")
    assert expected in done.stderr.replace("\n", " ")
    assert _listed_jobs(ws) == []


def test_bad_rows_are_reported_by_the_cli_and_nothing_is_registered(ws, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    done = lab_cli("datasets", "add", "bad", str(path))
    assert done.returncode == 2
    assert "line 2: `output` is missing" in done.stderr
    assert json.loads(lab_cli("datasets", "list", "--json").stdout) == []


def test_worker_once_with_an_empty_queue_returns(ws, jobs_worker):
    done = lab_cli("worker", "--once", check=True)
    assert "stopped after 0 job(s)" in done.stdout


def test_cancel_and_priority_from_the_command_line(ws):
    first = int(lab_cli("run", "instant", check=True).stdout)
    second = int(lab_cli("run", "instant", "--priority", "1", check=True).stdout)
    assert [j["queue_position"] for j in sorted(_listed_jobs(ws), key=lambda j: j["id"])] == [2, 1]
    lab_cli("jobs", "priority", str(first), "5", check=True)
    assert {j["id"]: j["queue_position"] for j in _listed_jobs(ws)} == {first: 1, second: 2}
    assert "cancelled" in lab_cli("jobs", "cancel", str(first), check=True).stdout
    assert lab_cli("jobs", "cancel", str(first)).returncode == 2


def test_workspace_option_wins_over_the_environment(ws, tmp_path):
    other = tmp_path / "elsewhere"
    lab_cli("run", "instant", "--workspace", str(other), check=True)
    assert (other / "lab.db").exists()
    assert _listed_jobs(ws) == []


def test_a_run_is_repeated_from_its_job_json(ws, jobs_worker):
    first = int(lab_cli("run", "instant", "--experiment", "again", "--set", "steps=2", "--wait", check=True)
                .stdout.split()[0])
    record = f"{runs.get_job(ws, first)['run_dir']}/job.json"
    second = int(lab_cli("run", "--from-job-json", record, "--wait", check=True).stdout.split()[0])
    a, b = runs.get_job(ws, first), runs.get_job(ws, second)
    assert second != first and b["status"] == "completed"
    assert (b["plugin"], b["experiment"], b["params"]) == (a["plugin"], a["experiment"], a["params"])
    assert lab_cli("run", "--from-job-json", "/no/job.json").returncode == 2


def test_the_train_page_s_command_line_queues_the_same_job_and_its_evaluation(ws, tmp_path, tiny_model_dir):
    import shlex

    from lab import datasets, jobspec, jobstore, registry
    from lab.jobspec import JobSpec

    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}] * 4))
    follow = {"plugin": "eval-perplexity", "dataset": "facts", "params": {"limit": 3}}
    line = jobspec.command_line(JobSpec(plugin="sft", params={"max_steps": 2}, model="tiny", dataset="facts",
                                        experiment="cmd", priority=3, max_attempts=2, then_eval=follow))
    assert "--then-eval eval-perplexity --eval-dataset facts --eval-set limit=3" in line
    args = shlex.split(line)
    assert args[:2] == ["lab", "run"]
    done = lab_cli(*args[1:], check=True)
    job = jobstore.get(ws, int(done.stdout.strip().splitlines()[-1]))
    assert (job.plugin, job.priority, job.max_attempts, job.params["max_steps"]) == ("sft", 3, 2, 2)
    assert job.follow_up["plugin"] == "eval-perplexity" and job.follow_up["params"]["limit"] == 3


def test_a_run_config_file_queues_its_job_and_the_command_line_overrides_it(ws, tmp_path, tiny_model_dir):
    from lab import datasets, jobstore, registry

    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}] * 4))
    config = tmp_path / "run.yaml"
    config.write_text("plugin: sft\nmodel: tiny\ndataset: facts\nexperiment: yaml\npriority: 4\nmax_attempts: 2\n"
                      "params:\n  max_steps: 10\n  learning_rate: 2.0e-4\n"
                      "then_eval: {plugin: eval-perplexity, dataset: facts, params: {limit: 2}}\n")
    done = lab_cli("run", "--config", str(config), "--set", "max_steps=3", "--priority", "1", check=True)
    job = jobstore.get(ws, int(done.stdout.strip().splitlines()[-1]))
    assert (job.plugin, job.priority, job.max_attempts) == ("sft", 1, 2)
    assert job.params["max_steps"] == 3 and job.params["learning_rate"] == 2e-4
    assert job.follow_up["plugin"] == "eval-perplexity" and job.follow_up["params"]["limit"] == 2
    assert runs.get_job(ws, job.id)["experiment"] == "yaml"
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"plugin": "sft", "model": "tiny", "dataset": "facts", "params": {"max_steps": 2}}))
    assert lab_cli("run", "--config", str(as_json)).returncode == 0

    # a sweep takes one too: the file's grid, with --grid adding an axis
    config.write_text("plugin: sft\nmodel: tiny\ndataset: facts\ngroup: from-yaml\nparams: {max_steps: 2}\n"
                      "grid: {learning_rate: [1.0e-4, 2.0e-4]}\n")
    done = lab_cli("sweep", "--config", str(config), "--grid", "lora_r=4,8", check=True)
    assert "queued 4 jobs as group from-yaml" in done.stdout
    before = len(runs.list_jobs(ws))

    # mistakes are named, and nothing is queued
    for text, message in [("plugin: sft\nmodle: tiny\n", "unknown key `modle` in bad.yaml"),
                          ("plugin: sft\npriority: high\n",
                           "`priority` in bad.yaml: priority must be a whole number, got 'high'"),
                          ("plugin: [sft\n", "bad.yaml is not valid YAML"),
                          ("- sft\n", "bad.yaml must hold a mapping of keys"),
                          ("plugin: sft\nthen_eval: {plugin: eval-perplexity, sets: {}}\n",
                           "unknown key `then_eval.sets`")]:
        (tmp_path / "bad.yaml").write_text(text)
        failed = lab_cli("run", "--config", str(tmp_path / "bad.yaml"))
        assert failed.returncode != 0 and message in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
    assert len(runs.list_jobs(ws)) == before
