"""A failed job says what kind of failure it was, why, and what to do next; a diverged run is never called
completed and its output never registered; the NaN it logged is kept, not dropped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import lab_cli, write_jsonl
from safetensors.torch import save_file

from jobs.runner import check_finite
from jobs.worker import Worker
from lab import datasets, registry, runs
from lab.diagnosis import Failure, diagnose
from lab.errors import DataError, Diverged
from lab.outcome import from_exit

FACTS = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(16)]


def run_to_end(s, plugin, **kw) -> dict:
    job_id = runs.submit(s, plugin, **kw)
    Worker(s, say=lambda m: None).serve(once=True)
    return runs.get_job(s, job_id)


@pytest.mark.parametrize(("how", "kind", "reason", "step"), [
    ("torch_oom", "oom", "ran out of memory", "lower batch_size or max_length"),
    ("memory", "oom", "ran out of memory", "lower batch_size or max_length"),
    ("missing_module", "dependency", "`lab_no_such_package` is not installed", "pip install lab_no_such_package"),
    ("data", "data", "every row lost its reply to max_length=8", "raise max_length"),
    ("error", "plugin_error", "RuntimeError: boom from the plugin", "traceback"),
])
def test_each_failure_of_the_job_process_gets_its_kind_reason_and_next_step(ws, how, kind, reason, step, jobs_worker):
    job = run_to_end(ws, "failing", params={"how": how})
    assert job["status"] == "failed"
    assert job["failure"] == kind and reason in job["error"] and step in job["next_step"], job
    assert f"[lab] failed ({kind})" in (Path(job["run_dir"]) / "log.txt").read_text()


def test_a_signal_from_outside_is_named_and_a_lost_lease_too():
    assert from_exit(-9, None).kind == "killed" and "SIGKILL" in from_exit(-9, None).reason
    assert from_exit(-9, None, oom_killed=True).kind == "oom"
    assert from_exit(-15, None, oom_killed=True).kind == "killed", "only a SIGKILL is the OOM killer's"
    assert from_exit(None, "lost").kind == "lost"
    assert from_exit(0, None) is None
    assert diagnose(OSError(28, "No space left on device")).kind == "disk_full"
    chained = RuntimeError("writing failed")
    chained.__cause__ = DataError("two labels needed")
    assert diagnose(chained) == Failure("data", "two labels needed",
                                        "fix the dataset or the length limits and launch again")


def test_the_cli_and_the_api_show_the_failure_first(ws, jobs_worker):
    job = run_to_end(ws, "failing", params={"how": "missing_module"})
    shown = lab_cli("jobs", "show", str(job["id"])).stdout
    lines = [line.strip() for line in shown.splitlines()]
    assert lines[0].startswith("failure: dependency") and lines[1].startswith("reason: the Python module")
    assert lines[2].startswith("next step: install it")
    listed = json.loads(lab_cli("jobs", "list", "--json").stdout)[0]
    assert listed["failure"] == "dependency" and "pip install" in listed["next_step"]


def test_a_diverging_learning_rate_fails_the_run_as_diverged_and_registers_nothing(ws, tiny_model_dir, tmp_path,
                                                                                   jobs_worker):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", FACTS))
    blow_up = {"optim": "sgd", "learning_rate": 1e30, "max_grad_norm": 0, "lr_scheduler_type": "constant"}
    job = run_to_end(ws, "sft", model="tiny", dataset="facts",
                     params={"use_lora": "false", "max_steps": "30", "batch_size": "4", "precision": "fp32",
                             "extra_args": json.dumps(blow_up)})
    assert job["status"] == "failed" and job["failure"] == "diverged", job
    assert "training diverged at step" in job["error"] and "lower the learning rate" in job["next_step"]
    assert job["output_model"] is None and [m["name"] for m in registry.list_all(ws)] == ["tiny"]
    at = int(job["error"].split("at step ")[1].split(":")[0])
    points = runs.metrics(ws, [job["id"]], ["grad_norm", "loss"])[job["id"]]
    last = {key: values[-1] for key, values in points.items()}
    assert last["grad_norm"][0] == at, "the run stopped at the first non-finite value"
    assert last["grad_norm"][1] is None or not math.isfinite(last["grad_norm"][1]), "the NaN is recorded, not dropped"
    assert max(step for key in points for step, _, _ in points[key]) == at, "no step after it was trained"


def test_weights_that_are_not_finite_are_never_registered(ws, tiny_model_dir, tmp_path, jobs_worker):
    bad = nan_model(tiny_model_dir, tmp_path / "bad")
    with pytest.raises(Diverged, match="5 NaN or infinite values"):
        check_finite(bad)
    check_finite(tiny_model_dir)  # a healthy folder passes

    job = run_to_end(ws, "modelmaker", params={"source": str(bad)})
    assert job["status"] == "failed" and job["failure"] == "diverged" and "not registered" in job["error"]
    assert job["output_model"] is None and registry.list_all(ws) == []


def test_a_nan_metric_is_stored_and_read_back_as_null_and_an_infinity_as_itself(ws, jobs_worker):
    from lab.sdk import RunContext

    job = run_to_end(ws, "failing", params={"how": "error"})
    ctx = RunContext(settings=ws, job_id=job["id"], plugin="failing", experiment="default",
                     run_dir=Path(job["run_dir"]))
    ctx.log_metrics(7, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1, "flag": True})
    points = runs.metrics(ws, [job["id"]])[job["id"]]
    assert points["loss"][0][:2] == [7, None] and points["grad_norm"][0][:2] == [7, math.inf]
    assert points["lr"][0][:2] == [7, 0.1] and "flag" not in points
    from lab.ui.tabs.run import failure

    shown = failure({**runs.get_job(ws, job["id"])}, points)
    assert "grad_norm inf at step 7" in shown and "loss NaN at step 7" in shown
    assert "This run failed: plugin_error (the plugin failed)." in shown


def test_an_empty_tensor_file_is_finite(tmp_path):
    save_file({"w": torch.zeros(0)}, tmp_path / "model.safetensors")
    check_finite(tmp_path)


def nan_model(source: Path, folder: Path) -> Path:
    """A copy of `source` with 5 of its weights made NaN."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(source, folder)
    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[:5] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def test_nan_before_the_first_update_does_not_blame_the_learning_rate(ws, tiny_model_dir, tmp_path, jobs_worker):
    registry.add_folder(ws, "broken", nan_model(tiny_model_dir, tmp_path / "broken"))
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", FACTS))
    job = run_to_end(ws, "sft", model="broken", dataset="facts", params={"max_steps": "5", "precision": "fp32"})
    assert job["failure"] == "diverged" and "at step 1:" in job["error"], job
    assert "learning rate is not the cause" in job["next_step"] and "lower the learning rate" not in job["next_step"]


