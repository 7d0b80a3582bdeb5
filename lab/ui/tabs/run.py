"""The run view: live curves of every logged metric, progress and ETA, the log tail, the resolved configuration
and the artifacts; a failed run shows its error and last log lines first."""

from __future__ import annotations

import json
import math
import os
import re
from html import escape
from pathlib import Path

import gradio as gr

from lab import runs, trackers
from lab.compare import downsample
from lab.diagnosis import KINDS
from lab.errors import LabError
from lab.jobstore import PHASES
from lab.ui import charts
from lab.ui.common import TERMINAL, UI, duration, user_errors
from lab.ui.html import badge
from lab.workspace import log_tail

LOG_LINES = 200
DEFAULT_KEYS = ("loss", "eval_loss", "eval_accuracy", "eval_macro_f1", "reward")
SCORE = ("eval/", "final/", "eval_", "peak_")  # keys of scores and the peak memory: a table besides any curve
NOT_DEFAULT = re.compile(r"^(epoch|learning_rate|grad_norm|num_tokens|tokens_per_s|mfu|.*runtime|.*per_second"
                         r"|peak_.*)$")


def default_keys(available: list[str]) -> list[str]:
    """What a run's chart shows before anyone picks: its loss curves and main scores; for a run without those
    (an evaluation), its first few metrics."""
    chosen = [k for k in DEFAULT_KEYS if k in available]
    return chosen or [k for k in available if not NOT_DEFAULT.match(k)][:4]


def scores(points: dict[str, list]) -> list[list]:
    """The evaluation scores a run logged (eval/..., final/..., eval_...) and its peak memory: metric, last value,
    its step."""
    rows = []
    for key in sorted(points):
        if key.startswith(SCORE) and not key.endswith(("runtime", "per_second")) and len(points[key]):
            step, value = points[key][-1][:2]
            nan = value is None or math.isnan(value)
            rows.append([key, "NaN" if nan else float(f"{value:.6g}"), int(step)])
    return rows


