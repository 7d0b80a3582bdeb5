"""Faults the lab must survive without losing work or calling a failure a success."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import LabServer, wait_for_status, write_jsonl
from conftest import wait_until as _wait_for

from jobs.worker import Worker
from lab import datasets, experiments, jobstore, registry, runs
from lab.settings import load

FACTS = [{"prompt": "What is the capital of France?", "completion": "Paris"}] * 8


@pytest.fixture
def tiny(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", FACTS))
    return ws


def _serve_in_thread(s) -> tuple[Worker, threading.Thread]:
    worker = Worker(s, say=lambda m: None)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    return worker, thread


def test_a_killed_job_is_retried_from_its_last_checkpoint(tiny, jobs_worker):
    params = {"use_lora": "false", "max_steps": "60", "save_steps": "10", "learning_rate": "1e-3",
              "batch_size": "2", "precision": "fp32"}
    job_id = runs.submit(tiny, "sft", model="tiny", dataset="facts", params=params, max_attempts=2)
    worker, thread = _serve_in_thread(tiny)
    try:
        run_dir = Path(_wait_for(lambda: jobstore.get(tiny, job_id).run_dir, what="the run folder"))
        _wait_for(lambda: (run_dir / "checkpoints" / "checkpoint-10" / "trainer_state.json").exists(), 120,
                  "the first checkpoint")
        os.kill(jobstore.get(tiny, job_id).pid, signal.SIGKILL)
        assert wait_for_status(tiny, job_id, ("completed", "failed", "cancelled"), timeout=240) == "completed"
    finally:
        worker.stop.set()
        thread.join(60)
    job = runs.get_job(tiny, job_id)
    assert job["attempts"] == 2 and job["run_dir"] == str(run_dir)
    log = (run_dir / "log.txt").read_text()
    assert "killed by SIGKILL" in log and "resuming from checkpoint-" in log
    resumed_at = int(log.split("resuming from checkpoint-")[1].split()[0])
    assert f"[lab] step {resumed_at + 1}/60" in log.split("resuming from")[1], "the step count goes on from there"
    steps = [s for s, _, _ in runs.metrics(tiny, [job_id], ["loss"])[job_id]["loss"]]
    assert steps == list(range(1, 61)), "every step once: the killed attempt's later points were dropped"


def test_a_killed_job_without_attempts_left_fails_naming_the_signal(ws, jobs_worker):
    job_id = runs.submit(ws, "sleeping", params={"seconds": "60"})
    worker, thread = _serve_in_thread(ws)
    try:
        run_dir = Path(_wait_for(lambda: jobstore.get(ws, job_id).pid and jobstore.get(ws, job_id).run_dir))
        _wait_for(lambda: (run_dir / "pid.txt").exists())
        os.kill(jobstore.get(ws, job_id).pid, signal.SIGKILL)
        assert wait_for_status(ws, job_id, timeout=30) == "failed"
    finally:
        worker.stop.set()
        thread.join(30)
    job = runs.get_job(ws, job_id)
    assert "killed by SIGKILL" in job["error"] and job["failure"] == "killed"
    assert "run the job again" in job["next_step"]


@pytest.mark.parametrize("attempts", [1, 2])
def test_a_killed_worker_loses_its_job_to_the_lease(any_ws, monkeypatch, attempts, jobs_worker):
    monkeypatch.setenv("LAB_LEASE_S", "1.5")
    s = load()
    job_id = runs.submit(s, "sleeping", params={"seconds": "120"}, max_attempts=attempts)
    worker = subprocess.Popen([sys.executable, "-m", "lab.cli", "worker"], stdout=subprocess.DEVNULL)
    pid = _wait_for(lambda: jobstore.get(s, job_id).pid, what="the job's start")
    worker.kill()
    worker.wait()
    _wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
              15, "the orphaned job process to stop")
    time.sleep(2)  # past the lease
    assert jobstore.reap_stale(s) == [job_id]
    job = runs.get_job(s, job_id)
    assert job["status"] == ("queued" if attempts == 2 else "failed")
    assert "no heartbeat" in job["error"] and job["failure"] == (None if attempts == 2 else "lost")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(Path(f"/proc/{p}/stat").exists() and Path(f"/proc/{p}/stat").read_text().split()[4] == str(pgid)
               and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z" for p in os.listdir("/proc") if p.isdigit())


def test_a_killed_worker_takes_its_multi_process_job_with_it(tiny, jobs_worker):
    """Under torchrun the worker is the ranks' grandparent: they watch its pid (LAB_WORKER_PID) and stop the whole
    group; a rank that prints to the log pipe the dead worker held also dies of it. Either way nothing survives."""
    job_id = runs.submit(tiny, "sft", model="tiny", dataset="facts", processes=2,
                         params={"max_steps": "5000", "batch_size": "2", "precision": "fp32"})
    worker = subprocess.Popen([sys.executable, "-m", "lab.cli", "worker"], stdout=subprocess.DEVNULL)
    pgid = _wait_for(lambda: jobstore.get(tiny, job_id).pid, what="the job's start")
    log = Path(_wait_for(lambda: jobstore.get(tiny, job_id).run_dir)) / "log.txt"
    _wait_for(lambda: log.exists() and "rank 1 of 2: data-parallel training" in log.read_text(), 120,
              "both ranks training")
    worker.kill()
    worker.wait()
    _wait_for(lambda: not _group_alive(pgid), 20, "torchrun and both ranks to stop")


def test_a_killed_server_leaves_nothing_running_and_its_job_finishes_after_restart(ws, serves):
    job_id = runs.submit(ws, "sleeping", params={"seconds": "8"}, max_attempts=2)
    server = LabServer(ws.workspace).start()
    try:
        wait_for_status(ws, job_id, ("running",), timeout=60)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        # its workers notice, stop their jobs and put them back in the queue
        assert wait_for_status(ws, job_id, ("queued",), timeout=30) == "queued"
        assert not [j for j in runs.list_jobs(ws) if j["status"] == "running"]
        server.start()
        assert wait_for_status(ws, job_id, timeout=90) == "completed"
    finally:
        server.stop()


def test_a_full_disk_during_a_checkpoint_fails_readably_and_keeps_earlier_checkpoints(tiny, tmp_path, jobs_worker):
    job_id = runs.submit(tiny, "sft", model="tiny", dataset="facts",
                         params={"use_lora": "false", "max_steps": "40", "save_steps": "2", "precision": "fp32"})
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(run_dir / "checkpoints")],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        from sqlalchemy import update

        from lab.db import session
        from lab.tables import Job

        with session(tiny) as db:  # the job's run folder, with its checkpoints on the small disk
            db.execute(update(Job).where(Job.id == job_id).values(run_dir=str(run_dir)))
        jobs_worker(tiny).serve(once=True)
        job = runs.get_job(tiny, job_id)
        assert job["status"] == "failed"
        assert "the disk is full" in job["error"] and job["failure"] == "disk_full" and "free" in job["next_step"]
        first = run_dir / "checkpoints" / "checkpoint-2"
        assert (first / "trainer_state.json").is_file() and (first / "model.safetensors").is_file()
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(first) is not None, "the earlier checkpoint is intact"
    finally:
        subprocess.run(["umount", "-l", str(run_dir / "checkpoints")], capture_output=True)


LOCKER_SQLITE = textwrap.dedent("""
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    db.execute("UPDATE jobs SET priority = priority")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    db.execute("COMMIT")
""")


def test_a_long_writer_makes_workers_wait_not_crash(any_ws, jobs_worker):
    exp = experiments.get_or_create(any_ws, "default")
    if any_ws.database_url.startswith("sqlite"):
        path = any_ws.database_url.removeprefix("sqlite:///")
        locker = subprocess.Popen([sys.executable, "-c", LOCKER_SQLITE, path, "3"], stdout=subprocess.PIPE, text=True)
    else:
        code = textwrap.dedent(f"""
            import psycopg, time
            with psycopg.connect({any_ws.database_url.replace('postgresql+psycopg', 'postgresql')!r}) as c:
                c.execute("LOCK TABLE jobs IN EXCLUSIVE MODE")
                print("locked", flush=True)
                time.sleep(3)
        """)
        locker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    t0 = time.monotonic()
    job_id = jobstore.enqueue(any_ws, experiment_id=exp, plugin="instant", params={"steps": 1})
    jobs_worker(any_ws).serve(once=True)
    locker.wait(30)
    assert time.monotonic() - t0 > 1.5, "the writes waited for the lock"
    assert runs.get_job(any_ws, job_id)["status"] == "completed"


def test_a_lock_held_past_the_busy_timeout_makes_the_worker_back_off_and_go_on(ws, monkeypatch, jobs_worker):
    """SQLite gives up on a lock after its busy timeout ("database is locked"): the worker says so, waits with
    back-off and retries instead of crashing; the job then runs."""
    from lab import db

    db.dispose_all()
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 300)
    exp = experiments.get_or_create(ws, "default")
    job_id = jobstore.enqueue(ws, experiment_id=exp, plugin="instant", params={"steps": 1})
    path = ws.database_url.removeprefix("sqlite:///")
    locker = subprocess.Popen([sys.executable, "-c", LOCKER_SQLITE, path, "4"], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    said = []
    Worker(ws, say=said.append).serve(once=True)
    locker.wait(30)
    assert any("the database cannot be used (database is locked); retrying in" in m for m in said), said
    assert runs.get_job(ws, job_id)["status"] == "completed"


def test_the_ui_answers_while_a_writer_holds_the_database(ws, serves):
    """Reads never wait for a writer (WAL); a submission waits for the lock and then goes through."""
    from gradio_client import Client

    server = LabServer(ws.workspace, workers=0).start()
    try:
        client = Client(server.url, verbose=False)
        path = ws.database_url.removeprefix("sqlite:///")
        locker = subprocess.Popen([sys.executable, "-c", LOCKER_SQLITE, path, "8"], stdout=subprocess.PIPE,
                                  text=True)
        assert locker.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        assert client.predict("", "", api_name="/list_jobs") == []
        assert time.monotonic() - t0 < 5, "a read does not wait for the writer (who holds the lock for 8 s)"
        job = client.predict('{"plugin": "instant", "experiment": "locked"}', api_name="/submit_job")
        assert time.monotonic() - t0 > 6, "the submission waited for the lock"
        assert job["status"] == "queued" and locker.wait(30) == 0
    finally:
        server.stop()


RACER = textwrap.dedent("""
    import sys
    from lab import jobstore
    from lab import settings
    s = settings.load()
    while (job := jobstore.claim_next(s, sys.argv[1])) is not None:
        jobstore.finish(s, job.id, sys.argv[1], "completed", exit_code=0)
        print(job.id, flush=True)
