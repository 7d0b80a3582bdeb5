"""Comparing runs: pick them, overlay their curves (downsampled without losing extremes), rank them in a
leaderboard of final and best values and evaluation scores, and diff their configurations."""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict, defaultdict
from pathlib import Path

from sqlalchemy import func, select

from lab import runs, significance
from lab.db import plain_rows, read_session
from lab.errors import LabError
from lab.settings import Settings
from lab.tables import TERMINAL_STATES, Job, Metric, Model

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563", "#65a30d",
           "#9333ea", "#ea580c", "#0d9488")
COUNTERS = re.compile(r"(^|[:/])(num_tokens|rows|tokens|episode)$")  # totals, not scores: no best value
LOWER_IS_BETTER = re.compile(r"loss|perplexity|error", re.IGNORECASE)
HIGHER_IS_BETTER = re.compile(r"accurac(y|ies)|(^|[/_:])(macro_)?f1|precision|recall|score|bleu|rouge|chrf|exact_match"
                              r"|contains|margin|win_rate|mean_preference|people_(agreement|kappa|kendall|spearman)|(^|[/_:])acc(_norm)?$|mcc"
                              r"|(^|[/:])rewards?(/mean|/chosen)?$",
                              re.IGNORECASE)


def direction(key: str) -> str | None:
    """Which way a metric is better: "lower" (losses, perplexity, error), "higher" (accuracy, F1, rewards,
    margins, text-overlap scores) or None for diagnostics (gradient norm, entropy, KL, speed, log-probabilities,
    a rejected answer's reward, a standard error), which are never marked best."""
    name = key.removeprefix("best ").split(":", 1)[-1]
    if "rejected" in name or name.startswith(("logps", "logits")) or "_stderr" in name:
        return None
    if LOWER_IS_BETTER.search(name):
        return "lower"
    return "higher" if HIGHER_IS_BETTER.search(name) else None
HIDDEN = re.compile(r"^(epoch|step|total_flos|train_runtime|.*samples_per_second|.*steps_per_second|lr|learning_rate"
                    r"|eval_runtime|num_input_tokens_seen|train_tokens_per_second)$")


def colour(job_id: int) -> str:
    """A run keeps its colour on every chart, whatever else is selected."""
    return PALETTE[job_id % len(PALETTE)]


def label(job: dict) -> str:
    return f"#{job['id']} {job['plugin']}" + (f" {job['model']}" if job.get("model") else "")


def select_runs(settings: Settings, *, experiment: str | None = None, plugin: str | None = None,
                status: str | None = None, group: str | None = None, tag: str | None = None,
                last: int | None = None, kind: str | None = "train") -> list[dict]:
    """Jobs matching the filters, newest first; `last` keeps the newest N. kind: train, eval or data runs (None: all);
    the scores of a training run's evaluations show in its own leaderboard row either way."""
    from lab import plugins

    rows = runs.list_jobs(settings, experiment=experiment, status=status, group=group, plugin=plugin, limit=5000)
    if tag:
        rows = [r for r in rows if tag in r["tags"]]
    if kind:
        found, _ = plugins.discover(settings)
        rows = [r for r in rows if r["plugin"] in found and found[r["plugin"]].kind == kind]
    return rows[:last] if last else rows


def group_runs(settings: Settings, group: str) -> tuple[list[dict], str | None]:
    """A group's runs to compare, newest first, and the kind they were picked by: its training runs ("train"), or
    all of them (None) when it has none (a group of evaluations, e.g. `lab run eval-harness --group G` on several
    models)."""
    trained = select_runs(settings, group=group)
    return (trained, "train") if trained else (select_runs(settings, group=group, kind=None), None)


def keys(settings: Settings, job_ids: list[int]) -> list[str]:
    """Every metric logged by any of the runs."""
    if not job_ids:
        return []
    with read_session(settings) as s:
        return runs.metric_names(s, job_ids)


