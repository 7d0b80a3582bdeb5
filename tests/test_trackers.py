"""Trackers: a run reports to W&B (offline), TensorBoard, Trackio and MLflow at once, each inside its run folder,
and each tool's own reader finds the loss the lab recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import lab_cli, write_jsonl

from lab import datasets, registry, run_config, runs, settings
from lab.errors import LabError

FACTS = [{"prompt": "The capital of France is", "completion": " Paris."},
         {"prompt": "Two plus two is", "completion": " four."}] * 4


def _losses(s, job_id: int) -> dict[int, float]:
    return {step: value for step, value, _ in runs.metrics(s, [job_id])[job_id]["loss"]}


def test_one_run_reports_to_every_tracker_and_each_reader_finds_the_loss(ws, tiny_model_dir, tmp_path,
                                                                          monkeypatch, jobs_worker):
    monkeypatch.setenv("LAB_WANDB", "offline")
    s = settings.load()
    registry.add_folder(s, "tiny", tiny_model_dir)
    datasets.add(s, "facts", write_jsonl(tmp_path / "facts.jsonl", FACTS))
    job_id = int(lab_cli("run", "sft", "-m", "tiny", "-d", "facts", "-e", "tracked", "--set", "max_steps=3",
                         "--set", "batch_size=2", "--set", "eval_split=0",
                         "--report-to", "wandb,tensorboard,trackio,mlflow", check=True).stdout.strip())
    jobs_worker(s).serve(once=True)
    job = runs.get_job(s, job_id)
    assert job["status"] == "completed", job["log_tail"]
    assert job["report_to"] == "wandb,tensorboard,trackio,mlflow"
    run_dir = Path(job["run_dir"])
    losses = _losses(s, job_id)
    assert sorted(losses) == [1, 2, 3]
    record = json.loads((run_dir / "job.json").read_text())
    assert record["report_to"] == ["wandb", "tensorboard", "trackio", "mlflow"]
    assert "--report-to wandb,tensorboard,trackio,mlflow" in record["command"]

    # TensorBoard's own event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    board = {e.step: e.value for e in events.Scalars("train/loss")}
    assert board == pytest.approx(losses, rel=1e-5)

    # MLflow's client on the file store in the run folder
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "tracked"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == f"{job_id}-sft"
    flow = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert flow == pytest.approx(losses, rel=1e-5)

    # Trackio's own storage API (it reads TRACKIO_DIR when imported: a fresh process); its own step counts from 0,
    # the Trainer's step is logged beside it as train/global_step
    code = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            "runs = S.get_runs('tracked'); logs = S.get_logs('tracked', runs[0]); "
            "print(json.dumps([runs, {l['train/global_step']: l['train/loss'] for l in logs if 'train/loss' in l}]))")
    read = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRACKIO_DIR": str(run_dir / "trackio")})
    names, logged = json.loads(read.stdout.strip().splitlines()[-1])
    assert names == [f"{job_id}-sft"]
    assert {int(k): v for k, v in logged.items()} == pytest.approx(losses, rel=1e-5)

    # W&B's offline run, checked by its own sync command
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))
    check = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(offline)], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr

    # the Run page names each tracker's folder and how to open it
    from lab.ui.tabs.run import tracked

    shown = tracked(job)
    for command in (f"tensorboard --logdir {run_dir / 'tensorboard'}", "mlflow ui --backend-store-uri file://",
                    f"TRACKIO_DIR={run_dir / 'trackio'} trackio show --project tracked", "wandb sync"):
        assert command in shown


def test_the_default_none_and_bad_names(ws, tiny_model_dir, tmp_path, monkeypatch, jobs_worker):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", FACTS))
    monkeypatch.setenv("LAB_REPORT_TO", "tensorboard")
    s = settings.load()
    job_id = runs.submit(s, "sft", model="tiny", dataset="facts", params={"max_steps": 1, "eval_split": 0})
    assert runs.get_job(s, job_id)["report_to"] == "tensorboard"  # the setting's default, kept with the job
    none = runs.submit(s, "sft", model="tiny", dataset="facts", params={"max_steps": 1, "eval_split": 0},
                       report_to="none")
    jobs_worker(s).serve(once=True)
    jobs_worker(s).serve(once=True)
    assert (Path(runs.get_job(s, job_id)["run_dir"]) / "tensorboard").is_dir()
    bare = Path(runs.get_job(s, none)["run_dir"])
    assert runs.get_job(s, none)["status"] == "completed"
    assert not [p for p in ("wandb", "tensorboard", "trackio", "mlruns") if (bare / p).exists()]
    before = len(runs.list_jobs(s))
    with pytest.raises(LabError, match="unknown tracker 'comet'"):
        runs.submit(s, "sft", model="tiny", dataset="facts", report_to="tensorboard,comet")
    bad = lab_cli("run", "sft", "-m", "tiny", "-d", "facts", "--report-to", "neptune")
    assert bad.returncode == 2 and "unknown tracker 'neptune'" in bad.stderr
    assert len(runs.list_jobs(s)) == before  # nothing queued
    monkeypatch.setenv("LAB_REPORT_TO", "tensorbored")
    with pytest.raises(LabError, match="LAB_REPORT_TO: unknown tracker 'tensorbored'"):
        settings.load()
    # a run config carries it, as a string or a list; a bad name there is named with the file
    (tmp_path / "run.yaml").write_text("plugin: sft\nreport_to: [tensorboard, mlflow]\n")
    assert run_config.load(tmp_path / "run.yaml").spec["report_to"] == "tensorboard,mlflow"
    (tmp_path / "bad.yaml").write_text("plugin: sft\nreport_to: comet\n")
    with pytest.raises(LabError, match="`report_to` in bad.yaml: unknown tracker 'comet'"):
        run_config.load(tmp_path / "bad.yaml")
