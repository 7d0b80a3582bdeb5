"""The queue and its state machine, on a real SQLite file; the no-double-claim proof runs several processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from sqlalchemy import update

from lab import experiments, jobstore
from lab.db import session
from lab.errors import LabError
from lab.tables import Job, utcnow


def _enqueue(s, n=1, priority=0, plugin="instant"):
    exp = experiments.get_or_create(s, "default")
    return [jobstore.enqueue(s, experiment_id=exp, plugin=plugin, params={}, priority=priority) for _ in range(n)]


def test_claim_order_is_priority_then_fifo(any_ws):
    low = _enqueue(any_ws, 2)
    high = _enqueue(any_ws, 1, priority=5)
    claimed = [jobstore.claim_next(any_ws, "w:1").id for _ in range(3)]
    assert claimed == [high[0], low[0], low[1]]
    assert jobstore.claim_next(any_ws, "w:1") is None


def test_claim_marks_running_with_worker_and_times(any_ws):
    (job_id,) = _enqueue(any_ws)
    job = jobstore.claim_next(any_ws, "host:42")
    assert (job.id, job.status, job.worker, job.attempts) == (job_id, "running", "host:42", 1)
    assert job.started_at is not None and job.heartbeat_at is not None


def test_cancel_queued_job_leaves_the_queue(any_ws):
    a, b = _enqueue(any_ws, 2)
    assert jobstore.cancel(any_ws, a) == "cancelled"
    assert jobstore.get(any_ws, a).status == "cancelled"
    assert jobstore.claim_next(any_ws, "w:1").id == b


def test_cancel_running_job_only_asks_the_worker(any_ws):
    (job_id,) = _enqueue(any_ws)
    jobstore.claim_next(any_ws, "w:1")
    assert jobstore.cancel(any_ws, job_id) == "cancelling"
    assert jobstore.get(any_ws, job_id).status == "running"
    assert jobstore.cancel_requested(any_ws, job_id)


def test_finished_jobs_cannot_be_cancelled_or_finished_twice(any_ws):
    (job_id,) = _enqueue(any_ws)
    jobstore.claim_next(any_ws, "w:1")
    assert jobstore.finish(any_ws, job_id, "w:1", "completed", exit_code=0)
    assert not jobstore.finish(any_ws, job_id, "w:1", "failed", exit_code=1)
    assert jobstore.get(any_ws, job_id).status == "completed"
    with pytest.raises(LabError, match="already completed"):
        jobstore.cancel(any_ws, job_id)


def test_only_the_owning_worker_finishes_a_job(any_ws):
    (job_id,) = _enqueue(any_ws)
    jobstore.claim_next(any_ws, "w:1")
    assert not jobstore.finish(any_ws, job_id, "w:2", "completed", exit_code=0)
    assert jobstore.get(any_ws, job_id).status == "running"


def test_priority_changes_only_for_queued_jobs(any_ws):
    a, b = _enqueue(any_ws, 2)
    assert jobstore.queue_position(any_ws, b) == 2
    jobstore.set_priority(any_ws, b, 10)
    assert jobstore.queue_position(any_ws, b) == 1
    assert jobstore.claim_next(any_ws, "w:1").id == b
    with pytest.raises(LabError, match="only queued jobs"):
        jobstore.set_priority(any_ws, b, 3)
    with pytest.raises(LabError, match="no job 999"):
        jobstore.set_priority(any_ws, 999, 3)


def test_reaper_fails_running_jobs_with_an_expired_lease(any_ws):
    stale, fresh = _enqueue(any_ws, 2)
    jobstore.claim_next(any_ws, "elsewhere:1")
    jobstore.claim_next(any_ws, "elsewhere:2")
    with session(any_ws) as s:
        s.execute(update(Job).where(Job.id == stale).values(heartbeat_at=utcnow() - timedelta(seconds=600)))
    assert jobstore.reap_stale(any_ws) == [stale]
    job = jobstore.get(any_ws, stale)
    assert job.status == "failed" and "no heartbeat" in job.error
    assert jobstore.get(any_ws, fresh).status == "running"


CLAIMER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lab import jobstore
    from lab import settings
    s = settings.load()
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.01)
    while (job := jobstore.claim_next(s, sys.argv[1])) is not None:
        print(job.id, flush=True)
""")


def test_several_processes_never_claim_the_same_job(any_ws, tmp_path):
    ids = _enqueue(any_ws, 300)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, f"claimer:{n}", str(go)], stdout=subprocess.PIPE,
                              text=True) for n in range(4)]
    go.touch()
    claimed = []
    for p in procs:
        stdout, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        claimed += [int(line) for line in stdout.split()]
    assert sorted(claimed) == sorted(ids), "every job claimed exactly once"
    per_worker = {jobstore.get(any_ws, i).worker for i in ids}
    assert len(per_worker) > 1, "the claims were spread over several processes"


def test_a_job_id_too_large_for_the_database_is_one_clear_sentence(any_ws):
    from lab import runs
    from lab.errors import LabError, from_known_error

    exp = experiments.get_or_create(any_ws, "e")
    job_id = jobstore.enqueue(any_ws, experiment_id=exp, plugin="instant", params={})
    for call in (lambda: runs.get_job(any_ws, 10**20), lambda: jobstore.cancel(any_ws, 10**20),
                 lambda: jobstore.set_priority(any_ws, job_id, 10**20)):
        with pytest.raises(Exception) as caught:
            call()
        known = caught.value if isinstance(caught.value, LabError) else from_known_error(caught.value)
        assert known is not None, f"{type(caught.value).__name__}: {caught.value}"
        assert "too large for the database" in known.message, known.message
