"""Jobs: the queue and history, filtered; cancel, reprioritise, open, or clone a job into the Train form."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from lab import jobstore, runs
from lab.errors import LabError
from lab.tables import JOB_STATES
from lab.ui import choices
from lab.ui.common import UI, duration, user_errors
from lab.ui.html import md

COLUMNS = ["id", "experiment", "plugin", "model", "dataset", "status", "failure", "progress", "ETA", "queue",
           "created", "duration"]
WIDTHS = ["5%", "10%", "6%", "13%", "12%", "9%", "9%", "10%", "6%", "5%", "9%", "6%"]


def _when(iso: str | None) -> str:
    """'11-23 09:22' from an ISO time: short enough for the table."""
    return iso[5:16].replace("T", " ") if iso else ""


def table(ui: UI, experiment: str | None, status: str | None) -> pd.DataFrame:
    rows = runs.list_jobs(ui.settings, experiment=None if experiment in (None, "", "all") else experiment,
                          status=None if status in (None, "", "all") else status)
    out = []
    for j in rows:
        progress = ""
        if j["total_steps"]:
            progress = f"{j['step']}/{j['total_steps']} ({100 * j['step'] / j['total_steps']:.0f}%)"
        if j.get("phase"):  # what a running job is doing now: loading, training, evaluating, saving, ...
            phase = jobstore.PHASES.get(j["phase"], j["phase"]) if j["phase"] == "slurm_pending" else j["phase"]
            progress = f"{phase} {progress}".strip()
        if j.get("slurm_job_id"):  # where it runs: the Slurm job and its nodes
            where = f"Slurm {j['slurm_job_id']}" + (f" on {j['node_list']}" if j.get("node_list") else "")
            progress = f"{where} · {progress}" if progress else where
        out.append({
            "id": j["id"], "experiment": j["experiment"], "plugin": j["plugin"], "model": j["model"] or "",
            "dataset": j["dataset"] or "", "status": j["status"] + (" (cancelling)" if j["cancel_requested"]
                                                                     and j["status"] == "running" else ""),
            "failure": j["failure"] or "", "progress": progress, "ETA": duration(j["eta_s"]),
            "queue": j["queue_position"] or "",
            "created": _when(j["created_at"]), "duration": duration(j["duration_s"]),
        })
    return pd.DataFrame(out, columns=COLUMNS)


def workers_line(ui: UI) -> str:
    live = jobstore.live_workers(ui.settings)
    if not live:
        return "**No worker is running**: queued jobs wait until one starts (`lab serve` or `lab worker`)."
    busy = [w for w in live if w.status == "busy"]
    owned = sorted({w.capacity for w in live if w.capacity})
    return f"{len(live)} worker(s) alive, {len(busy)} busy" + (f" ({md('; '.join(owned))})" if owned else "") + "."


def build(ui: UI) -> None:
    with gr.Row():
        experiment = gr.Dropdown(label="Experiment", choices=["all"], value="all", scale=1)
        status = gr.Dropdown(label="Status", choices=["all", *JOB_STATES], value="all", scale=1)
        workers = gr.Markdown()
    jobs = gr.Dataframe(interactive=False, column_widths=WIDTHS, label="Jobs (newest first)",
                        elem_id="jobs-table", wrap=True, max_height=520)
    with gr.Row():
        job_id = gr.Number(label="Selected job: click a row", value=None, precision=0, scale=1,
                           elem_id="selected-job")
        with gr.Column(scale=4), gr.Row():
            open_ = gr.Button("Open", variant="primary", size="sm")
            cancel = gr.Button("Cancel", variant="stop", size="sm")
            up = gr.Button("Priority +1", size="sm")
            down = gr.Button("Priority −1", size="sm")
            clone = gr.Button("Clone into Train", size="sm")
    message = gr.Markdown()
    ui.c.update(jobs_experiment=experiment, jobs_status=status, jobs_table=jobs, jobs_workers=workers)
    ui.on_refresh(lambda v: {experiment: gr.update(choices=["all", *choices.experiments(ui)]),
                             jobs: table(ui, v[experiment], v[status]), workers: workers_line(ui)},
                  [experiment, jobs, workers], inputs=[experiment, status])

    filters = [experiment, status]
    def jobs_filter(e, s):
        return table(ui, e, s)

    ui.on_tick(lambda v: {jobs: table(ui, v[experiment], v[status]), workers: workers_line(ui)}, [jobs, workers],
               inputs=filters)
    experiment.change(jobs_filter, filters, [jobs])
    status.change(jobs_filter, filters, [jobs])

    def on_select(evt: gr.SelectData, frame: pd.DataFrame):
        return int(frame.iloc[evt.index[0]]["id"])

    jobs.select(on_select, [jobs], [job_id])

    def need(job) -> int:
        if not job:
            raise LabError("select a job first (click its row)")
        return int(job)

    @user_errors
    def on_cancel(job, e, s):
        state = jobstore.cancel(ui.settings, need(job))
        return f"job {int(job)}: {state}", table(ui, e, s)

    @user_errors
    def on_priority(job, delta, e, s):
        current = runs.get_job(ui.settings, need(job))["priority"]
        jobstore.set_priority(ui.settings, int(job), current + delta)
        return f"job {int(job)}: priority {current + delta}", table(ui, e, s)

    cancel.click(on_cancel, [job_id, *filters], [message, jobs])
    up.click(lambda j, e, s: on_priority(j, 1, e, s), [job_id, *filters], [message, jobs])
    down.click(lambda j, e, s: on_priority(j, -1, e, s), [job_id, *filters], [message, jobs])
    open_.click(user_errors(lambda j: (need(j), gr.update(selected="run"))), [job_id], [ui["run_job"], ui["tabs"]])

    ui["jobs_job"] = job_id

    @user_errors
    def on_clone(page, v: dict) -> dict:
        """The job's whole spec back in the Train form (method, model, dataset, parameters, resources, follow-up)."""
        spec = runs.spec_of(ui.settings, need(v["jobs_job"]))
        return {**page.fill(spec, v["held"]), "tabs": gr.update(selected="train")}

    ui.train.on(clone.click, on_clone, ["jobs_job", "held"], [*ui.train.filled_names(), "tabs"]).success(
        *ui.train.after_plugin())