def downsample(xs, ys, buckets: int):
    """At most 2 x buckets points of a curve: each bucket of consecutive points keeps its minimum and its maximum
    (in x order), so spikes and the curve's extremes survive. Arrays in, arrays out."""
    import numpy as np

    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    n = len(ys)
    if n <= 2 * buckets:
        return xs, ys
    bucket = np.arange(n) * buckets // n
    order = np.lexsort((ys, bucket))  # by bucket, then by value
    edges = np.flatnonzero(np.diff(bucket[order])) + 1
    first, last = np.r_[0, edges], np.r_[edges - 1, n - 1]
    keep = np.unique(np.concatenate([order[first], order[last]]))  # unique also puts them back in x order
    return xs[keep], ys[keep]


def smooth(values, weight: float):
    """Exponential moving average with debiasing (as TensorBoard and W&B draw it); weight 0 leaves them."""
    import numpy as np
    import pandas as pd

    values = np.asarray(values, dtype=float)
    if weight <= 0 or not len(values):
        return values
    # pandas' adjusted EWM is exactly the debiased average: sum(w^i x[t-i]) / sum(w^i)
    return pd.Series(values).ewm(alpha=1 - weight, adjust=True).mean().to_numpy()


def _columns(rows, n: int):
    """The first n columns of result rows (plain tuples) as float arrays; a stored NaN (NULL) becomes NaN again."""
    import numpy as np

    table = np.array(rows, dtype=float).reshape(len(rows), -1)  # None -> NaN
    return [table[:, i] for i in range(n)]


class _Kept:
    """What finished runs logged, kept in memory by (job, what, its stamp): a finished run's points no longer
    change, so they are read once (until it starts again, which changes its stamp). Beyond `limit`, counted by
    `size`, the least recently used go first."""

    def __init__(self, limit: int, size):
        self.items: OrderedDict = OrderedDict()
        self.limit, self.size, self.total = limit, size, 0
        self.lock = threading.Lock()  # the page's events run in several threads

    def __iter__(self):
        return iter(self.items)

    def take(self, job_ids: list[int], stamps: dict[int, tuple], what) -> tuple[dict, list[int]]:
        """{job: value} of the runs kept, and the runs (of those that exist) that must be read."""
        out, missing = {}, []
        with self.lock:
            for job_id in job_ids:
                key = (job_id, what, stamps.get(job_id))
                if key in self.items:
                    self.items.move_to_end(key)
                    out[job_id] = self.items[key]
                elif job_id in stamps:
                    missing.append(job_id)
        return out, missing

    def keep(self, read: dict, stamps: dict[int, tuple], what) -> None:
        """Keep what was just read of the runs that have finished."""
        with self.lock:
            for job_id, value in read.items():
                key = (job_id, what, stamps[job_id])
                if stamps[job_id][0] in TERMINAL_STATES and key not in self.items:
                    self.items[key] = value
                    self.total += self.size(value)
            while self.items and self.total > self.limit:
                self.total -= self.size(self.items.popitem(last=False)[1])


_SERIES = _Kept(4_000_000, lambda found: len(found[0]))  # (steps, values) of a metric: 4 M points, about 64 MB
_SUMMARIES = _Kept(20_000, lambda found: 1)  # the leaderboard's figures of a run


def _stamps(s, settings: Settings, job_ids: list[int]) -> dict[int, tuple]:
    """What a run's logged points depend on: a finished run's stay as they are until it starts again (a retry or a
    resume changes its attempts, its status and its finish time)."""
    return {job_id: (status, finished_at, attempts, settings.database_url)
            for job_id, status, finished_at, attempts in s.execute(
                select(Job.id, Job.status, Job.finished_at, Job.attempts).where(Job.id.in_(job_ids)))}


