"""Jobs through Slurm: a worker with `--executor slurm` submits with sbatch, follows with squeue, records what Slurm's
accounting says, cancels with scancel, spreads a job over nodes with srun + torchrun, and hands its jobs to the next
worker when it stops. Against a real single-node Slurm cluster started here (lab.slurmcluster), except the first
tests, which check the sbatch command and the meaning of Slurm's states on their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import wait_for_status, wait_until, write_jsonl

from jobs.slurm_supervise import ending
from jobs.worker import Worker, probe_cluster
from lab import datasets, jobspec, jobstore, outcome, registry, runs, slurm
from lab.errors import LabError
from lab.pgserver import free_port
from lab.slurm import Seen, sbatch_args
from lab.tables import Job

ROWS = [{"prompt": f"Say {w}", "completion": w} for w in ("red", "green", "blue", "amber")] * 4
SFT = {"max_steps": "4", "batch_size": "2", "precision": "fp32", "logging_steps": "1"}


# --- the sbatch command and the meaning of Slurm's states (no cluster) -----------------------------------------


def _job(**fields) -> Job:
    base = {"id": 7, "processes": 1, "nodes": 1, "devices": None, "time_limit_s": None, "memory_gb": None,
            "cancel_requested": False, "attempts": 1, "max_attempts": 1}
    return Job(**{**base, **fields})


def test_the_sbatch_command_asks_for_what_the_job_needs_and_the_settings_args_come_last(ws, tmp_path):
    s = replace(ws, executor="slurm", slurm_partition="gpu", slurm_account="proj1",
                slurm_sbatch_args=("--qos=high", "--nodes=3"), slurm_cpus_per_process=4)
    job = _job(processes=2, nodes=2, devices=2, time_limit_s=90.0, memory_gb=1.5)
    args = sbatch_args(job, s, tmp_path, tmp_path / "batch.py")
    assert args[0] == "sbatch" and args[-1] == str(tmp_path / "batch.py")
    for wanted in ("--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=8", "--gres=gpu:2",
                   "--time=2", "--mem=1536M", "--partition=gpu", "--account=proj1", "--no-requeue",
                   f"--output={tmp_path / 'log.txt'}", "--open-mode=append", f"--chdir={tmp_path}"):
        assert wanted in args, wanted
    assert args.index("--nodes=3") > args.index("--nodes=2"), "the settings' own arguments win"
    plain = sbatch_args(_job(), replace(ws, executor="slurm"), tmp_path, tmp_path / "b.py")
    assert not [a for a in plain if a.startswith(("--gres", "--time", "--mem", "--partition", "--account"))]
    defaults = sbatch_args(_job(), replace(ws, slurm_time_limit_min=30, slurm_memory_gb=2), tmp_path, tmp_path)
    assert "--time=30" in defaults and "--mem=2048M" in defaults


@pytest.mark.parametrize(("seen", "log", "status", "kind", "words", "retry"), [
    (Seen("COMPLETED"), "", "completed", None, "", False),
    (Seen("COMPLETED"), "", "failed", "no_output", "wrote nothing", False),  # no output/ files
    (Seen("OUT_OF_MEMORY", nodes="n1"), "", "failed", "oom", "memory limit", False),
    (Seen("FAILED", signal=9), "slurmstepd: error: Exceeded job memory limit", "failed", "oom", "memory limit", False),
    (Seen("TIMEOUT"), "", "failed", "timeout", "time limit", False),
    (Seen("NODE_FAIL", nodes="n3"), "", "failed", "lost", "node n3 failed", True),
    (Seen("PREEMPTED"), "", "failed", "killed", "preempted", True),
    (Seen("CANCELLED", cancelled_by="1000"), "", "cancelled", "killed", "outside the lab", False),
    (Seen("FAILED", signal=11), "", "failed", "killed", "SIGSEGV", False),
    (Seen("FAILED", exit_code=1), "", "failed", "plugin_error", "exited with code 1", False),
])
def test_each_way_slurm_ends_a_job_is_named(tmp_path, seen, log, status, kind, words, retry):
    run_dir = tmp_path / "run"
    (run_dir / "output").mkdir(parents=True)
    if kind != "no_output":
        (run_dir / "output" / "model.safetensors").write_text("x")
    decided = outcome.decide(ending(seen, log, mem_mb=2048), _job(), run_dir)
    got_status, failure, retryable = decided.status, decided.failure, decided.retryable
    assert (got_status, retryable) == (status, retry)
    assert (failure.kind if failure else None) == kind
    assert words in (failure.reason if failure else "")


def test_a_multi_node_job_waits_for_a_slurm_worker_and_needs_a_data_parallel_plugin(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "colours", write_jsonl(tmp_path / "colours.jsonl", ROWS))
    with pytest.raises(LabError, match="cannot spread over nodes=2"):
        runs.submit(ws, "sleeping", nodes=2)
    with pytest.raises(LabError, match="nodes must be a whole number"):
        runs.submit(ws, "sft", model="tiny", dataset="colours", nodes=0)
    with pytest.raises(LabError, match="memory must be a number of GB"):
        runs.submit(ws, "sleeping", memory_gb=-1)
    job_id = runs.submit(ws, "sft", model="tiny", dataset="colours", nodes=2, params=SFT)
    assert "--nodes 2" in jobspec.command_line(runs.spec_of(ws, job_id))
    assert jobstore.claim_next(ws, "local:1") is None, "a local worker does not take a multi-node job"
    assert jobstore.claim_next(ws, "cluster:1", cluster=True).id == job_id


def test_the_worker_refuses_an_unknown_executor_and_unsplittable_sbatch_args(ws, jobs_worker):
    from conftest import lab_cli

    done = lab_cli("worker", "--executor", "bogus")
    assert done.returncode != 0 and "--executor must be one of local, slurm, got 'bogus'" in done.stderr
    assert "Traceback" not in done.stderr
    os.environ["LAB_SLURM_SBATCH_ARGS"] = "--comment='unclosed"
    try:
        done = lab_cli("jobs", "list")
    finally:
        del os.environ["LAB_SLURM_SBATCH_ARGS"]
    assert done.returncode != 0 and "LAB_SLURM_SBATCH_ARGS cannot be split" in done.stderr


# --- against a real Slurm ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_conf():
    from lab.slurmcluster import throwaway_cluster

    if os.geteuid() != 0:
        pytest.skip("a throwaway Slurm cluster needs root (CI runs as root)")
    with throwaway_cluster() as conf:
        yield conf


@pytest.fixture
def sws(ws, slurm_conf, monkeypatch, tiny_model_dir, tmp_path):
    """A workspace whose workers hand their jobs to the throwaway cluster, with the tiny model and a dataset."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_conf))
    monkeypatch.setenv("LAB_EXECUTOR", "slurm")
    monkeypatch.setenv("LAB_SLURM_POLL_S", "0.3")
    monkeypatch.setenv("LAB_LEASE_S", "5")
    s = replace(ws, executor="slurm", slurm_poll_s=0.3, lease_s=5.0)
    registry.add_folder(s, "tiny", tiny_model_dir)
    datasets.add(s, "colours", write_jsonl(tmp_path / "colours.jsonl", ROWS))
    return s


