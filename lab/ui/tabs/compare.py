"""Compare: pick runs (filters, groups, the last N), overlay any metric's curves, rank them in a leaderboard with
the best cell of each column marked, and see how their configurations differ and where their models came from."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from lab import compare, runs
from lab.tables import JOB_STATES
from lab.ui import charts
from lab.ui.common import UI, user_errors
from lab.ui.html import md

ALL = "all"


def _filters(ui: UI) -> dict:
    jobs = runs.list_jobs(ui.settings, limit=5000)
    return {"experiments": sorted({j["experiment"] for j in jobs}), "plugins": sorted({j["plugin"] for j in jobs}),
            "groups": sorted({j["group"] for j in jobs if j["group"]}),
            "tags": sorted({t for j in jobs for t in j["tags"]})}


def _styled(columns: list[str], rows: list[dict], best: dict[str, int]):
    frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    ids = [r["id"] for r in rows]

    def mark(column: pd.Series):
        winner = best.get(column.name)
        return ["background-color: #bbf7d0; font-weight: 600" if winner == i else "" for i in ids]

    return frame.style.apply(mark, axis=0).format(precision=4, na_rep="")


def winner_line(columns: list[str], rows: list[dict], column: str) -> str:
    """What "Best run by" says of a leaderboard column: the best run and its value, or the runs that tie for it."""
    top = compare.leaders(columns, rows).get(column)
    if not top:
        return ""
    named = {r["id"]: r for r in rows}
    value = f"{named[top[0]][column]:.4g}"
    if len(top) > 1:
        runs_named = ", ".join(f"**{md(named[i]['run'])}**" for i in top)
        return f"A tie by **{md(column)}** ({value}): {runs_named}; none is marked best"
    return f"Best by **{md(column)}**: **{md(named[top[0]]['run'])}** ({value})"


def build(ui: UI) -> None:
    with gr.Row():
        experiment = gr.Dropdown(label="Experiment", choices=[ALL], value=ALL, scale=1)
        plugin = gr.Dropdown(label="Plugin", choices=[ALL], value=ALL, scale=1)
        status = gr.Dropdown(label="Status", choices=[ALL, *JOB_STATES], value="completed", scale=1)
        group = gr.Dropdown(label="Group (sweep)", choices=[ALL], value=ALL, scale=1, elem_id="compare-group")
        tag = gr.Dropdown(label="Tag", choices=[ALL], value=ALL, scale=1)
        kind = gr.Dropdown(label="Kind", choices=["train", "eval", "data", ALL], value="train", scale=1)
        last = gr.Number(label="Last N runs", value=10, precision=0, minimum=1, scale=1)
        mix = gr.Checkbox(label="mix methods", value=False, scale=1)  # off: Plugin 'all' means the newest's
        pick = gr.Button("Select", variant="primary", scale=1)
    chosen = gr.Dropdown(label="Runs", multiselect=True, choices=[], value=[], elem_id="compare-runs")
    picked = gr.Markdown(elem_id="compare-picked")
    with gr.Row():
        key = gr.Dropdown(label="Metric", choices=["loss"], value="loss", scale=2, elem_id="compare-metric",
                          allow_custom_value=True)  # its choices follow the runs: a stale value is not an error
        x = gr.Radio(label="x axis", choices=["step", "tokens", "time"], value="step", scale=2)
        smoothing = gr.Slider(label="Smoothing", minimum=0, maximum=0.99, step=0.01, value=0, scale=2)
        log_scale = gr.Checkbox(label="log scale", value=False, scale=1)
    chart = gr.Plot(label="Curves", elem_id="compare-chart")
    gr.Markdown("#### Leaderboard\nFinal value of every metric, the best value of those that moved, and the scores "
                "of evaluations of each run's output; the best cell of each column is marked.")
    diagnostics = gr.Checkbox(label="Also show diagnostics (gradient norm, entropy, KL, log-probabilities, speed: "
                                    "metrics with no better direction)", value=False, elem_id="compare-diagnostics")
    board = gr.Dataframe(interactive=False, wrap=True, elem_id="compare-board", max_height=400)
    with gr.Row():
        rank_by = gr.Dropdown(label="Best run by", choices=[], scale=2)
        winner = gr.Markdown(elem_id="compare-winner")
    gr.Markdown("#### Is the difference real\nEach run's evaluation scores against the oldest run's, example by "
                "example: the difference of means with its 95 % paired bootstrap interval, significant when the "
                "interval leaves out zero. A run judged against another model (eval-judge): an exact sign test of "
                "its wins against its losses.")
    real = gr.Dataframe(interactive=False, wrap=True, elem_id="compare-significance")
    gr.Markdown("#### Configuration")
    show_all = gr.Checkbox(label="Show every setting (not only the ones that differ)", value=False)
    diff = gr.Dataframe(interactive=False, wrap=True, elem_id="compare-diff")
    lineage = gr.Markdown(elem_id="compare-lineage")
    ui.c.update(compare_group=group, compare_kind=kind, compare_runs=chosen, compare_pick=pick,
                compare_filters=[experiment, plugin, group, tag])

    def refresh_filters():
        f = _filters(ui)
        return (gr.update(choices=[ALL, *f["experiments"]]), gr.update(choices=[ALL, *f["plugins"]]),
                gr.update(choices=[ALL, *f["groups"]]), gr.update(choices=[ALL, *f["tags"]]))

    ui["compare_refresh"] = (refresh_filters, [experiment, plugin, group, tag])

    def on_pick(exp, plug, stat, grp, tg, knd, n, mixed):
        filters = dict(experiment=None if exp == ALL else exp, status=None if stat == ALL else stat,
                       group=None if grp == ALL else grp, tag=None if tg == ALL else tg,
                       kind=None if knd == ALL else knd, last=int(n) if n else None)
        found = compare.select_runs(ui.settings, plugin=None if plug == ALL else plug, **filters)
        note = ""
        methods = sorted({j["plugin"] for j in found})
        if plug == ALL and not mixed and len(methods) > 1:  # losses of different methods do not compare
            newest = found[0]["plugin"]
            found = compare.select_runs(ui.settings, plugin=newest, **filters)
            note = (f"Showing **{md(newest)}** runs only (the newest run's method; also found: "
                    f"{md(', '.join(m for m in methods if m != newest))}). Tick *mix methods* to compare across.")
        options = [(compare.label(j), str(j["id"])) for j in found]
        return gr.update(choices=options, value=[v for _, v in options]), note

    picking = pick.click(user_errors(on_pick), [experiment, plugin, status, group, tag, kind, last, mix],
                         [chosen, picked])

    def ids_of(values) -> list[int]:
        return [int(v) for v in values or []]

    def on_runs(values, current_key, show_diagnostics=False):
        ids = ids_of(values)
        if not ids:  # nothing chosen (every page load without ?group=): nothing to read
            return gr.update(choices=[], value=None), None, gr.update(choices=[], value=None), None, "", None
        keys = compare.keys(ui.settings, ids)
        metric = current_key if current_key in keys else ("loss" if "loss" in keys else (keys[0] if keys else None))
        jobs = runs.jobs_by_id(ui.settings, ids)  # read once for the leaderboard, the diff and the lineage
        columns, rows, best = compare.leaderboard(ui.settings, ids, keys, jobs=jobs)
        columns = compare.shown_columns(columns, bool(show_diagnostics))
        ranked = list(compare.leaders(columns, rows))  # in column order, ties too: "Best run by" says so
        # rank by an evaluation score when there is one, else by the final loss
        default = next((c for c in ranked if c.startswith("eval")), "loss" if "loss" in ranked else None)
        diff_cols, diff_rows = compare.config_diff(ui.settings, ids, jobs=jobs)
        lines = "\n".join(f"- **{md(name)}**: {md(chain)}"
                          for name, chain in compare.lineages(ui.settings, ids, jobs=jobs))
        differences = compare.differences(ui.settings, sorted(ids), jobs=jobs)  # against the oldest run
        return (gr.update(choices=keys, value=metric), _styled(columns, rows, best) if rows else None,
                gr.update(choices=ranked, value=default or (ranked[0] if ranked else None)),
                pd.DataFrame(diff_rows, columns=diff_cols) if ids else None,
                ("#### Lineage\n" + lines) if lines else "",
                pd.DataFrame(differences, columns=["run", "against", "score", "difference", "examples"])
                if differences else None)

    shown = [key, board, rank_by, diff, lineage, real]
    chosen.input(user_errors(on_runs), [chosen, key, diagnostics], shown)
    diagnostics.change(user_errors(on_runs), [chosen, key, diagnostics], shown)

    def on_chart(values, metric, axis, weight, log):
        ids = ids_of(values)
        titles = {"step": "step", "tokens": "tokens seen", "time": "time (s since the run's first point)"}
        if not ids or not metric:
            return charts.lines([], x_title=titles[axis], y_title=metric or "", empty="pick runs and a metric")
        found = runs.jobs_by_id(ui.settings, ids)  # read once for the curves' labels and the legend
        data = compare.curves(ui.settings, ids, metric, x=axis, smoothing=float(weight or 0), log_scale=bool(log),
                              jobs=found)
        jobs = {j["id"]: j for j in found}
        series = [charts.Line(compare.label(jobs[i]), compare.colour(i), part["x"].tolist(), part["value"].tolist())
                  for i, part in data.groupby("job", sort=False) if i in jobs]
        missing = "no token counts logged by these runs" if axis == "tokens" else f"no {metric} logged"
        return charts.lines(series, x_title=titles[axis], y_title=metric, log_y=bool(log),
                            whole_x=axis in ("step", "tokens"), height=400, empty=missing)

    for trigger in (key.change, x.change, smoothing.release, log_scale.change, chosen.input):
        trigger(user_errors(on_chart), [chosen, key, x, smoothing, log_scale], [chart], show_progress="hidden")

    def after(event) -> None:
        """Show the runs an event chose (Select, a sweep launched on Train, the page opened on ?group=). The
        chosen runs are followed on the user's edits (`input`) and after each such event, not on `change`: this
        Gradio's multiselect fires `change` again whenever the page updates any loading status (its list value
        is copied and compared by identity), which re-drew the Compare page every second or so while it was open."""
        event.then(user_errors(on_runs), [chosen, key, diagnostics], shown)
        event.then(user_errors(on_chart), [chosen, key, x, smoothing, log_scale], [chart], show_progress="hidden")

    ui["compare_after"] = after
    after(picking)

    def on_rank(values, column):
        ids = ids_of(values)
        if not ids or not column:
            return ""
        columns, rows, _ = compare.leaderboard(ui.settings, ids)
        return winner_line(columns, rows, column)

    rank_by.change(user_errors(on_rank), [chosen, rank_by], [winner])

    def on_diff(values, every):
        ids = ids_of(values)
        if not ids:
            return None
        columns, rows = compare.config_diff(ui.settings, ids, only_differences=not every)
        return pd.DataFrame(rows, columns=columns)

    show_all.change(user_errors(on_diff), [chosen, show_all], [diff])