def series(settings: Settings, job_ids: list[int], key: str) -> dict:
    """{job: (steps, values)} of one metric, float arrays in step order (NaN where NaN was logged). A finished
    run's points no longer change, so they are read once and kept in memory (until the run is started again): the
    Compare page redraws with another x axis, smoothing or scale without reading them again."""
    import numpy as np

    with read_session(settings) as s:
        stamps = _stamps(s, settings, job_ids)
        out, missing = _SERIES.take(job_ids, stamps, key)
        if not missing:
            return out
        # plain tuples, read from the (key, job, step, value) index alone
        rows = plain_rows(s, select(Metric.job_id, Metric.step, Metric.value)
                          .where(Metric.key == key, Metric.job_id.in_(missing)).order_by(Metric.job_id, Metric.step))
    if rows:
        jobs, steps, values = _columns(rows, 3)
        starts = np.r_[0, np.flatnonzero(np.diff(jobs)) + 1, len(rows)]
        read = {int(jobs[a]): (steps[a:b].copy(), values[a:b].copy()) for a, b in zip(starts[:-1], starts[1:],
                                                                                          strict=True)}
        out.update(read)
        _SERIES.keep(read, stamps, key)
    return out


def curves(settings: Settings, job_ids: list[int], key: str, *, x: str = "step", smoothing: float = 0.0,
           log_scale: bool = False, buckets: int = 250, jobs: list[dict] | None = None):
    """A table (pandas) of job, run, x, value: one metric for several runs, ready for a chart. x: step, tokens, or
    time (seconds since the run's first point). Long curves are downsampled keeping every bucket's extremes.
    log_scale: only the values a logarithmic axis can show (above 0). jobs: the runs as runs.jobs_by_id gives
    them, when the caller has read them already (for the run labels)."""
    import numpy as np
    import pandas as pd

    if x not in ("step", "tokens", "time"):
        raise LabError(f"x must be step, tokens or time, got {x!r}")
    found = series(settings, job_ids, key)
    tokens = {}  # job -> (steps, token counts), both in step order
    if x == "tokens":
        tokens = series(settings, job_ids, "num_tokens")
        others = [j for j in job_ids if j not in tokens]
        tokens.update(series(settings, others, "num_input_tokens_seen") if others else {})
    times = {}  # job -> seconds since its first point, in step order (read only when drawn: times are slow to read)
    if x == "time":
        with read_session(settings) as s:
            for job_id, t in s.execute(select(Metric.job_id, Metric.time).where(
                    Metric.key == key, Metric.job_id.in_(job_ids)).order_by(Metric.job_id, Metric.step)):
                times.setdefault(job_id, []).append(t)
    names = {i: j["plugin"] for i, j in _by_id(settings, job_ids, jobs).items()}
    parts = []
    for job_id in sorted(found):
        steps, values = found[job_id]
        if x == "step":
            xs = steps
        elif x == "time":
            t0 = times[job_id][0]
            xs = np.array([(t - t0).total_seconds() for t in times[job_id]])
        else:
            if job_id not in tokens:
                continue  # this run logged no token counts
            at, count = tokens[job_id]
            idx = np.clip(np.searchsorted(at, steps, side="right") - 1, 0, len(at) - 1)
            xs = count[idx]  # the count at or before each point's step
        ys = smooth(values, smoothing)
        ok = np.isfinite(ys) & ((ys > 0) if log_scale else True)
        xs, ys = downsample(xs[ok], ys[ok], buckets)
        parts.append((job_id, xs, ys))
    if not parts:
        return pd.DataFrame(columns=["job", "run", "x", "value"])
    sizes = [len(xs) for _, xs, _ in parts]  # one table built at once: a table per run costs more than the curves
    return pd.DataFrame({"job": np.repeat([j for j, _, _ in parts], sizes),
                         "run": np.repeat([f"#{j} {names.get(j, '')}" for j, _, _ in parts], sizes),
                         "x": np.concatenate([xs for _, xs, _ in parts]),
                         "value": np.concatenate([ys for _, _, ys in parts])})


