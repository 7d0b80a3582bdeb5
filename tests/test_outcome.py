"""How a job ended is decided in one place (lab.outcome.decide): each way a job can end, locally, in Slurm or lost
with its worker, gets its status, its failure's kind, reason and next step, and a retry while attempts remain."""

from __future__ import annotations

import pytest

from lab.diagnosis import KINDS, Failure
from lab.errors import CANCELLED_EXIT, INTERRUPTED_EXIT
from lab.outcome import Ending, decide
from lab.tables import Job


def _job(**fields) -> Job:
    base = {"id": 3, "worker": "host:12", "time_limit_s": 60.0, "cancel_requested": False, "attempts": 1,
            "max_attempts": 1, "failure": None, "error": None, "next_step": None}
    return Job(**{**base, **fields})


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "model.safetensors").write_text("x")
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")  # written last: complete
    (tmp_path / "checkpoints" / "checkpoint-6").mkdir()  # being written
    return tmp_path


@pytest.mark.parametrize(("ending", "status", "kind", "words", "retryable"), [
    (Ending(exit_code=0), "completed", None, "", False),
    (Ending(exit_code=0, registration_error="no such base"), "failed", "plugin_error", "cannot be registered", False),
    (Ending(exit_code=-15, stopped_for="cancel"), "cancelled", "killed", "cancelled by the user", False),
    (Ending(exit_code=CANCELLED_EXIT), "cancelled", "killed", "cancelled by the user", False),
    (Ending(exit_code=-15, stopped_for="timeout"), "failed", "timeout", "time limit of 1 minute", False),
    (Ending(exit_code=-9), "failed", "killed", "SIGKILL", True),
    (Ending(exit_code=-9, oom_killed=True), "failed", "oom", "out-of-memory killer", True),
    (Ending(exit_code=INTERRUPTED_EXIT), "failed", "killed", "SIGTERM from outside the lab", True),
    (Ending(exit_code=-15, stopped_for="lost"), "failed", "lost", "lease was lost", True),
    (Ending(exit_code=1), "failed", "plugin_error", "exited with code 1", False),
    (Ending(silent_s=61, lease_s=30), "failed", "lost", "no heartbeat from worker host:12 for 61 s", True),
    (Ending(refused=Failure("cluster", "Slurm did not take the job: no partition", "check sinfo")), "failed",
     "cluster", "did not take the job", False),
    (Ending(cluster_state="NODE_FAIL", nodes="n3"), "failed", "lost", "node n3 failed", True),
    (Ending(cluster_state="TIMEOUT"), "failed", "timeout", "its last checkpoint is checkpoint-4", False),
    (Ending(cluster_state="COMPLETED"), "completed", None, "", False),
])
def test_each_ending_gets_its_status_kind_and_reason(run_dir, ending, status, kind, words, retryable):
    decided = decide(ending, _job(), run_dir)
    assert (decided.status, decided.retryable) == (status, retryable)
    assert (decided.failure.kind if decided.failure else None) == kind
    assert words in (decided.failure.reason if decided.failure else "")
    assert decided.failure is None or decided.failure.kind in KINDS
    if status == "failed":
        assert decided.failure.next_step, "a failure says what to do next"


def test_a_retryable_ending_goes_back_to_the_queue_while_attempts_remain(run_dir):
    again = decide(Ending(exit_code=-9), _job(attempts=1, max_attempts=2), run_dir)
    assert again.status == "queued" and again.uses_attempt
    assert again.failure.reason.startswith("attempt 1 of 2 killed by SIGKILL") and "resumes" in again.failure.reason
    last = decide(Ending(exit_code=-9), _job(attempts=2, max_attempts=2), run_dir)
    assert last.status == "failed" and last.failure.kind == "killed"
    reaped = decide(Ending(silent_s=90, lease_s=30), _job(attempts=1, max_attempts=3), None)
    assert reaped.status == "queued" and reaped.failure.reason.endswith("it was put back in the queue")
    assert decide(Ending(exit_code=1), _job(attempts=1, max_attempts=3), run_dir).status == "failed", \
        "a plugin's error is not retried: it would fail the same way"


def test_a_stopped_worker_requeues_its_job_without_using_an_attempt(run_dir):
    decided = decide(Ending(exit_code=INTERRUPTED_EXIT, stopped_for="interrupted"), _job(attempts=1), run_dir)
    assert decided.status == "queued" and not decided.uses_attempt
    assert "its worker was stopped" in decided.failure.reason


def test_the_job_s_own_diagnosis_wins_over_what_the_worker_sees(run_dir):
    own = _job(failure="data", error="every row lost its reply to max_length=8", next_step="raise max_length")
    decided = decide(Ending(exit_code=1), own, run_dir)
    assert decided.failure == Failure("data", "every row lost its reply to max_length=8", "raise max_length")
    assert decide(Ending(exit_code=0), own, run_dir).status == "completed"
    lost = decide(Ending(silent_s=90, lease_s=30), own, None)
    assert lost.failure.kind == "lost", "a job reaped for its silent worker is lost, whatever it said before"
