"""Named API endpoints, so `gradio_client` can drive the lab exactly as the pages do.

    from gradio_client import Client, handle_file
    lab = Client("http://127.0.0.1:7860/")
    lab.predict("notes", handle_file("notes.jsonl"), "auto", api_name="/upload_dataset")
    job = lab.predict("sft", "smollm2-135m-instruct", "notes", "default", '{"max_steps": 20}', 0,
                      api_name="/submit_job")
    lab.predict(job["id"], api_name="/get_job")["status"]
    item = lab.predict("candidates-12", "ann", api_name="/rank_next")   # the next answers to rank, shuffled
    lab.predict("candidates-12", item["item"], "ann", "order", "2,1,3", "prefs", "all", api_name="/rank_submit")
"""

from __future__ import annotations

import json

import gradio as gr
from gradio import FileData

from jobs import queue
from lab import datasets, registry, runs
from lab.errors import LabError
from lab.ui.common import UI, user_errors
from lab.ui.tabs import datasets as datasets_tab

NAMES = ("submit_job", "list_jobs", "get_job", "cancel_job", "job_metrics", "list_models", "list_datasets",
         "upload_dataset", "rank_next", "rank_submit", "rank_status")


def _public(info: dict) -> dict:
    """A model or dataset as the API gives it: its folder under `folder`, since gradio_client would take a dict
    with a `path` for a file to download."""
    return {("folder" if k == "path" else k): v for k, v in info.items()}


def api_errors(fn):
    return user_errors(fn, html=False)


def register(ui: UI) -> None:
    s = ui.settings

    @api_errors
    def submit_job(plugin: str, model: str, dataset: str, experiment: str, params: str, priority: int,
                   processes: int = 1, devices: int | None = None, max_attempts: int = 1,
                   time_limit_min: float | None = None, report_to: str = "") -> dict:
        """Queue a job. `params` is a JSON object of parameter values; processes > 1 runs it data-parallel;
        devices: accelerators it needs (None: one per process on a worker with GPUs); time_limit_min: minutes
        one attempt may run (None: no limit); report_to: trackers, e.g. 'tensorboard,mlflow' or 'none' (empty:
        LAB_REPORT_TO); returns the new job."""
        try:
            values = json.loads(params or "{}")
        except json.JSONDecodeError as exc:
            raise LabError(f"params must be a JSON object: {exc.msg}") from None
        if not isinstance(values, dict):
            raise LabError("params must be a JSON object")
        job_id = runs.submit(s, plugin, model=model or None, dataset=dataset or None,
                             experiment=experiment or "default", params=values, priority=int(priority or 0),
                             processes=int(processes or 1), devices=None if devices in (None, "") else int(devices),
                             max_attempts=int(max_attempts or 1),
                             time_limit_min=None if time_limit_min in (None, "") else float(time_limit_min),
                             report_to=report_to or None)
        return runs.get_job(s, job_id)

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
        return queue.cancel(s, int(job_id))

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

    for fn in (submit_job, list_jobs, get_job, cancel_job, job_metrics, list_models, list_datasets,
               upload_dataset, rank_next, rank_submit, rank_status):
        assert fn.__name__ in NAMES
        gr.api(fn, api_name=fn.__name__)