def _evaluations_of(s, job_ids: list[int]) -> dict[int, dict[str, float]]:
    """eval/* results of the evaluations of each run's output (follow-ups and any later evaluation)."""
    outputs = dict(s.execute(select(Model.id, Model.job_id).where(Model.job_id.in_(job_ids))).all())
    if not outputs:
        return {}
    evals = s.execute(select(Job.id, Job.model_id, Job.plugin).where(Job.model_id.in_(list(outputs)),
                                                                     Job.status == "completed")).all()
    by_eval = {eval_id: (outputs[model_id], plugin) for eval_id, model_id, plugin in evals}
    out: dict[int, dict[str, float]] = defaultdict(dict)
    if by_eval:
        found = s.execute(select(Metric.job_id, Metric.key, Metric.value)
                          .where(Metric.job_id.in_(list(by_eval)), Metric.key.like("eval/%"))
                          .order_by(Metric.id)).all()
        for eval_id, key, value in found:
            train_id, plugin = by_eval[eval_id]
            out[train_id][f"{plugin}:{key.removeprefix('eval/')}"] = value
    return out


def _by_id(settings: Settings, job_ids: list[int], jobs: list[dict] | None) -> dict[int, dict]:
    """{id: job} of job_ids as runs.jobs_by_id gives them; `jobs` instead when the caller has read them already."""
    return {j["id"]: j for j in (runs.jobs_by_id(settings, job_ids) if jobs is None else jobs)}


def _summaries(settings: Settings, job_ids: list[int]) -> tuple[dict[int, list[tuple]], dict[int, dict[str, float]]]:
    """Each run's metrics as {job: [(key, min, max, count, last logged value)]}, and the scores of evaluations of
    each run's output. A finished run's figures are read once and kept in memory (until it starts again); the
    evaluations are read every time (a new one may finish at any moment)."""
    with read_session(settings) as s:
        stamps = _stamps(s, settings, job_ids)
        out, missing = _SUMMARIES.take(job_ids, stamps, "summary")
        if missing:
            # the extremes and the id of the last point of each run, one metric at a time from the (key, job, step,
            # value) index alone (grouping all points by run and metric at once sorts them all first); then those rows
            extremes = [(job_id, key, *rest) for key in runs.metric_names(s, missing)
                        for job_id, *rest in plain_rows(s, select(
                            Metric.job_id, func.min(Metric.value), func.max(Metric.value), func.count(),
                            func.max(Metric.id)).where(Metric.key == key, Metric.job_id.in_(missing))
                            .group_by(Metric.job_id))]
            finals = dict(s.connection().execute(select(Metric.id, Metric.value)
                                                 .where(Metric.id.in_([e[5] for e in extremes]))).all())
            read: dict[int, list[tuple]] = {job_id: [] for job_id in missing}
            for job_id, key, lo, hi, n, last in extremes:
                read[job_id].append((key, lo, hi, n, finals[last]))
            out.update(read)
            _SUMMARIES.keep(read, stamps, "summary")
        evaluations = _evaluations_of(s, job_ids)
    return out, evaluations


