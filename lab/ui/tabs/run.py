"""The run view: live curves of every logged metric, progress and ETA, the log tail, the resolved configuration
and the artifacts; a failed run shows its error and last log lines first."""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

import gradio as gr
import pandas as pd

from lab import runs
from lab.diagnosis import KINDS
from lab.errors import LabError
from lab.ui.common import TERMINAL, UI, duration, user_errors
from lab.ui.html import badge
from lab.workspace import log_tail

LOG_LINES = 200
DEFAULT_KEYS = ("loss", "eval_loss")


def header(job: dict) -> str:
    pct = 100 * job["step"] / job["total_steps"] if job["total_steps"] else (100 if job["status"] == "completed"
                                                                             else 0)
    steps = f"step {job['step']} of {job['total_steps']}" if job["total_steps"] else "no steps yet"
    bits = [f"<b>Run {job['id']}</b> · {escape(job['plugin'])}",
            f"model <b>{escape(job['model'] or '-')}</b>", f"dataset <b>{escape(job['dataset'] or '-')}</b>",
            f"experiment <b>{escape(job['experiment'] or '-')}</b>"]
    timing = [steps]
    if job["duration_s"] is not None:
        timing.append(f"ran {duration(job['duration_s'])}")
    if job["eta_s"] is not None:
        timing.append(f"about {duration(job['eta_s'])} left")
    if job["queue_position"]:
        timing.append(f"position {job['queue_position']} in the queue")
    if job["output_model"]:
        timing.append(f"output registered as model <b>{escape(job['output_model'])}</b>")
    return (f'<div class="run-head">{badge(job["status"])} {" · ".join(bits)}</div>'
            f'<div class="progress"><div class="progress-bar" style="width:{pct:.1f}%"></div></div>'
            f'<div class="run-timing">{" · ".join(timing)}</div>'
            f'<div class="run-timing">lineage: {escape(job["lineage"])}</div>')


def nonfinite(points: dict[str, list]) -> list[str]:
    """The logged values that were NaN (stored as null) or infinite, first per metric: "loss NaN at step 3"."""
    found = []
    for key in sorted(points):
        bad = [(step, value) for step, value, _ in points[key] if value is None or not math.isfinite(value)]
        if bad:
            step, value = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            found.append(f"{key} {'NaN' if value is None else value} at step {step}{more}")
    return found


def failure(job: dict, points: dict[str, list] | None = None) -> str:
    """A failed run's kind, reason and next step, and its last log lines; NaN or infinite values it logged."""
    broken = nonfinite(points or {})
    warn = (f'<div class="error-box"><b>Non-finite values were logged:</b> {escape("; ".join(broken))}</div>'
            if broken else "")
    if job["status"] != "failed":
        return warn
    tail = "\n".join((job["log_tail"] or "").splitlines()[-20:])
    kind = job.get("failure")
    title = f"This run failed: {kind} ({KINDS.get(kind, kind)})" if kind else "This run failed"
    step = (f'<div class="next-step"><b>Next step:</b> {escape(job["next_step"])}</div>'
            if job.get("next_step") else "")
    return (f'<div class="error-box" data-failure="{escape(kind or "")}"><b>{escape(title)}.</b> '
            f'{escape(job["error"] or "no reason recorded")}{step}'
            f"<pre>{escape(tail)}</pre></div>") + warn


PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")


def frame(points: dict[str, list], keys: list[str]) -> pd.DataFrame:
    rows = [{"step": step, "value": value, "metric": key} for key in keys for step, value, _ in points.get(key, [])]
    # numeric dtypes even when empty, or the chart would take its axes for categories
    return pd.DataFrame(rows, columns=["step", "value", "metric"]).astype({"step": "int64", "value": "float64"})


def plot(points: dict[str, list], keys: list[str]):
    """A chart update with stable colours. No points: no chart at all (None), because a chart first drawn from an
    empty table keeps its lines invisible when the points arrive; from None it is drawn afresh."""
    data = frame(points, keys)
    colours = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
    return gr.update(value=data if len(data) else None, color_map=colours)


