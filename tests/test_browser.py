"""The web lab in a real browser (Debian's Chromium driven by Playwright): upload, launch, watch, reload.

Screenshots of every page land in test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, write_jsonl

from lab import registry, runs

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
SHOTS = ROOT / "test-artifacts"


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), "make test installs chromium"
    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(30_000)
        yield pg
        browser.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    page.wait_for_timeout(800)


def _choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _wait_for_text(page, selector: str, pattern: str, timeout_s: float = 120) -> str:
    for _ in range(int(timeout_s * 2)):
        text = page.locator(selector).inner_text()
        if re.search(pattern, text):
            return text
        page.wait_for_timeout(500)
    raise AssertionError(f"{selector} never matched {pattern!r}; last: {text!r}")


def _chart_points(page) -> int:
    """Distinct data points Vega drew in the loss chart (each point, and the line itself, carries a label)."""
    labels = page.locator('#loss-chart [aria-label^="step:"]').evaluate_all("els => els.map(e => e.ariaLabel)")
    return len(set(labels))


def test_upload_launch_watch_reload(ws, lab_server, tiny_model_dir, tmp_path, page):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)
    for name in ("Experiments", "Models", "Jobs"):
        _tab(page, name)
        _shot(page, name.lower())

    # a wrong file: the report names the row, and nothing is stored
    _tab(page, "Datasets")
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    page.locator("#dataset-upload input[type=file]").set_input_files(str(bad))
    page.wait_for_timeout(1000)
    page.get_by_role("button", name="Import", exact=True).click()
    report = _wait_for_text(page, "#dataset-report", "Nothing was stored", 30)
    assert "line 2: `output` is missing" in report
    _shot(page, "datasets-bad-file")

    good = write_jsonl(tmp_path / "facts.jsonl",
                       [{"instruction": "What is the capital of France?", "input": "", "output": "Paris."}] * 8)
    page.locator("#dataset-upload input[type=file]").set_input_files(str(good))
    page.wait_for_timeout(1000)
    page.get_by_role("button", name="Import", exact=True).click()
    assert "8 rows, format alpaca" in _wait_for_text(page, "#dataset-report", "Imported", 30)

    # the row as the model sees it: template applied, learned tokens marked apart from the masked prompt
    _choose(page, "ds-model", "tiny")
    page.get_by_role("button", name="Show", exact=True).click()
    _wait_for_text(page, "#token-sample", "learned", 60)
    assert page.locator("#token-sample .tok-train").count() > 0
    assert page.locator("#token-sample .tok-mask").count() > page.locator("#token-sample .tok-train").count()
    _shot(page, "datasets")

    # a bad value is refused next to the form, nothing queued
    _tab(page, "Train")
    _choose(page, "train-model", "tiny")
    _choose(page, "train-dataset", "facts")
    page.get_by_label("max_length").fill("2")
    page.locator("#launch").click()
    assert "`max_length`" in _wait_for_text(page, "#train-message", "Nothing was queued", 30)
    assert runs.list_jobs(ws) == []

    page.get_by_label("max_length").fill("256")
    page.get_by_label("max_steps").fill("60")
    page.get_by_label("learning_rate").fill("0.003")
    _wait_for_text(page, "#train-command", "max_steps=60", 30)
    _wait_for_text(page, "#train-estimate", "tokens per step", 60)
    _shot(page, "train")
    page.locator("#launch").click()

    # the run view opens on the new job and follows it live; a reload mid-run loses nothing
    _wait_for_text(page, "#run-head", "running", 60)
    job_id = runs.list_jobs(ws)[0]["id"]
    page.reload()
    page.wait_for_timeout(1500)
    _tab(page, "Jobs")
    assert re.search(rf"\b{job_id}\b.*sft.*tiny.*facts.*(running|completed)",
                     page.locator("#jobs-table").inner_text().replace("\n", " ").replace("\t", " "))
    page.goto(f"{lab_server.url}?job={job_id}")
    _wait_for_text(page, "#run-head", "completed", 120)
    page.wait_for_timeout(2500)
    assert _chart_points(page) == 60, "one loss point per step"
    _shot(page, "run")
    _tab(page, "Jobs")
    _wait_for_text(page, "#jobs-table", "completed", 10)
    _shot(page, "jobs-after")


def test_compare_page_overlays_two_runs_and_shows_their_difference(ws, lab_server, page):
    group, ids = runs.sweep(ws, "instant", model=None, dataset=None, experiment="default", base={},
                            axes=["steps=3,5"])
    from jobs.worker import Worker

    Worker(ws, say=lambda m: None).serve(until_empty=True)
    page.goto(f"{lab_server.start().url}?group={group}")
    _wait_for_text(page, "#compare-diff", "steps", 60)
    page.wait_for_timeout(2000)
    labels = [label for label in page.locator("#compare-chart [aria-label]").evaluate_all(
        "els => els.map(e => e.ariaLabel)") if "; run: " in label]  # a point: "step: 1; loss: 1; run: #1 instant"
    drawn = {label.split("run: ")[-1] for label in labels}
    assert drawn == {f"#{ids[0]} instant", f"#{ids[1]} instant"}, labels[:4]
    assert len(set(labels)) == 3 + 5, "every point of both curves"
    diff = page.locator("#compare-diff").inner_text()
    assert "steps" in diff and "record" not in diff, "only the setting that differs"
    board = page.locator("#compare-board").inner_text()
    assert f"#{ids[0]} instant" in board and "loss" in board
    _shot(page, "compare")


XSS = "<img src=x onerror=alert(11)>"


def test_text_from_users_and_files_never_runs_as_script(ws, lab_server, tiny_model_dir, tmp_path, page):
    """The payload sits in every place the page shows user or file text: it must show literally, and no dialog
    may fire anywhere."""
    from jobs import queue
    from lab import datasets, experiments

    registry.add_folder(ws, "tiny", tiny_model_dir)
    experiments.create(ws, "xss", notes=XSS)
    datasets.add(ws, "cells", write_jsonl(tmp_path / "cells.jsonl", [{"text": XSS, "note": XSS}] * 3))
    job_id = runs.submit(ws, "instant", experiment="xss")
    claimed = queue.claim_next(ws, "test-worker")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.txt").write_text(f"step 1\n{XSS}\n")
    queue.started(ws, job_id, "test-worker", 1, str(run_dir))
    from lab.diagnosis import Failure

    queue.finish(ws, claimed.id, "test-worker", "failed", exit_code=1, log_tail=XSS,
                 failure=Failure("plugin_error", f"ValueError: {XSS}", f"next {XSS}"))
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)

    _tab(page, "Experiments")
    assert XSS in page.locator("body").inner_text()
    _tab(page, "Datasets")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": XSS, "content": "hi"}]}) + "\n")
    page.locator("#dataset-upload input[type=file]").set_input_files(str(bad))
    page.wait_for_timeout(1000)
    page.get_by_role("button", name="Import", exact=True).click()
    assert XSS in _wait_for_text(page, "#dataset-report", "Nothing was stored", 30)
    _choose(page, "dataset-browse", "cells")
    page.wait_for_timeout(1500)
    assert page.locator("body").inner_text().count(XSS) >= 3, "the cells show the text as it is"

    _tab(page, "Train")
    _choose(page, "train-model", "tiny")
    page.get_by_text("Advanced parameters", exact=True).locator("visible=true").first.click()
    page.get_by_label("extra_args").locator("visible=true").first.fill(json.dumps({XSS: 1}))
    page.locator("#launch").click()
    assert XSS in _wait_for_text(page, "#train-message", "Nothing was queued", 60)

    page.goto(f"{lab_server.url}?job={job_id}")
    assert XSS in _wait_for_text(page, "#run-failure", "This run failed", 30)
    _wait_for_text(page, "#run-log", "step 1", 30)

    _tab(page, "Models")
    page.get_by_text("Export a model").click()
    _choose(page, "export-model", "tiny")
    page.get_by_label("Export name (optional)").fill(XSS)
    page.get_by_role("button", name="Export", exact=True).click()
    toast = _wait_for_text(page, '[data-testid="toast-body"]', "invalid export name", 30)
    assert XSS in toast, "an error toast shows the name as it was typed"
    for name in ("Jobs", "Compare", "Playground"):
        _tab(page, name)
    _shot(page, "xss-literal")
    assert dialogs == []
    assert page.locator("img[src=x]").count() == 0