def leaderboard(settings: Settings, job_ids: list[int], metric_keys: list[str] | None = None,
                jobs: list[dict] | None = None) -> tuple[list[str], list[dict], dict[str, int]]:
    """Columns, one row per run (final value of each metric, best value of the ones that move, and the scores
    of evaluations of its output), and for each column the id of the run with the best value. metric_keys: only
    these metrics; jobs: the runs as runs.jobs_by_id gives them, when the caller has read them already."""
    if not job_ids:
        return [], [], {}
    summaries, evaluations = _summaries(settings, job_ids)
    wanted = None if metric_keys is None else set(metric_keys)
    figures = [(job_id, *figure) for job_id in job_ids for figure in summaries.get(job_id, ())
               if wanted is None or figure[0] in wanted]
    jobs = _by_id(settings, job_ids, jobs)
    rows = {j: {"run": label(jobs[j]), "status": jobs[j]["status"]} for j in job_ids}
    columns: dict[str, None] = {}
    for job_id, key, _, _, _, value in figures:
        if not HIDDEN.match(key):
            rows[job_id][key] = value
            columns[key] = None
    for job_id, key, lo, hi, n, _ in figures:
        way = direction(key)
        if HIDDEN.match(key) or COUNTERS.search(key) or n < 2 or lo == hi or way is None:
            continue
        best_key = f"best {key}"
        rows[job_id][best_key] = lo if way == "lower" else hi
        columns[best_key] = None
    for job_id, scores in evaluations.items():
        for key, value in scores.items():
            rows[job_id][key] = value
            columns[key] = None
    # scores first (evaluations, then the loss), then the rest that has a direction, then diagnostics
    ordered = sorted(columns, key=lambda c: (c != "loss" and not c.startswith(("eval", "final/")),
                                             direction(c) is None, c.startswith("best "), c))
    out = [dict(rows[j], id=j) for j in job_ids]
    # a tie for the best value: nobody is marked (nor named the best run); leaders() names the tied runs
    best = {c: ids[0] for c, ids in leaders(ordered, out).items() if len(ids) == 1}
    return ["run", "status", *ordered], out, best


def leaders(columns: list[str], rows: list[dict]) -> dict[str, list[int]]:
    """For each column that ranks runs (a better direction, not a counter, a number in two rows or more), the ids
    of the runs with its best value: one, or several when they tie. rows: as leaderboard gives them."""
    out: dict[str, list[int]] = {}
    for c in columns:
        have = [(row[c], row["id"]) for row in rows
                if isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)]
        way = direction(c)
        if way and len(have) >= 2 and not COUNTERS.search(c):
            top = min(v for v, _ in have) if way == "lower" else max(v for v, _ in have)
            out[c] = [j for v, j in have if v == top]
    return out


def shown_columns(columns: list[str], diagnostics: bool = False) -> list[str]:
    """The leaderboard's columns as shown: scores and losses (metrics with a better direction) and the peak memory
    by default, each figure's standard error (`<figure>_stderr`, as eval-harness records them) right after it;
    diagnostics (gradient norm, entropy, KL, log-probabilities, speed) only when asked."""
    errors = {c for c in columns if c.endswith("_stderr") and c.removesuffix("_stderr") in columns}
    shown = [c for c in columns if c not in errors and (
        diagnostics or c in ("run", "status") or direction(c) is not None
        or c.startswith("peak_") and c.endswith("memory_mb"))]
    return [col for c in shown for col in (c, f"{c}_stderr") if col == c or col in errors]


def config_diff(settings: Settings, job_ids: list[int], only_differences: bool = True,
                jobs: list[dict] | None = None) -> tuple[list[str], list[dict]]:
    """One row per setting (plugin, model, dataset and every parameter), one column per run; by default only the
    settings whose values differ. jobs: the runs as runs.jobs_by_id gives them, when the caller has them."""
    found = _by_id(settings, job_ids, jobs)
    jobs = [found[j] for j in job_ids if j in found]
    settings_of = [{"plugin": j["plugin"], "model": j["model"], "dataset": j["dataset"], **j["params"]} for j in jobs]
    names: dict[str, None] = {}
    for conf in settings_of:
        names.update(dict.fromkeys(conf))
    columns = ["setting", *(label(j) for j in jobs)]
    rows = []
    for name in names:
        values = [conf.get(name, "—") for conf in settings_of]
        if only_differences and len({repr(v) for v in values}) <= 1:
            continue
        rows.append({"setting": name, **{label(j): v for j, v in zip(jobs, values, strict=True)}})
    return columns, rows


def lineages(settings: Settings, job_ids: list[int], jobs: list[dict] | None = None) -> list[tuple[str, str]]:
    """(run, the chain of runs and models it came from) for each run; jobs as in config_diff."""
    jobs = _by_id(settings, job_ids, jobs)
    chains = runs.lineages(settings, list(jobs.values()))
    return [(label(jobs[i]), chains[i]) for i in job_ids if i in jobs]


