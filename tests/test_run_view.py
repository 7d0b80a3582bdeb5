"""The run view's pieces: what a running job is doing, which attempt it is and why earlier ones ended, the scores
and default curves of a run, the log as a person reads it."""

from __future__ import annotations

import threading

from conftest import wait_until

from lab import jobstore, runs
from lab.ui.tabs import run as run_view
from lab.workspace import log_tail


def test_a_running_job_says_what_it_is_doing(ws, jobs_worker):
    job_id = runs.submit(ws, "sleeping", params={"seconds": "30"})
    worker = jobs_worker()
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        wait_until(lambda: runs.get_job(ws, job_id)["phase"] == "loading", 60, "the loading phase")
        page = run_view.header(runs.get_job(ws, job_id))
        assert "loading the model and data" in page and "left" not in page
    finally:
        jobstore.cancel(ws, job_id)
        worker.stop.set()
        thread.join(60)
    assert runs.get_job(ws, job_id)["phase"] is None, "a job that is not running has no phase"


def test_the_attempt_and_why_earlier_starts_ended_are_shown():
    job = {"attempts": 2, "max_attempts": 3}
    log = ("[lab] job 4: sft ...\n[lab] attempt 1 of 3 killed by SIGKILL; it goes back to the queue and resumes "
           "from its last checkpoint\n[lab] started again (attempt 2 of 3): resuming from checkpoint-20\n")
    shown = run_view.attempts(job, log)
    assert "attempt 2 of 3" in shown and "Earlier starts: attempt 1 of 3 killed by SIGKILL" in shown
    stopped = run_view.attempts({"attempts": 1, "max_attempts": 1},
                                "[lab] interrupted: its worker was stopped; the job went back to the queue\n")
    assert "attempt 1 of 1; started 2 times" in stopped
    assert run_view.attempts({"attempts": 1, "max_attempts": 1}, "[lab] job 1\n") == "", "a first start says nothing"


def test_scores_and_the_default_curves_of_a_run():
    points = {"loss": [(1, 2.0, None), (2, 1.0, None)], "grad_norm": [(1, 1.0, None)],
              "eval/accuracy": [(2, 0.75, None)], "eval/runtime": [(2, 3.0, None)],
              "final/macro_f1": [(2, None, None)]}
    assert run_view.scores(points) == [["eval/accuracy", 0.75, 2], ["final/macro_f1", "NaN", 2]]
    assert run_view.default_keys(sorted(points)) == ["loss"]
    assert run_view.default_keys(["epoch", "eval/accuracy", "grad_norm"]) == ["eval/accuracy"], "an evaluation"


def test_the_log_is_shown_as_a_person_reads_it(tmp_path):
    path = tmp_path / "log.txt"
    path.write_bytes(b"start\nLoading  0%\rLoading 50%\rLoading 100%\n\x1b[31mred\x1b[0m text\nend\r\n")
    assert log_tail(path) == "start\nLoading 100%\nred text\nend"


def test_the_run_view_reads_only_the_points_logged_since_its_last_read(any_ws, tmp_path):
    from lab.sdk import RunContext

    job_id = runs.submit(any_ws, "sleeping", params={"seconds": "1"})
    ctx = RunContext(settings=any_ws, job_id=job_id, plugin="sleeping", experiment="default", run_dir=tmp_path)
    for step in range(1, 4):
        ctx.log_metrics(step, {"loss": 4.0 - step, "learning_rate": 0.1})
    found = runs.Points(job_id)

    def shown(key):  # NaN as None, for comparing
        return [(int(step), None if value != value else value) for step, value in found.by_key[key].tolist()]

    assert found.update(any_ws) == 6 and shown("loss") == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert found.update(any_ws) == 0, "nothing new: nothing read"
    ctx.log_metrics(4, {"loss": float("nan"), "eval/accuracy": 0.5})
    assert found.update(any_ws) == 2, "only the new points are read"
    assert shown("loss")[-1] == (4, None) and shown("eval/accuracy") == [(4, 0.5)]
    assert run_view.nonfinite(found.by_key) == ["loss NaN at step 4"]
    assert run_view.scores(found.by_key) == [["eval/accuracy", 0.5, 4]]
    ctx.log_metrics(2, {"eval/accuracy": 0.25})  # logged out of step order
    found.update(any_ws)
    assert shown("eval/accuracy") == [(2, 0.25), (4, 0.5)]
    # a retry redoes steps after its checkpoint: the dropped points go, the redone ones are not doubled
    runs.clear_metrics(any_ws, job_id, after_step=2)
    ctx.log_metrics(3, {"loss": 0.9})
    found.update(any_ws)
    assert shown("loss") == [(1, 3.0), (2, 2.0), (3, 0.9)]
    assert {k: shown(k) for k in found.by_key} == {k: [tuple(p[:2]) for p in v]
                                                   for k, v in runs.metrics(any_ws, [job_id])[job_id].items()}
    again = runs.Points(job_id)
    assert again.update(any_ws) == found.count
    assert {k: again.by_key[k].tolist() for k in again.by_key} == {k: found.by_key[k].tolist() for k in found.by_key}
    assert run_view.nonfinite(found.by_key) == [], "the NaN went with the dropped steps"


def test_the_artifacts_list_leaves_out_links_such_as_wandbs_core_log_in_the_cache(tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "cache" / "core-debug.log"
    (run_dir / "wandb" / "offline-run-1" / "logs").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    outside.parent.mkdir()
    outside.write_text("not the run's")
    (run_dir / "log.txt").write_text("log")
    (run_dir / "checkpoints" / "checkpoint-2" / "model.safetensors").write_text("weights")
    logs = run_dir / "wandb" / "offline-run-1" / "logs"
    (logs / "debug.log").write_text("debug")
    (logs / "debug-core.log").symlink_to(outside)  # what wandb writes: a link into ~/.cache
    (run_dir / "wandb" / "debug.log").symlink_to(logs / "debug.log")
    (run_dir / "wandb" / "latest-run").symlink_to(run_dir / "wandb" / "offline-run-1", target_is_directory=True)
    assert run_view.artifacts(str(run_dir)) == [str(run_dir / "log.txt"), str(logs / "debug.log")]
