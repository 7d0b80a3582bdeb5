"""Named API endpoints, so `gradio_client` can drive the lab exactly as the pages do.

    from gradio_client import Client, handle_file
    lab = Client("http://127.0.0.1:7860/")
    lab.predict("notes", handle_file("notes.jsonl"), "auto", api_name="/upload_dataset")
    job = lab.predict('{"plugin": "sft", "model": "smollm2-135m-instruct", "dataset": "notes", '
                      '"params": {"max_steps": 20}}', api_name="/submit_job")
    lab.predict(job["id"], api_name="/get_job")["status"]
    item = lab.predict("candidates-12", "ann", api_name="/rank_next")   # the next answers to rank, shuffled
    lab.predict("candidates-12", item["item"], "ann", "order", "2,1,3", "prefs", "all", api_name="/rank_submit")
"""

from __future__ import annotations

import json

import gradio as gr
from gradio import FileData

from lab import datasets, jobstore, registry, runs
from lab.errors import LabError
from lab.jobspec import JobSpec
from lab.ui.common import UI, user_errors
from lab.ui.tabs import datasets as datasets_tab

NAMES = ("submit_job", "submit_sweep", "list_jobs", "get_job", "cancel_job", "job_metrics", "list_models",
         "list_datasets", "upload_dataset", "rank_next", "rank_submit", "rank_status")


def _public(info: dict) -> dict:
    """A model or dataset as the API gives it: its folder under `folder`, since gradio_client would take a dict
    with a `path` for a file to download."""
    return {("folder" if k == "path" else k): v for k, v in info.items()}


def _json_object(text, what: str) -> dict:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise LabError(f"{what} must be a JSON object: {exc.msg}") from None
    if not isinstance(value, dict):
        raise LabError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _spec(text) -> JobSpec:
    return JobSpec.of(_json_object(text, "spec"), "spec")


def api_errors(fn):
    return user_errors(fn, html=False)


def register(ui: UI) -> None:
    s = ui.settings

    @api_errors
    def submit_job(spec: str) -> dict:
        """Queue a job. `spec` is a JSON object with the fields of a run config (lab.jobspec.JobSpec: plugin,
        model, dataset, experiment, params, priority, max_attempts, time_limit_min, processes, devices, report_to,
        nodes, memory_gb, then_eval, group, tags); returns the new job."""
        job_id = runs.submit(s, _spec(spec))
        return runs.get_job(s, job_id)

    @api_errors
    def submit_sweep(spec: str, grid: str) -> dict:
        """Queue a sweep: `spec` as for submit_job, `grid` a JSON object of parameter -> list of values; every
        combination is queued as one group. Returns {group, ids}."""
        axes = _json_object(grid, "grid")
        if any(not isinstance(v, list) or not v for v in axes.values()):
            raise LabError("grid must map each parameter to a non-empty list of values")
        group, ids = runs.sweep(s, _spec(spec), axes)
        return {"group": group, "ids": ids}

    @api_errors
    def list_jobs(experiment: str, status: str) -> list:
        """Jobs, newest first; empty strings mean no filter."""
        return runs.list_jobs(s, experiment=experiment or None, status=status or None)

    @api_errors
    def get_job(job_id: int) -> dict:
        """One job with its parameters, folder, error and log tail."""
        return runs.get_job(s, int(job_id))

    @api_errors
    def cancel_job(job_id: int) -> str:
        """Cancel a queued job or stop a running one; returns 'cancelled' or 'cancelling'."""
        return jobstore.cancel(s, int(job_id))

    @api_errors
    def job_metrics(job_id: int, keys: str) -> dict:
        """{metric: [[step, value, unix time], ...]} for one job; `keys` is comma-separated, empty for all."""
        runs.get_job(s, int(job_id))
        wanted = [k.strip() for k in (keys or "").split(",") if k.strip()] or None
        return runs.metrics(s, [int(job_id)], wanted).get(int(job_id), {})

    @api_errors
    def list_models() -> list:
        """Registered models, run outputs included."""
        return [_public(m) for m in registry.list_all(s)]

    @api_errors
    def list_datasets() -> list:
        """Datasets with format, rows and columns."""
        return [_public(d) for d in datasets.list_all(s)]

    @api_errors
    def upload_dataset(name: str, file: FileData, format: str, columns: str = "",  # noqa: A002 (the API's word)
                       encoding: str = "", split: str = "", test_split: str = "") -> dict:
        """Validate an uploaded file or zipped dataset folder and register it; `format` is 'auto' or a format name;
        `columns` maps columns to fields (`text=v2,label=v1`); `encoding` names a file's encoding when it is not
        UTF-8 or UTF-16; `split` and `test_split` pick a zipped folder's splits. The result's `notes` say what was
        done beyond a plain import."""
        return _public(datasets_tab.import_file(ui, file, name, format, columns, encoding, split, test_split))

    @api_errors
    def rank_next(candidates: str, annotator: str) -> dict | None:
        """The next item of a candidates dataset this annotator has not judged: {item, prompt, answers: [{number,
        text}] in the order shown (models hidden), done, total}; None when every item is done."""
        from lab import ranking

        return ranking.next_item(s, candidates, annotator)

    @api_errors
    def rank_submit(candidates: str, item: str, annotator: str, verdict: str, order: str, into: str,
                    pairs: str = "all", best: int | None = None, worst: int | None = None) -> dict:
        """Record a verdict on one item: verdict 'order' (order: answer numbers as shown, best first, e.g. '2,1,3'),
        'best_worst' (best and worst numbers), 'tie' or 'skip'; its preference pairs go into dataset `into`
        (created when new), all ordered pairs or 'best-vs-rest'. Returns the pairs added and who wrote each
        answer."""
        from lab import ranking

        return ranking.submit(s, candidates, str(item), annotator, verdict=verdict or "order", order=order or None,
                              best=None if best in (None, "") else int(best),
                              worst=None if worst in (None, "") else int(worst), into=into or None,
                              pairs=pairs or "all")

    @api_errors
    def rank_status(candidates: str) -> dict:
        """Progress per annotator and agreement per pair of annotators (pairwise rate and Cohen's kappa)."""
        from lab import ranking

        return {**ranking.progress(s, candidates), "agreement": ranking.agreement(s, candidates)}

    for fn in (submit_job, submit_sweep, list_jobs, get_job, cancel_job, job_metrics, list_models, list_datasets,
               upload_dataset, rank_next, rank_submit, rank_status):
        assert fn.__name__ in NAMES
        gr.api(fn, api_name=fn.__name__)
