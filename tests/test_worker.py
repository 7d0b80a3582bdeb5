"""The worker and runner with fake plugins: outcomes, failures, kills, cancellation, several worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import wait_for_status
from sqlalchemy import update

from jobs.worker import Worker
from lab import jobstore, runs
from lab.db import session
from lab.tables import Job


def _serve_in_thread(s) -> tuple[Worker, threading.Thread]:
    worker = Worker(s, say=lambda m: None)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    return worker, thread


def _wait_for_file(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); its state letter says it is gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_completed_job_has_metrics_log_and_job_json(ws, jobs_worker):
    job_id = runs.submit(ws, "instant", params={"steps": "4"})
    jobs_worker().serve(once=True)
    job = runs.get_job(ws, job_id)
    assert job["status"] == "completed" and job["exit_code"] == 0 and job["error"] is None
    assert (job["step"], job["total_steps"]) == (4, 4)
    points = runs.metrics(ws, [job_id])[job_id]["loss"]
    assert [p[0] for p in points] == [1, 2, 3, 4] and points[-1][1] == 0.25
    run_dir = Path(job["run_dir"])
    assert run_dir == ws.workspace / "experiments" / "default" / "runs" / f"{job_id}-instant"
    assert (run_dir / "output" / "result.txt").read_text() == f"job {job_id}\n"
    assert f"job {job_id}: instant" in (run_dir / "log.txt").read_text()
    record = (run_dir / "job.json").read_text()
    assert '"plugin": "instant"' in record and '"steps": 4' in record and '"versions"' in record


def test_a_jobs_peak_memory_is_recorded_at_its_last_step(ws, jobs_worker):
    small = runs.submit(ws, "instant", params={"steps": "2"})
    big = runs.submit(ws, "instant", params={"steps": "2", "hold_mb": "400"})
    worker = jobs_worker()
    parent = bytearray(500 * 2**20)  # the worker's own memory is not the job's (a forked process inherits its peak)
    for i in range(0, len(parent), 4096):
        parent[i] = 1
    worker.serve(once=True)
    worker.serve(once=True)
    del parent
    peaks = {}
    for job_id in (small, big):
        points = runs.metrics(ws, [job_id])[job_id]["peak_memory_mb"]
        assert [p[0] for p in points] == [2], "one point, at the job's last step"
        peaks[job_id] = points[0][1]
        assert f"peak memory: peak_memory {peaks[job_id]:,.0f} MiB" in runs.get_job(ws, job_id)["log_tail"]
    assert 20 < peaks[small] < 400, peaks
    assert peaks[big] > 400 + 20 and peaks[big] - peaks[small] > 150, peaks  # the 400 MiB held, with Python around
    from lab import compare

    columns, _, _ = compare.leaderboard(ws, [small, big])
    assert "peak_memory_mb" in compare.shown_columns(columns), "Compare shows it without asking for diagnostics"


def test_plugin_exception_fails_the_job_with_its_reason(ws, jobs_worker):
    job_id = runs.submit(ws, "failing")
    jobs_worker().serve(once=True)
    job = runs.get_job(ws, job_id)
    assert job["status"] == "failed" and job["exit_code"] == 1
    assert "RuntimeError: boom from the plugin" in job["error"]
    assert "about to fail" in job["log_tail"] and "Traceback" in job["log_tail"]


def test_job_without_outputs_is_never_completed(ws, jobs_worker):
    job_id = runs.submit(ws, "silent")
    jobs_worker().serve(once=True)
    job = runs.get_job(ws, job_id)
    assert job["status"] == "failed"
    assert "wrote nothing" in job["error"]


def test_job_process_killed_with_sigkill_is_failed_and_says_so(ws, jobs_worker):
    job_id = runs.submit(ws, "sleeping", params={"seconds": "60"})
    worker, thread = _serve_in_thread(ws)
    try:
        wait_for_status(ws, job_id, ("running",))
        pid = int(_wait_for_file(ws.workspace / "experiments/default/runs" / f"{job_id}-sleeping" / "pid.txt"))
        run_dir = Path(jobstore.get(ws, job_id).run_dir or "")  # recorded when the process started
        os.kill(pid, signal.SIGKILL)
        assert wait_for_status(ws, job_id, timeout=30) == "failed"
    finally:
        worker.stop.set()
        thread.join(30)
    job = runs.get_job(ws, job_id)
    assert job["exit_code"] == -signal.SIGKILL
    assert "killed by SIGKILL" in job["error"]
    assert "sleeping" in job["log_tail"]
    assert run_dir.name == f"{job_id}-sleeping"


def test_cancelling_a_running_job_stops_its_whole_tree_within_5_seconds(ws, jobs_worker):
    job_id = runs.submit(ws, "sleeping", params={"seconds": "120", "child": "true"})
    worker, thread = _serve_in_thread(ws)
    try:
        wait_for_status(ws, job_id, ("running",))
        run_dir = ws.workspace / "experiments/default/runs" / f"{job_id}-sleeping"
        pid = int(_wait_for_file(run_dir / "pid.txt"))
        child = int(_wait_for_file(run_dir / "child_pid.txt"))
        t0 = time.monotonic()
        assert jobstore.cancel(ws, job_id) == "cancelling"
        assert wait_for_status(ws, job_id, timeout=10) == "cancelled"
        assert time.monotonic() - t0 < 5
    finally:
        worker.stop.set()
        thread.join(30)
    assert not _alive(pid) and not _alive(child)
    assert runs.get_job(ws, job_id)["error"] == "cancelled by the user"


def test_stopping_the_worker_puts_its_running_job_back_in_the_queue(ws, jobs_worker):
    job_id = runs.submit(ws, "sleeping", params={"seconds": "120"})
    worker, thread = _serve_in_thread(ws)
    wait_for_status(ws, job_id, ("running",))
    run_dir = ws.workspace / "experiments/default/runs" / f"{job_id}-sleeping"
    pid = int(_wait_for_file(run_dir / "pid.txt"))
    worker.stop.set()
    thread.join(30)
    job = runs.get_job(ws, job_id)
    assert job["status"] == "queued" and job["error"].startswith("interrupted")
    assert not _alive(pid) and not jobstore.live_workers(ws)
    assert "interrupted" in (run_dir / "log.txt").read_text()
    # the next worker runs it again, in the same folder, to the end
    with session(ws) as s:
        s.execute(update(Job).where(Job.id == job_id).values(params={"seconds": 0.2}))
    jobs_worker().serve(once=True)
    job = runs.get_job(ws, job_id)
    # the stopped start is not the job's fault: it does not count against its attempts
    assert (job["status"], job["attempts"], job["run_dir"]) == ("completed", 1, str(run_dir))
    assert job["error"] is None


def test_worker_process_sigterm_interrupts_its_job_cleanly(ws, jobs_worker):
    job_id = runs.submit(ws, "sleeping", params={"seconds": "120"})
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "worker"], stdout=subprocess.PIPE, text=True)
    wait_for_status(ws, job_id, ("running",))
    pid = int(_wait_for_file(ws.workspace / "experiments/default/runs" / f"{job_id}-sleeping" / "pid.txt"))
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout
    assert "SIGTERM received" in stdout
    assert runs.get_job(ws, job_id)["status"] == "queued"
    assert not _alive(pid)


def test_job_process_stops_itself_when_its_worker_dies(ws, jobs_worker):
    job_id = runs.submit(ws, "sleeping", params={"seconds": "120"})
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "worker"], stdout=subprocess.DEVNULL)
    wait_for_status(ws, job_id, ("running",))
    pid = int(_wait_for_file(ws.workspace / "experiments/default/runs" / f"{job_id}-sleeping" / "pid.txt"))
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "no training process outlives its worker"


def test_three_worker_processes_run_every_job_exactly_once(ws, tmp_path, jobs_worker):
    record = tmp_path / "ran.txt"
    ids = [runs.submit(ws, "instant", params={"record": str(record), "steps": "0"}) for _ in range(24)]
    procs = [subprocess.Popen([sys.executable, "-m", "lab.cli", "worker", "--until-empty"], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    for p in procs:
        p.communicate(timeout=240)
        assert p.returncode == 0
    ran = [int(x) for x in record.read_text().split()]
    assert sorted(ran) == sorted(ids)
    jobs = [runs.get_job(ws, i) for i in ids]
    assert all(j["status"] == "completed" and j["attempts"] == 1 for j in jobs)
    assert len({j["worker"] for j in jobs}) > 1


def test_a_new_run_never_reuses_another_runs_folder(ws, jobs_worker):
    # a folder left by an earlier database with the same job id
    stale = ws.workspace / "experiments/default/runs/1-instant"
    stale.mkdir(parents=True)
    (stale / "log.txt").write_text("an older run\n")
    job_id = runs.submit(ws, "instant")
    assert job_id == 1
    jobs_worker().serve(once=True)
    job = runs.get_job(ws, job_id)
    assert job["status"] == "completed"
    assert Path(job["run_dir"]).name == "1-instant.2"
    assert (stale / "log.txt").read_text() == "an older run\n"


def test_a_job_process_finds_its_run_folder_however_late_its_pid_is_recorded(ws, jobs_worker, monkeypatch):
    """The process reads its run folder from the job's row: it is recorded before the process starts (a busy
    database once let a fast job start first and fail with "no run folder")."""
    real = jobstore.started

    def late(settings, job_id, worker_id, pid, run_dir):
        if pid is not None:
            time.sleep(3)  # the job process has long started by now
        return real(settings, job_id, worker_id, pid, run_dir)

    monkeypatch.setattr(jobstore, "started", late)
    job_id = runs.submit(ws, "instant", params={"steps": "1"})
    jobs_worker(ws).serve(once=True)
    job = runs.get_job(ws, job_id)
    assert job["status"] == "completed", job