def _serve(s, **kwargs) -> tuple[Worker, threading.Thread]:
    worker = Worker(s, say=lambda m: None)
    thread = threading.Thread(target=worker.serve, kwargs=kwargs or {"until_empty": True}, daemon=True)
    thread.start()
    return worker, thread


def _running_in_slurm(s, job_id: int) -> str:
    """Wait until Slurm runs the job; its Slurm id."""
    job = wait_until(lambda: (lambda j: j if j.slurm_job_id and (j.slurm_state or "").startswith("RUNNING")
                              else None)(jobstore.get(s, job_id)), 90, f"job {job_id} running in Slurm")
    return job.slurm_job_id


def _completion_record(slurm_id: str) -> str:
    done = subprocess.run(["sacct", "--completion", "--noheader", "--parsable2", f"--jobs={slurm_id}",
                           "--format=JobIDRaw,State,ExitCode"], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.slurm
def test_slurm_runs_an_sft_job_and_names_how_the_others_ended(sws):
    s = sws
    sft = runs.submit(s, "sft", model="tiny", dataset="colours", params=SFT)
    hog = runs.submit(s, "sleeping", params={"seconds": 60, "hog_mb": 3000}, memory_gb=1)
    late = runs.submit(s, "sleeping", params={"seconds": 600}, time_limit_min=1)
    outside = runs.submit(s, "sleeping", params={"seconds": 600})
    inside = runs.submit(s, "sleeping", params={"seconds": 600})
    worker, thread = _serve(s)
    try:
        outside_id = _running_in_slurm(s, outside)
        _running_in_slurm(s, inside)
        subprocess.run(["scancel", outside_id], check=True)  # a user on the cluster, not through the lab
        assert jobstore.cancel(s, inside) == "cancelling"
        assert wait_for_status(s, inside, timeout=30) == "cancelled", "cancelled within seconds"
        for job_id in (sft, hog, outside):
            wait_for_status(s, job_id, timeout=180)
        wait_for_status(s, late, timeout=240)
        thread.join(60)
    finally:
        worker.stop.set()
    got = {n: runs.get_job(s, j) for n, j in [("sft", sft), ("hog", hog), ("late", late), ("outside", outside),
                                               ("inside", inside)]}
    job = got["sft"]
    log = (Path(job["run_dir"]) / "log.txt").read_text()
    assert job["status"] == "completed", log[-3000:]
    assert job["slurm_job_id"] and job["slurm_state"] == "COMPLETED" and job["node_list"]
    assert f"[lab] Slurm job {job['slurm_job_id']} on " in log and "[lab] submitting to Slurm: sbatch" in log
    assert [st for st, _, _ in runs.metrics(s, [sft], ["loss"])[sft]["loss"]] == [1, 2, 3, 4]
    assert job["output_model"] == f"sft-{sft}" and registry.info(s, job["output_model"])["kind"] == "adapter"
    assert _completion_record(job["slurm_job_id"]) == f"{job['slurm_job_id']}|COMPLETED|0:0"

    assert (got["hog"]["status"], got["hog"]["failure"]) == ("failed", "oom"), got["hog"]
    assert "memory limit of 1 GB" in got["hog"]["error"] and "--memory-gb" in got["hog"]["next_step"]
    assert (got["late"]["status"], got["late"]["failure"]) == ("failed", "timeout"), got["late"]
    assert "time limit (TIMEOUT)" in got["late"]["error"] and got["late"]["slurm_state"] == "TIMEOUT"
    assert got["outside"]["status"] == "cancelled" and "outside the lab" in got["outside"]["error"]
    assert got["inside"]["status"] == "cancelled" and got["inside"]["error"] == "cancelled by the user (scancel)"
    assert "|CANCELLED" in _completion_record(got["outside"]["slurm_job_id"])
    shown = subprocess.run([sys.executable, "-m", "lab.cli", "jobs", "show", str(sft)], capture_output=True,
                           text=True, check=True).stdout
    assert f"slurm_job_id: {job['slurm_job_id']}" in shown and "node_list: " in shown


@pytest.mark.slurm
def test_a_two_node_job_runs_one_torchrun_per_node_and_records_once(sws):
    # one node here: the cluster's own layout gives the job's two tasks to the same node (as two "nodes")
    s = replace(sws, slurm_sbatch_args=("--nodes=1", "--ntasks-per-node=2"))
    job_id = runs.submit(s, "sft", model="tiny", dataset="colours", nodes=2, params=SFT)
    worker, thread = _serve(s)
    thread.join(240)
    worker.stop.set()
    job = runs.get_job(s, job_id)
    log = (Path(job["run_dir"]) / "log.txt").read_text()
    assert job["status"] == "completed", log[-4000:]
    assert "2 tasks (srun), 1 process(es) each" in log
    for rank in (0, 1):
        assert f"[lab] rank {rank} of 2: data-parallel training (gloo), trainer world size 2" in log
    assert log.count("[lab] saved adapter") == 1, "rank 0 alone saves"
    assert [st for st, _, _ in runs.metrics(s, [job_id], ["loss"])[job_id]["loss"]] == [1, 2, 3, 4]
    assert job["nodes"] == 2


@pytest.mark.slurm
def test_a_killed_worker_leaves_its_slurm_job_running_and_the_next_worker_records_it_once(sws):
    s = sws
    job_id = runs.submit(s, "sleeping", params={"seconds": 8})
    first = subprocess.Popen([sys.executable, "-m", "lab.cli", "worker"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        slurm_id = _running_in_slurm(s, job_id)
    finally:
        first.send_signal(signal.SIGKILL)
    said = first.communicate(timeout=30)[0]
    assert "probe ok" in said, said
    assert slurm.squeue(slurm_id).state == "RUNNING", "the job goes on without its worker"
    second = subprocess.run([sys.executable, "-m", "lab.cli", "worker", "--until-empty"], capture_output=True,
                            text=True, timeout=120)
    assert f"following Slurm job {slurm_id}" in second.stdout, second.stdout + second.stderr
    job = runs.get_job(s, job_id)
    log = (Path(job["run_dir"]) / "log.txt").read_text()
    assert job["status"] == "completed" and job["slurm_job_id"] == slurm_id, log
    assert job["attempts"] == 1 and log.count("[lab] submitting to Slurm") == 1 and log.count("finished;") == 1
    assert second.stdout.count(f"job {job_id} completed") == 1


@pytest.mark.slurm
def test_the_probe_says_what_keeps_the_nodes_from_running_jobs(sws):
    said = []
    probe_cluster(sws, said.append)
    assert "probe ok: node" in said[0] and str(sws.workspace) in said[0]
    away = replace(sws, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/lab")
    os.environ["LAB_DATABASE_URL"] = away.database_url
    try:
        with pytest.raises(LabError, match="cannot reach the database"):
            probe_cluster(away, said.append)
    finally:
        del os.environ["LAB_DATABASE_URL"]
    with pytest.raises(LabError, match="sbatch refused the probe job.*invalid partition"):
        probe_cluster(replace(sws, slurm_partition="nosuch"), said.append)


@pytest.mark.slurm
def test_a_job_slurm_refuses_fails_with_slurms_words_and_nothing_runs(sws):
    s = replace(sws, slurm_partition="nosuch")
    job_id = runs.submit(s, "sleeping", params={"seconds": 1})
    Worker(s, say=lambda m: None).serve(until_empty=True)
    job = runs.get_job(s, job_id)
    assert (job["status"], job["failure"]) == ("failed", "cluster")
    assert "Slurm did not take the job" in job["error"] and "invalid partition" in job["error"].lower()
    assert job["slurm_job_id"] is None
