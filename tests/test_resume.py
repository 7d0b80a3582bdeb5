"""Every trainer survives a stop: a stopped worker's job checkpoints at its step boundary, goes back to the queue and
resumes there, with each step's loss recorded once; checkpoints also come by time; PPO, which cannot resume,
takes no retries."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import wait_until, write_jsonl
from test_stages import CORPUS, QUESTIONS, preference_rows, spam_rows

from lab import datasets, jobstore, registry, runs
from lab.errors import LabError

FACTS = [{"prompt": "What is the capital of France?", "completion": "Paris"}] * 8

# per method: its dataset, and parameters that make each step short; enough steps that the stop (asked for at step
# 3, seen within a heartbeat) comes well before the end (about 10 steps a second here, unloaded)
METHODS = {
    "sft": ("facts", {"max_steps": 100, "batch_size": 2}),
    "pretrain": ("corpus", {"max_steps": 100, "block_size": 16, "batch_size": 2}),
    "classify": ("spam", {"max_steps": 100, "batch_size": 2}),
    "reward": ("pairs", {"max_steps": 100, "batch_size": 2}),
    "dpo": ("pairs", {"max_steps": 80, "batch_size": 2}),
    "kto": ("pairs", {"max_steps": 80, "batch_size": 2}),
    "orpo": ("pairs", {"max_steps": 80, "batch_size": 2}),
    "grpo": ("qa", {"max_steps": 60, "batch_size": 2, "num_generations": 2, "max_completion_length": 4,
                    "length_target": 4}),
}


@pytest.fixture
def lab(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", FACTS))
    datasets.add(ws, "pairs", write_jsonl(tmp_path / "pairs.jsonl", preference_rows(40)))
    datasets.add(ws, "spam", write_jsonl(tmp_path / "spam.jsonl", spam_rows(40)))
    datasets.add(ws, "qa", write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "completion": "yes"} for q in QUESTIONS]))
    (tmp_path / "corpus.txt").write_text(CORPUS * 20)
    datasets.add(ws, "corpus", tmp_path / "corpus.txt")
    return ws


@pytest.mark.parametrize(("plugin", "processes"), [(p, 1) for p in METHODS] + [("sft", 2)])  # 2: under torchrun
def test_a_stopped_worker_checkpoints_its_job_which_then_resumes_there(lab, plugin, processes, jobs_worker):
    dataset, params = METHODS[plugin]
    params = {**params, "precision": "fp32", "save_minutes": 0, "logging_steps": 1}
    job_id = runs.submit(lab, plugin, model="tiny", dataset=dataset, processes=processes,
                         params={k: str(v) for k, v in params.items()})  # one attempt: a stop does not use it up
    worker = jobs_worker(lab)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        wait_until(lambda: jobstore.get(lab, job_id).step >= 3, 180, "three steps")
        worker.stop.set()  # as `lab serve` or a worker does on SIGTERM / Ctrl-C
        thread.join(120)
        assert not thread.is_alive()
    finally:
        worker.stop.set()
    job = runs.get_job(lab, job_id)
    assert job["status"] == "queued", job
    run_dir = Path(job["run_dir"])
    log = (run_dir / "log.txt").read_text()
    assert "asked to stop: saving checkpoint-" in log, log[-3000:]
    saved = int(log.split("asked to stop: saving checkpoint-")[1].split()[0])
    assert (run_dir / "checkpoints" / f"checkpoint-{saved}" / "trainer_state.json").is_file()
    assert saved < params["max_steps"], "stopped before the end"

    jobs_worker(lab).serve(once=True)
    job = runs.get_job(lab, job_id)
    assert job["status"] == "completed", f"{job['error']}\n{job['log_tail']}"
    assert job["attempts"] == 1, "the start its stopped worker ended does not count as an attempt"
    log = (run_dir / "log.txt").read_text()
    assert f"resuming from checkpoint-{saved}" in log
    after = log.split(f"resuming from checkpoint-{saved}")[1]
    assert f"[lab] step {saved + 1}/" in after and "[lab] step 1/" not in after, "the steps go on from the checkpoint"
    steps = [s for s, _, _ in runs.metrics(lab, [job_id], ["loss"])[job_id]["loss"]]
    assert steps == list(range(1, params["max_steps"] + 1)), "each step's loss once"
    assert registry.info(lab, job["output_model"])["job_id"] == job_id


def test_checkpoints_come_by_time_without_save_steps_and_only_the_newest_are_kept(lab, jobs_worker):
    job_id = runs.submit(lab, "sft", model="tiny", dataset="facts",
                         params={"max_steps": "30", "batch_size": "2", "precision": "fp32", "save_minutes": "0.0005"})
    jobs_worker(lab).serve(once=True)
    job = runs.get_job(lab, job_id)
    assert job["status"] == "completed", job["error"]
    kept = sorted(p.name for p in (Path(job["run_dir"]) / "checkpoints").glob("checkpoint-*"))
    assert 1 <= len(kept) <= 2, kept  # every 30 ms of training; the two newest are kept


def test_ppo_cannot_resume_so_it_takes_no_retries(lab):
    with pytest.raises(LabError, match="cannot resume from a checkpoint"):
        runs.submit(lab, "ppo", model="tiny", dataset="pairs", params={"reward_model": "tiny"}, max_attempts=2)
    assert runs.list_jobs(lab) == []


def test_a_job_past_its_time_limit_writes_a_checkpoint_and_fails_as_timeout(lab, jobs_worker):
    job_id = runs.submit(lab, "sft", model="tiny", dataset="facts", time_limit_min=0.3,
                         params={"max_steps": "100000", "batch_size": "2", "precision": "fp32"})
    assert runs.get_job(lab, job_id)["time_limit_min"] == pytest.approx(0.3)
    jobs_worker(lab).serve(once=True)
    job = runs.get_job(lab, job_id)
    assert job["status"] == "failed" and job["failure"] == "timeout", job
    assert "time limit of 0.3 minutes" in job["error"] and "raise the time limit" in job["next_step"]
    saved = job["error"].split("its last checkpoint is ")[1]
    log = (Path(job["run_dir"]) / "log.txt").read_text()
    assert f"asked to stop: saving {saved}" in log, log[-3000:]
    # under a loaded machine the limit can come after the first step only: the checkpoint is that of the last step
    assert f"[lab] step {saved.split('-')[1]}/" in log, log[-3000:]
    assert (Path(job["run_dir"]) / "checkpoints" / saved / "trainer_state.json").is_file()
    assert job["attempts"] == 1 and job["output_model"] is None


@pytest.mark.parametrize("minutes", [0, -1, float("nan"), 60 * 24 * 31, True])
def test_a_time_limit_outside_its_range_is_refused_and_nothing_is_queued(lab, minutes):
    with pytest.raises(LabError, match="time limit must be a number of minutes"):
        runs.submit(lab, "sft", model="tiny", dataset="facts", time_limit_min=minutes)
    assert runs.list_jobs(lab) == []
