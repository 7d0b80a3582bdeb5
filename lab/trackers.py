"""Experiment trackers a run reports to beside the lab's own metrics: W&B, TensorBoard, Trackio and MLflow, any of
them at once, through the Trainer's own integrations (`report_to`). Each writes its files inside the run folder and
works offline:

    <run>/wandb/        W&B offline run (LAB_WANDB=offline), `wandb sync` uploads it later
    <run>/tensorboard/  TensorBoard event files            tensorboard --logdir <run>/tensorboard
    <run>/trackio/      Trackio's SQLite store              TRACKIO_DIR=<run>/trackio trackio show
    <run>/mlruns/       an MLflow file store                mlflow ui --backend-store-uri <run>/mlruns

A job names its trackers (`lab run --report-to tensorboard,mlflow`, the Train page, the API, a run config's
`report_to`); without a choice it takes LAB_REPORT_TO. `none` reports to none.
"""

from __future__ import annotations

from pathlib import Path

from lab.errors import LabError

TRACKERS = ("wandb", "tensorboard", "trackio", "mlflow")
FOLDERS = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlruns"}


def parse(value: str | list | tuple | None, what: str = "report_to") -> list[str] | None:
    """A tracker list from 'wandb,tensorboard', a list, or 'none' (→ []); None and '' stay None (the default)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    if isinstance(value, str) and not value.strip():
        return None
    names = [str(i).strip().lower() for i in items if str(i).strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise LabError(f"{what}: unknown tracker {unknown[0]!r}",
                       f"choose from {', '.join(TRACKERS)}, several separated by commas, or none")
    return list(dict.fromkeys(names))


def stored(value: list[str] | None) -> str | None:
    """The jobs.report_to column's text: None for the default, '' for none."""
    return None if value is None else ",".join(value)


def for_run(job_value: str | None, default: str, wandb_mode: str) -> tuple[list[str], str | None]:
    """The trackers a run reports to (the job's choice, else the settings' default), and why one was dropped:
    W&B is off when LAB_WANDB=off."""
    chosen = parse(job_value) if job_value is not None else parse(default, "LAB_REPORT_TO")
    chosen = ["wandb"] if chosen is None else chosen
    if wandb_mode == "off" and "wandb" in chosen:
        return [t for t in chosen if t != "wandb"], "W&B is off (LAB_WANDB=off): not reporting to wandb"
    return chosen, None


def environment(chosen: list[str], run_dir: Path, experiment: str, run_name: str, wandb_mode: str) -> dict[str, str]:
    """The environment that points each tracker's Trainer integration at the run folder (and keeps it offline)."""
    env = {}
    if "wandb" in chosen:
        env.update(WANDB_MODE=wandb_mode, WANDB_DIR=str(run_dir), WANDB_PROJECT=experiment, WANDB_NAME=run_name,
                   WANDB_SILENT="true")
    else:
        env["WANDB_DISABLED"] = "true"
    if "tensorboard" in chosen:
        env["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "trackio" in chosen:
        env["TRACKIO_DIR"] = str(run_dir / "trackio")
    if "mlflow" in chosen:
        # a file store inside the run folder (MLflow keeps it working when asked: it prefers a database server)
        env.update(MLFLOW_TRACKING_URI=(run_dir / "mlruns").resolve().as_uri(), MLFLOW_EXPERIMENT_NAME=experiment,
                   MLFLOW_ALLOW_FILE_STORE="true")
    else:
        env["DISABLE_MLFLOW_INTEGRATION"] = "TRUE"
    return env


def written(run_dir: Path, experiment: str) -> list[dict]:
    """The trackers' folders a run holds, each with the command that opens it."""
    out = []
    for name, folder in FOLDERS.items():
        path = run_dir / folder
        if not path.is_dir() or not any(path.iterdir()):
            continue
        how = {"wandb": f"wandb sync {path}/offline-run-*",
               "tensorboard": f"tensorboard --logdir {path}",
               "trackio": f"TRACKIO_DIR={path} trackio show --project {experiment}",
               "mlflow": f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {path.resolve().as_uri()}"}[name]
        out.append({"tracker": name, "folder": str(path), "open": how})
    return out