def artifacts(run_dir: str | None) -> list[str]:
    if not run_dir:
        return []
    root = Path(run_dir)
    files = [root / "job.json", root / "log.txt"]
    out = root / "output"
    if out.is_dir():
        files += sorted(p for p in out.rglob("*") if p.is_file())
    return [str(f) for f in files if f.is_file()]


def config(run_dir: str | None, job: dict) -> dict:
    path = Path(run_dir or "") / "job.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"plugin": job["plugin"], "params": job["params"], "note": "job.json is written when the run starts"}


def build(ui: UI) -> None:
    with gr.Row(equal_height=True):
        job_id = gr.Number(label="Run (job id)", value=None, precision=0, scale=1, elem_id="run-job")
        refresh = gr.Button("Open / refresh", scale=1)
        keys = gr.Dropdown(label="Metrics to plot", multiselect=True, choices=list(DEFAULT_KEYS),
                           value=list(DEFAULT_KEYS), scale=4, elem_id="run-keys")
    head = gr.HTML(elem_id="run-head")
    failed = gr.HTML(elem_id="run-failure")
    with gr.Row():
        chart = gr.LinePlot(x="step", y="value", color="metric", label="Metrics", height=320, elem_id="loss-chart")
        lr = gr.LinePlot(x="step", y="value", color="metric", label="Learning rate", height=320)
    with gr.Row():
        with gr.Column(scale=3):
            log = gr.Code(label=f"Log (last {LOG_LINES} lines)", language=None, lines=16, max_lines=16,
                          interactive=False, elem_id="run-log")
        with gr.Column(scale=2):
            files = gr.File(label="Artifacts", file_count="multiple", interactive=False)
    with gr.Accordion("Resolved configuration (job.json)", open=False):
        conf = gr.JSON()
    ui["run_job"] = job_id

    shown = gr.State(None)  # what the page shows now, to send nothing when nothing changed

    def view(jid, chosen):
        if not jid:
            return ("<i>Open a run from the Jobs tab, or type its id.</i>", "", None, None, "",
                    gr.update(choices=[]), [], None, None)
        job = runs.get_job(ui.settings, int(jid))
        points = runs.metrics(ui.settings, [job["id"]]).get(job["id"], {})
        available = sorted(points)
        chosen = [k for k in (chosen or []) if k in available] or [k for k in DEFAULT_KEYS if k in available]
        log_text = log_tail(Path(job["run_dir"]) / "log.txt", LOG_LINES) if job["run_dir"] else ""
        return (header(job), failure(job, points), plot(points, chosen), plot(points, ["learning_rate"]), log_text,
                gr.update(choices=available, value=chosen), artifacts(job["run_dir"]), config(job["run_dir"], job),
                _signature(job, points, chosen, log_text))

    outputs = [head, failed, chart, lr, log, keys, files, conf, shown]
    show = user_errors(view)
    job_id.change(show, [job_id, keys], outputs)
    refresh.click(show, [job_id, keys], outputs)
    keys.input(show, [job_id, keys], outputs)

    def tick(jid, chosen, last):
        unchanged = [gr.update()] * len(outputs)
        if not jid:
            return unchanged
        try:
            job = runs.get_job(ui.settings, int(jid))
        except LabError:
            return unchanged
        if last is not None and last[0] == job["id"] and job["status"] in TERMINAL and last[1] == job["status"]:
            return unchanged  # a finished run shown as finished: nothing changes any more
        fresh = view(jid, chosen)
        return unchanged if fresh[-1] == last else fresh  # redraw the charts only when there is something new

    ui["timer"].tick(tick, [job_id, keys, shown], outputs, show_progress="hidden")


def _signature(job: dict, points: dict, chosen: list[str], log_text: str) -> tuple:
    return (job["id"], job["status"], job["step"], sum(len(v) for v in points.values()), tuple(chosen),
            len(log_text), job["queue_position"])