def best_run(settings: Settings, job_ids: list[int], column: str) -> int | None:
    """The run with the best value in a leaderboard column (a sweep's winner)."""
    return leaderboard(settings, job_ids)[2].get(column)


def _examples_of(s, job_ids: list[int]) -> dict[int, dict[str, tuple[str, dict]]]:
    """{run: {evaluation plugin: (its eval/examples.jsonl, its parameters)}}: a selected evaluation's own file, and
    for a training run the files of the latest completed evaluations of its output."""
    outputs = dict(s.execute(select(Model.id, Model.job_id).where(Model.job_id.in_(job_ids))).all())
    found = s.execute(select(Job.id, Job.model_id, Job.plugin, Job.run_dir, Job.params).where(
        Job.status == "completed", (Job.id.in_(job_ids)) | (Job.model_id.in_(list(outputs) or [-1])))
        .order_by(Job.id)).all()
    out: dict[int, dict[str, tuple[str, dict]]] = defaultdict(dict)
    for job_id, model_id, plugin, run_dir, params in found:
        path = Path(run_dir or ".") / "eval" / "examples.jsonl"
        if path.is_file():  # an evaluation counts for itself and for the run whose output it scored
            for owner in {job_id, outputs.get(model_id)} & set(job_ids):
                out[owner][plugin] = (str(path), params or {})  # the latest evaluation with a plugin wins
    return out


def _scored(path: str) -> list[dict]:
    """An evaluation's per-example rows; a judge's outcome also as a number (`win`: 1, a tie 0.5, a loss 0)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        if row.get("outcome") in OUTCOMES:
            row["win"] = OUTCOMES[row["outcome"]]
    return rows


OUTCOMES = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def differences(settings: Settings, job_ids: list[int], jobs: list[dict] | None = None) -> list[dict]:
    """Whether a difference is real. For every per-example score that the first run and another were both
    evaluated on with the same plugin: b - a with its paired bootstrap interval. For a run judged against another
    model (eval-judge): an exact sign test of its wins against its losses. Rows: run, against, score, difference
    (text), examples, significant."""
    with read_session(settings) as s:
        files = _examples_of(s, job_ids)
    jobs = _by_id(settings, job_ids, jobs)
    rows = []
    for run in job_ids:
        path, params = files.get(run, {}).get("eval-judge", (None, {}))
        if path:
            outcomes = [r["outcome"] for r in _scored(path) if r.get("outcome") in OUTCOMES]
            wins, losses = outcomes.count("win"), outcomes.count("loss")
            p = significance.sign_test(wins, losses)
            rows.append({"run": label(jobs[run]), "against": str(params.get("against") or "its opponent"),
                         "score": "eval-judge:wins against losses",
                         "difference": f"{wins} wins, {losses} losses, {len(outcomes) - wins - losses} ties: "
                                       f"p = {p:.3g}, {'significant' if p < 0.05 else 'not significant'}",
                         "examples": len(outcomes), "significant": p < 0.05})
    first = job_ids[0] if job_ids else None
    for other in job_ids[1:]:
        for plugin in sorted(set(files.get(first, {})) & set(files.get(other, {}))):
            a, b = _scored(files[first][plugin][0]), _scored(files[other][plugin][0])
            keys = sorted({k for row in a + b for k, v in row.items() if significance.is_number(v)}
                          - {"row", "doc_id", "chosen"})
            for key in keys:
                x, y = significance.paired_examples(a, b, key)
                if len(x) < 2:
                    continue
                d = significance.paired_bootstrap(x, y)
                rows.append({"run": label(jobs[other]), "against": label(jobs[first]), "score": f"{plugin}:{key}",
                             "difference": d.text(), "examples": d.n, "significant": d.significant})
    return rows