def confusion(run_dir: str | None):
    """The run's confusion matrix (eval/confusion_matrix.json) as a picture, or None."""
    path = Path(run_dir or "") / "eval" / "confusion_matrix.json"
    try:
        found = json.loads(path.read_text())
        return charts.confusion([str(x) for x in found["labels"]], found["matrix"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def attempts(job: dict, log_text: str) -> str:
    """The attempt this is and why earlier starts ended (the lines the worker wrote to the log), or ""."""
    ended = [line[6:] for line in log_text.splitlines()
             if line.startswith("[lab] ") and ("goes back to the queue" in line or "went back to the queue" in line)]
    if job["attempts"] <= 1 and job["max_attempts"] <= 1 and not ended:
        return ""
    text = f"attempt {max(job['attempts'], 1)} of {job['max_attempts']}"
    if ended:
        text += f"; started {len(ended) + 1} times. Earlier starts: " + " · ".join(ended[-3:])
    return f'<div class="run-timing" id="run-attempts">{escape(text)}</div>'


def header(job: dict, log_text: str = "") -> str:
    pct = 100 * job["step"] / job["total_steps"] if job["total_steps"] else (100 if job["status"] == "completed"
                                                                             else 0)
    steps = f"step {job['step']} of {job['total_steps']}" if job["total_steps"] else "no steps yet"
    bits = [f"<b>Run {job['id']}</b> · {escape(job['plugin'])}",
            f"model <b>{escape(job['model'] or '-')}</b>", f"dataset <b>{escape(job['dataset'] or '-')}</b>",
            f"experiment <b>{escape(job['experiment'] or '-')}</b>"]
    timing = [steps]
    if job.get("phase"):  # what a running job does now: a long final evaluation or save is not a frozen page
        timing.insert(0, f'<b class="run-phase">{escape(PHASES.get(job["phase"], job["phase"]))}</b>')
    if job["duration_s"] is not None:
        timing.append(f"ran {duration(job['duration_s'])}")
    if job["eta_s"] is not None and job.get("phase") in (None, "training", "generating"):
        timing.append(f"about {duration(job['eta_s'])} left")
    if job["queue_position"]:
        timing.append(f"position {job['queue_position']} in the queue")
    if job.get("slurm_job_id"):
        nodes = f" on {escape(job['node_list'])}" if job.get("node_list") else ""
        state = f" ({escape(job['slurm_state'])})" if job.get("slurm_state") else ""
        timing.append(f"Slurm job <b>{escape(job['slurm_job_id'])}</b>{nodes}{state}")
    if job["output_model"]:
        timing.append(f"output registered as model <b>{escape(job['output_model'])}</b>")
    if job.get("output_dataset"):
        timing.append(f"output registered as dataset <b>{escape(job['output_dataset'])}</b>")
    return (f'<div class="run-head">{badge(job["status"])} {" · ".join(bits)}</div>'
            f'<div class="progress"><div class="progress-bar" style="width:{pct:.1f}%"></div></div>'
            f'<div class="run-timing">{" · ".join(timing)}</div>'
            f'<div class="run-timing">lineage: {escape(job["lineage"])}</div>' + tracked(job)
            + attempts(job, log_text))


def tracked(job: dict) -> str:
    """The trackers' files this run wrote, each with the command that opens it."""
    found = trackers.written(Path(job["run_dir"]), job["experiment"] or "default") if job.get("run_dir") else []
    if not found:
        return ""
    items = "".join(f'<li><b>{escape(t["tracker"])}</b>: <code>{escape(t["open"])}</code></li>' for t in found)
    return f'<div class="run-timing run-trackers">trackers:<ul>{items}</ul></div>'


def _pairs(line):
    """A metric's points as an array of (step, value) rows, NaN where NaN was logged: from runs.Points (already
    one) or from runs.metrics ([step, value, time] lists, a NaN stored as None)."""
    import numpy as np

    return np.asarray([p[:2] for p in line] if isinstance(line, list) else line, dtype=float).reshape(-1, 2)


def nonfinite(points: dict[str, list]) -> list[str]:
    """The logged values that were NaN (stored as null) or infinite, first per metric: "loss NaN at step 3"."""
    import numpy as np

    found = []
    for key in sorted(points):
        line = _pairs(points[key])
        bad = line[~np.isfinite(line[:, 1])]
        if len(bad):
            step, value = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            found.append(f"{key} {'NaN' if math.isnan(value) else value} at step {int(step)}{more}")
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


CURVE_POINTS = 500  # a long run's curve is downsampled to this many buckets, each keeping its extremes


def plot(points: dict[str, list], keys: list[str], title: str = "value"):
    """The chosen metrics by step, one named line each in a stable colour (NaN points left out: they are named
    above the charts)."""
    import numpy as np

    series = []
    for i, key in enumerate(keys):
        line = _pairs(points.get(key, []))
        line = line[np.isfinite(line[:, 1])]
        if not len(line):
            continue
        xs, ys = downsample(line[:, 0], line[:, 1], CURVE_POINTS)
        series.append(charts.Line(key, PALETTE[i % len(PALETTE)], xs.tolist(), ys.tolist()))
    return charts.lines(series, x_title="step", y_title=title, whole_x=True,
                        empty="no points logged yet" if keys else "pick metrics to plot")


ARTIFACTS_MAX = 200
SKIPPED = ("checkpoints", "base-merged", ".staging")  # resume state and scratch: large, and not results


def artifacts(run_dir: str | None) -> list[str]:
    """Every file the run wrote (its log, configuration, output, evaluation files, samples), but its checkpoints
    and links: W&B's offline run links its core log to ~/.cache, outside anything the page may serve."""
    if not run_dir or not Path(run_dir).is_dir():
        return []
    root = Path(run_dir)
    first, inside = [], []  # job.json, log.txt, ... before what lies in folders
    for folder, subfolders, names in os.walk(root):
        if folder == str(root):
            subfolders[:] = [d for d in subfolders if d not in SKIPPED]  # checkpoints are not walked at all
        (first if folder == str(root) else inside).extend(Path(folder) / n for n in names
                                                          if not os.path.islink(os.path.join(folder, n)))
    return [str(f) for f in (sorted(first) + sorted(inside))[:ARTIFACTS_MAX]]


def config(run_dir: str | None, job: dict) -> dict:
    path = Path(run_dir or "") / "job.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"plugin": job["plugin"], "params": job["params"], "note": "job.json is written when the run starts"}


def build(ui: UI) -> None:
    with gr.Row(equal_height=True):
        job_id = gr.Number(label="Run (job id)", value=None, precision=0, scale=1, elem_id="run-job")
        refresh = gr.Button("Open / refresh", scale=1)
        keys = gr.Dropdown(label="Metrics to plot", multiselect=True, choices=[], value=[], scale=4,
                           elem_id="run-keys", allow_custom_value=True)  # choices follow the run: never an error
    head = gr.HTML(elem_id="run-head")
    failed = gr.HTML(elem_id="run-failure")
    with gr.Row():
        chart = gr.Plot(label="Metrics", elem_id="loss-chart")
        lr = gr.Plot(label="Learning rate", elem_id="lr-chart")
    with gr.Row():
        score_table = gr.Dataframe(headers=["metric", "value", "step"], label="Scores", interactive=False,
                                   visible=False, elem_id="run-scores")
        matrix = gr.Plot(label="Confusion matrix", visible=False, elem_id="run-confusion")
    with gr.Row():
        with gr.Column(scale=3):
            log = gr.Textbox(label=f"Log (last {LOG_LINES} lines)", lines=16, max_lines=16, autoscroll=True,
                             interactive=False, buttons=["copy"], elem_id="run-log")
        with gr.Column(scale=2):
            files = gr.File(label="Artifacts", file_count="multiple", interactive=False, elem_id="run-files")
    with gr.Accordion("Resolved configuration (job.json)", open=False):
        conf = gr.JSON()
    ui["run_job"] = job_id

    # per page: the run's points read so far (each tick reads only the points logged since) and the signature of
    # what the page shows, to send nothing when nothing changed
    held = gr.State(None)

    def view(jid, chosen, state):
        if not jid:
            return ("<i>Open a run from the Jobs tab, or type its id.</i>", "", None, None, "",
                    gr.update(choices=[], value=[]), [], None, gr.update(visible=False), gr.update(visible=False),
                    None)
        return render(*read(runs.get_job(ui.settings, int(jid)), chosen, state))

    def read(job, chosen, state):
        """What the page draws from: the job, its points (only the new ones read), the metrics to plot, its log."""
        found = state["points"] if state and state["points"].job_id == job["id"] else runs.Points(job["id"])
        found.update(ui.settings)
        available = sorted(found.by_key)
        chosen = [k for k in (chosen or []) if k in available] or default_keys(available)
        log_text = log_tail(Path(job["run_dir"]) / "log.txt", LOG_LINES) if job["run_dir"] else ""
        return job, found, chosen, log_text

    def render(job, found, chosen, log_text):
        points = found.by_key
        available = sorted(points)
        shown = scores(points)
        picture = confusion(job["run_dir"])
        return (header(job, log_text), failure(job, points), plot(points, chosen),
                plot(points, ["learning_rate"], "learning rate"), log_text,
                gr.update(choices=available, value=chosen), artifacts(job["run_dir"]), config(job["run_dir"], job),
                gr.update(value=shown, visible=bool(shown)), gr.update(value=picture, visible=picture is not None),
                {"points": found, "signature": _signature(job, found, chosen, log_text)})

    outputs = [head, failed, chart, lr, log, keys, files, conf, score_table, matrix, held]
    # the log opens at its newest lines (a text box scrolls itself only when it grows while shown)
    log.change(None, js="() => { const t = document.querySelector('#run-log textarea'); "
                        "if (t) { setTimeout(() => { t.scrollTop = t.scrollHeight; }, 50); } }")
    show = user_errors(view)
    job_id.change(show, [job_id, keys, held], outputs)
    refresh.click(show, [job_id, keys, held], outputs)
    keys.input(show, [job_id, keys, held], outputs)

    def tick(v: dict) -> dict:
        jid, state = v[job_id], v[held]
        if not jid:
            return {}
        try:
            job = runs.get_job(ui.settings, int(jid))
        except LabError:
            return {}
        last = state["signature"] if state else None
        if last is not None and last[0] == job["id"] and job["status"] in TERMINAL and last[1] == job["status"]:
            return {}  # a finished run shown as finished: nothing changes any more
        found = read(job, v[keys], state)
        if _signature(*found) == last:  # nothing new to draw (no chart, file walk or picture); the time goes on
            return {head: header(job, found[3])} if job["status"] == "running" else {}
        return dict(zip(outputs, render(*found), strict=True))

    ui.on_tick(tick, outputs, inputs=[job_id, keys, held])


def _signature(job: dict, found: runs.Points, chosen: list[str], log_text: str) -> tuple:
    return (job["id"], job["status"], job["step"], found.last_id, found.count, tuple(chosen), len(log_text),
            job["queue_position"])