LONG = " ".join(["word"] * 300)  # far past max_length=64 with the tiny tokenizer


def long_pairs(where: str, n: int = 20) -> list[dict]:
    """Preference pairs with a long prompt or a long chosen answer: every row (`where`), or every other one."""
    rows = []
    for i in range(n):
        long = i % 2 == 0 if where.startswith("half") else True
        side = where.split("-")[-1]
        rows.append({"prompt": LONG if long and side == "prompt" else "How do I boil an egg?",
                     "chosen": LONG if long and side == "chosen" else "Put it in boiling water.", "rejected": "No."})
    return rows


@pytest.mark.parametrize(("plugin", "where", "rule"), [
    ("orpo", "chosen", "an answer is cut to nothing"),  # ORPO would train on NaN (log-probability of no token)
    ("dpo", "prompt", "the prompt alone fills max_length"),  # DPO drops them: an empty sampler
    ("reward", "prompt", "longer than max_length"),  # the reward trainer drops them: an empty sampler
    ("kto", "prompt", "the prompt alone fills max_length"),  # KTO would learn from no answer token at all
])
def test_pairs_that_max_length_leaves_nothing_to_learn_fail_as_data_naming_max_length(
        ws, tiny_model_dir, tmp_path, monkeypatch, plugin, where, rule, jobs_worker):
    """At run time: the check before queueing reads the first rows of a large dataset only (here 4 of 20), so
    the job itself must find that nothing is left."""
    from lab import preview

    monkeypatch.setattr(preview, "TRUNCATION_SAMPLE", 4)
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "long", write_jsonl(tmp_path / "long.jsonl", long_pairs(where)))
    job = run_to_end(ws, plugin, model="tiny", dataset="long",
                     params={"max_steps": "3", "max_length": "64", "batch_size": "2", "eval_split": "0"}
                     if plugin in ("dpo", "reward") else {"max_steps": "3", "max_length": "64", "batch_size": "2"})
    assert job["status"] == "failed" and job["failure"] == "data", job
    assert "max_length=64" in job["error"] and rule in job["error"] and "raise max_length" in job["next_step"]
    assert job["output_model"] is None


@pytest.mark.parametrize("plugin", ["orpo", "kto", "dpo"])
def test_some_pairs_lost_to_max_length_are_named_and_the_rest_trains_finite(ws, tiny_model_dir, tmp_path, plugin,
                                                                            jobs_worker):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    where = "half-chosen" if plugin == "orpo" else "half-prompt"
    datasets.add(ws, "long", write_jsonl(tmp_path / "long.jsonl", long_pairs(where)))
    job = run_to_end(ws, plugin, model="tiny", dataset="long",
                     params={"max_steps": "3", "max_length": "64", "batch_size": "2", "precision": "fp32"})
    assert job["status"] == "completed", job
    unit = "examples" if plugin == "kto" else "pairs"  # kto trains on each answer alone
    assert f"{10 if plugin != 'kto' else 20} of {20 if plugin != 'kto' else 40} {unit} are not trained on" \
        in job["log_tail"]
    loss = [v for _, v, _ in runs.metrics(ws, [job["id"]], ["loss"])[job["id"]]["loss"]]
    assert len(loss) == 3 and all(v is not None and math.isfinite(v) for v in loss), loss
