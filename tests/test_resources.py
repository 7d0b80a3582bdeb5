"""Resources: a worker owns accelerators and CPU slots, claims only jobs that fit, runs several at once;
a job with processes > 1 runs data-parallel under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from lab import datasets, jobstore, registry, runs
from lab.errors import LabError


def _given(s, job_id: int) -> dict:
    return json.loads((Path(jobstore.get(s, job_id).run_dir) / "resources.json").read_text())


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_a_worker_runs_jobs_side_by_side_on_the_devices_it_owns(ws, jobs_worker):
    ids = [runs.submit(ws, "sleeping", params={"seconds": "1.5"}, devices=1) for _ in range(3)]
    cpu = runs.submit(ws, "sleeping", params={"seconds": "0.2"}, devices=0)
    assert jobs_worker(ws, gpus=["0", "1"]).serve(until_empty=True) == 4
    assert [jobstore.get(ws, i).status for i in [*ids, cpu]] == ["completed"] * 4
    first, second, third = (_given(ws, i) for i in ids)
    assert {first["devices"], second["devices"]} == {"0", "1"}, "one device each, not the same one"
    assert _overlap(first, second), "two one-device jobs fit a two-device worker at once"
    assert not (_overlap(third, first) and _overlap(third, second)), "never three on two devices"
    assert third["devices"] in ("0", "1")
    assert _given(ws, cpu)["devices"] == "", "a CPU job sees no accelerator"


def test_a_job_waits_until_a_worker_has_room_and_smaller_jobs_go_past_it(ws, jobs_worker):
    big = runs.submit(ws, "sleeping", params={"seconds": "0.2"}, devices=2, priority=5)
    small = runs.submit(ws, "sleeping", params={"seconds": "0.2"})  # devices unset: one per process on a GPU worker
    jobs_worker(ws, gpus=["3"]).serve(until_empty=True)
    assert jobstore.get(ws, big).status == "queued", "two devices do not fit a one-device worker"
    assert jobstore.get(ws, small).status == "completed" and _given(ws, small)["devices"] == "3"
    jobs_worker(ws, gpus=["0", "1"]).serve(until_empty=True)
    assert jobstore.get(ws, big).status == "completed" and _given(ws, big)["devices"] == "0,1"


def test_cpu_slots_run_cpu_jobs_side_by_side(ws, jobs_worker):
    ids = [runs.submit(ws, "sleeping", params={"seconds": "1.5"}) for _ in range(2)]
    jobs_worker(ws, slots=2).serve(until_empty=True)
    a, b = (_given(ws, i) for i in ids)
    assert _overlap(a, b)
    assert a["devices"] is None, "a worker that owns no accelerators leaves the environment alone"


@pytest.mark.parametrize("kwargs, message", [
    ({"processes": 2}, "runs in one process"),
    ({"processes": 0}, "processes must be a whole number from 1 to 64"),
    ({"devices": -1}, "devices must be a whole number from 0 to 64"),
    ({"devices": "2"}, "devices must be a whole number"),
])
def test_impossible_resource_requests_are_refused_before_queueing(ws, kwargs, message):
    with pytest.raises(LabError, match=message):
        runs.submit(ws, "sleeping", params={"seconds": "1"}, **kwargs)
    assert runs.list_jobs(ws) == []


def test_devices_and_processes_must_agree(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}]))
    with pytest.raises(LabError, match="one process per device"):
        runs.submit(ws, "sft", model="tiny", dataset="facts", devices=1, processes=2)
    assert runs.list_jobs(ws) == []


def test_a_two_process_sft_runs_data_parallel_and_saves_one_output(ws, tiny_model_dir, tmp_path, jobs_worker):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    rows = [{"prompt": f"Say {w}", "completion": w} for w in ("red", "green", "blue", "amber")] * 4
    datasets.add(ws, "colours", write_jsonl(tmp_path / "colours.jsonl", rows))
    job_id = runs.submit(ws, "sft", model="tiny", dataset="colours", processes=2,
                         params={"max_steps": "4", "batch_size": "2", "precision": "fp32", "logging_steps": "1"})
    jobs_worker().serve(once=True)
    job = runs.get_job(ws, job_id)
    log = (Path(job["run_dir"]) / "log.txt").read_text()
    assert job["status"] == "completed", log[-3000:]
    for rank in (0, 1):
        assert f"[lab] rank {rank} of 2: data-parallel training (gloo), trainer world size 2" in log
        assert f"[lab] rank {rank} of 2 started" in log
    assert "[lab] rank 1 of 2 finished" in log
    assert log.count("[lab] saved adapter") == 1, "rank 0 alone saves"
    assert (Path(job["run_dir"]) / "output" / "adapter_config.json").is_file()
    assert job["output_model"] == f"sft-{job_id}" and job["processes"] == 2
    steps = [s for s, _, _ in runs.metrics(ws, [job_id], ["loss"])[job_id]["loss"]]
    assert steps == [1, 2, 3, 4], "metrics recorded once, by rank 0"
    assert json.loads((Path(job["run_dir"]) / "job.json").read_text())["processes"] == 2