""")


def test_two_workers_racing_for_1000_jobs_run_each_exactly_once(any_ws):
    exp = experiments.get_or_create(any_ws, "race")
    ids = jobstore.enqueue_many(any_ws, [{"experiment_id": exp, "plugin": "instant", "params": {}}] * 1000)
    racers = [subprocess.Popen([sys.executable, "-c", RACER, f"racer:{n}"], stdout=subprocess.PIPE, text=True)
              for n in range(2)]
    done = []
    for racer in racers:
        out, _ = racer.communicate(timeout=300)
        assert racer.returncode == 0
        done.append([int(x) for x in out.split()])
    assert sorted(done[0] + done[1]) == sorted(ids)
    assert done[0] and done[1], "both workers took jobs"
    assert {j["status"] for j in runs.list_jobs(any_ws, limit=2000)} == {"completed"}


def test_ui_handlers_retry_a_busy_database_then_say_why(monkeypatch):
    import gradio as gr
    from sqlalchemy.exc import OperationalError

    from lab.ui import common

    monkeypatch.setattr(common, "DB_PATIENCE_S", 1.6)  # waits 0.5 s, then 1 s: three calls in all
    calls = []

    def flaky(fail_times):
        calls.append(1)
        if len(calls) <= fail_times:
            raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))
        return "done"

    assert common.user_errors(flaky)(2) == "done" and len(calls) == 3
    calls.clear()
    with pytest.raises(gr.Error, match=r"the database is busy or unreachable \(database is locked\); nothing was"):
        common.user_errors(flaky)(10)
    assert len(calls) == 3


@pytest.mark.parametrize("attempts", [1, 2])
def test_a_worker_killed_before_recording_the_outcome_registers_nothing_twice(ws, tiny_model_dir, tmp_path,
                                                                               monkeypatch, attempts, jobs_worker):
    """The job has ended and its output is written, but the worker dies before recording the outcome (it waits
    for a held database lock). The output is registered once, with the outcome, by whoever records it."""
    monkeypatch.setenv("LAB_LEASE_S", "1.5")
    s = load()
    gate = tmp_path / "gate"
    job_id = runs.submit(s, "modelmaker", params={"source": str(tiny_model_dir), "gate": str(gate)},
                         max_attempts=attempts)
    worker = subprocess.Popen([sys.executable, "-m", "lab.cli", "worker"], stdout=subprocess.DEVNULL)
    log = _wait_for(lambda: (d := jobstore.get(s, job_id).run_dir) and Path(d) / "log.txt", what="the run folder")
    _wait_for(lambda: log.is_file() and "waiting at the gate" in log.read_text(), what="the job at its gate")
    pid = jobstore.get(s, job_id).pid
    locker = subprocess.Popen([sys.executable, "-c", LOCKER_SQLITE, s.database_url.removeprefix("sqlite:///"), "60"],
                              stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    gate.touch()
    _wait_for(lambda: f"job {job_id} finished" in log.read_text(), 30, "the job's own end (no database write)")
    _wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
              15, "the job process to exit")
    time.sleep(0.5)  # the worker is now waiting for the lock to record the outcome
    worker.kill()
    worker.wait()
    locker.kill()
    locker.wait()
    time.sleep(2)  # past the lease
    assert jobstore.reap_stale(s) == [job_id]
    assert [m["name"] for m in registry.list_all(s)] == [], "nothing registered for a job not completed"
    if attempts == 1:
        assert runs.get_job(s, job_id)["status"] == "failed"
        return
    assert runs.get_job(s, job_id)["status"] == "queued"
    jobs_worker(s).serve(once=True)
    job = runs.get_job(s, job_id)
    assert job["status"] == "completed"
    models = registry.list_all(s)
    assert [m["name"] for m in models] == [f"modelmaker-{job_id}"]
    assert models[0]["fingerprint"] == registry.fingerprint_folder(Path(models[0]["path"]))
    assert "output registered as model" in (Path(job["run_dir"]) / "log.txt").read_text()


def _mount(args: list[str]) -> None:
    done = subprocess.run(["mount", *args], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.decode().strip()}")


@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_a_full_or_read_only_workspace_is_named_by_the_command(ws, tmp_path, kind):
    """`lab datasets add` on a full disk or a read-only workspace: one sentence and a next step, nothing stored."""
    from conftest import lab_cli

    experiments.get_or_create(ws, "default")  # the database exists; its folder is what fills up or turns read-only
    folder = ws.workspace / "datasets"
    folder.mkdir()
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": "y" * 1000 + str(i)} for i in range(3000)])
    if kind == "full":
        _mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)])
    else:
        _mount(["--bind", str(folder), str(folder)])
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
    try:
        done = lab_cli("datasets", "add", "big", str(big))
        assert done.returncode == 2, done.stderr
        assert ("the disk is full" if kind == "full" else "read-only file system") in done.stderr
        assert "Traceback" not in done.stderr and "unexpected" not in done.stderr
        assert datasets.list_all(ws) == []
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_stopped_lab_serve_checkpoints_its_training_job_which_resumes_after_restart(tiny, serves):
    """Ctrl-C (SIGINT) on `lab serve`: its worker stops the job, which writes a checkpoint at its step boundary and
    goes back to the queue; started again, the lab resumes it from that checkpoint."""
    job_id = runs.submit(tiny, "sft", model="tiny", dataset="facts", max_attempts=1,
                         params={"max_steps": "150", "batch_size": "2", "precision": "fp32", "logging_steps": "1"})
    server = LabServer(tiny.workspace).start()
    try:
        _wait_for(lambda: jobstore.get(tiny, job_id).step >= 3, 180, "three steps")
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(150) == 0
        job = runs.get_job(tiny, job_id)
        assert job["status"] == "queued", job
        log = (Path(job["run_dir"]) / "log.txt").read_text()
        saved = int(log.split("asked to stop: saving checkpoint-")[1].split()[0])
        server.start()
        assert wait_for_status(tiny, job_id, timeout=400) == "completed"
    finally:
        server.stop()
    log = (Path(job["run_dir"]) / "log.txt").read_text()
    assert f"resuming from checkpoint-{saved}" in log
    steps = [s for s, _, _ in runs.metrics(tiny, [job_id], ["loss"])[job_id]["loss"]]
    assert steps == list(range(1, 151)), "each step once"


def _memory_cgroup(limit: int) -> Path | None:
    """A new memory cgroup (v1 or v2) limited to `limit` bytes, or None where this machine does not let us make one."""
    name = f"lab-test-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/memory")
    v2 = Path("/sys/fs/cgroup")
    try:
        if (v1 / "memory.limit_in_bytes").is_file():
            group = v1 / name
            group.mkdir(exist_ok=True)
            (group / "memory.limit_in_bytes").write_text(str(limit))
            if (group / "memory.memsw.limit_in_bytes").is_file():  # no swapping out of it either
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
            return group
        if "memory" in (v2 / "cgroup.controllers").read_text().split():
            group = v2 / name
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(limit))
            (group / "memory.swap.max").write_text("0")
            return group
    except OSError:
        return None
    return None


def test_a_job_the_kernel_kills_for_memory_fails_as_oom(ws, jobs_worker):
    """A worker in a memory-limited cgroup (as in a container with a memory limit): its job grows past the limit,
    the kernel's OOM killer kills it, and the job fails as `oom` with the next step, not as a mysterious SIGKILL."""
    group = _memory_cgroup(1536 * 2**20)
    if group is None:
        pytest.skip("this machine does not let the tests make a memory cgroup")
    job_id = runs.submit(ws, "failing", params={"how": "grow"})
    procs = str(group / "cgroup.procs")

    def enter_group():  # in the worker's process before it starts: it and its jobs live in the limited group
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    worker = subprocess.Popen([sys.executable, "-m", "jobs.worker"], cwd=Path(__file__).resolve().parents[2],
                              preexec_fn=enter_group, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        status = wait_for_status(ws, job_id, timeout=120)
    finally:
        worker.terminate()
        worker.wait(30)
        try:
            group.rmdir()
        except OSError:
            pass
    job = runs.get_job(ws, job_id)
    assert status == "failed" and job["failure"] == "oom", job
    assert "out-of-memory killer" in job["error"] and "lower batch_size" in job["next_step"]
