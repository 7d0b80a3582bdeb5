"""The web lab in a real browser (Debian's Chromium driven by Playwright): upload, launch, watch, reload.

Screenshots of every page land in test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, wait_until, write_jsonl

from lab import datasets, registry, runs

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


def _text(page, selector: str) -> str:
    """What an element shows; for a text box, what is in it."""
    boxes = page.locator(f"{selector} textarea")
    return boxes.first.input_value() if boxes.count() else page.locator(selector).inner_text()


def _wait_for_text(page, selector: str, pattern: str, timeout_s: float = 120) -> str:
    for _ in range(int(timeout_s * 2)):
        text = _text(page, selector)
        if re.search(pattern, text):
            return text
        page.wait_for_timeout(500)
    raise AssertionError(f"{selector} never matched {pattern!r}; last: {text!r}")


def _plotted(page, elem_id: str) -> dict:
    """What a chart on the page draws, read from the chart itself: its lines {name: (xs, ys)}, the x axis title
    and whether its y axis is logarithmic, and the legend entries shown."""
    return page.locator(f"#{elem_id} .js-plotly-plot").first.evaluate("""el => ({
        lines: Object.fromEntries(el.data.map(t => [t.name, [Array.from(t.x), Array.from(t.y), t.mode]])),
        x_title: el.layout.xaxis.title.text, y_type: el.layout.yaxis.type,
        legend: Array.from(el.querySelectorAll('.legendtext')).map(e => e.textContent)})""")


def _wait_for_plot(page, elem_id: str, check, timeout_s: float = 30) -> dict:
    """Poll the chart until check(drawn) holds (a chart is redrawn after the event that changes it)."""
    drawn = None
    for _ in range(int(timeout_s * 2)):
        try:
            drawn = _plotted(page, elem_id)
            if check(drawn):
                return drawn
        except Exception:  # not drawn yet
            pass
        page.wait_for_timeout(500)
    raise AssertionError(f"#{elem_id} never showed what was expected; last: {drawn}")


def _no_error_toast(page) -> None:
    toasts = page.locator('[data-testid="toast-body"]')
    assert toasts.count() == 0, f"an error toast: {toasts.all_inner_texts()}"


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

    # the run view opens on the new job and follows it live (no error toast for metrics not logged yet); a reload
    # mid-run loses nothing
    _wait_for_text(page, "#run-head", "running|queued", 60)
    page.wait_for_timeout(1000)
    _no_error_toast(page)
    _wait_for_text(page, "#run-head", "running", 60)
    job_id = runs.list_jobs(ws)[0]["id"]
    page.reload()
    page.wait_for_timeout(1500)
    _tab(page, "Jobs")
    # the table may be in the middle of a refresh (the page shows "processing"): wait for its rows
    _wait_for_text(page, "#jobs-table", rf"(?s)\b{job_id}\b.*sft.*tiny.*facts.*(running|completed)", 30)
    page.goto(f"{lab_server.url}?job={job_id}")
    _wait_for_text(page, "#run-head", "completed", 120)
    page.wait_for_timeout(2500)
    drawn = _wait_for_plot(page, "loss-chart", lambda d: len(d["lines"].get("loss", [[]])[0]) == 60)
    assert drawn["lines"]["loss"][0] == list(range(1, 61)), "one loss point per step, by step"
    assert drawn["legend"] == ["loss"] and drawn["x_title"] == "step"
    rates = _wait_for_plot(page, "lr-chart", lambda d: "learning_rate" in d["lines"])["lines"]["learning_rate"]
    assert len(rates[0]) == 60 and rates[1][0] > rates[1][-1], "the linear schedule decays"
    _no_error_toast(page)
    at_tail = page.locator("#run-log textarea").evaluate("t => t.scrollTop + t.clientHeight >= t.scrollHeight - 4")
    assert at_tail and "[lab] job" in _text(page, "#run-log"), "the log opens at its newest lines"
    _shot(page, "run")
    _tab(page, "Jobs")
    _wait_for_text(page, "#jobs-table", "completed", 10)
    _shot(page, "jobs-after")


def test_compare_page_overlays_two_runs_and_shows_their_difference(ws, lab_server, page):
    group, ids = runs.sweep(ws, {"plugin": "instant", "params": {"tokens": "100", "scores": "true"}},
                            {"steps": [3, 5]})
    from jobs.worker import Worker

    Worker(ws, say=lambda m: None).serve(until_empty=True)
    page.goto(f"{lab_server.start().url}?group={group}")
    _wait_for_text(page, "#compare-diff", "steps", 60)
    names = [f"#{ids[0]} instant", f"#{ids[1]} instant"]
    drawn = _wait_for_plot(page, "compare-chart", lambda d: set(d["lines"]) == set(names))
    assert drawn["lines"][names[0]][0] == [1, 2, 3] and drawn["lines"][names[1]][0] == [1, 2, 3, 4, 5]
    assert drawn["lines"][names[1]][1] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5]), "loss = 1/step"
    assert sorted(drawn["legend"]) == sorted(names), "a legend entry per run"
    assert drawn["lines"][names[0]][2] == "lines+markers", "few points: each one marked"
    _no_error_toast(page)
    # once drawn, the page stays still (the runs' multiselect once re-ran the leaderboard on every status update)
    page.wait_for_timeout(2000)
    page.evaluate("() => { window.boardChanges = 0; new MutationObserver(() => window.boardChanges++).observe("
                  "document.querySelector('#compare-board'), {subtree: true, childList: true, characterData: true});"
                  " }")
    page.wait_for_timeout(6000)
    assert page.evaluate("window.boardChanges") == 0, "the leaderboard is drawn again and again"

    # each x axis draws the data it names (a chart once kept the previous choice's data under the new title)
    for axis, want in (("tokens", [100, 200, 300]), ("time", None), ("step", [1, 2, 3])):
        page.get_by_label(axis, exact=True).check()
        drawn = _wait_for_plot(page, "compare-chart", lambda d, axis=axis: d["x_title"].startswith(
            {"tokens": "tokens", "time": "time", "step": "step"}[axis]))
        xs = drawn["lines"][names[0]][0]
        if want is not None:
            assert xs == want, (axis, xs)
        else:  # seconds since the run's first point: from 0, rising, and not the steps
            assert xs[0] == 0 and xs == sorted(xs) and len(xs) == 3, xs
    page.get_by_label("log scale").check()
    assert _wait_for_plot(page, "compare-chart", lambda d: d["y_type"] == "log")["lines"][names[0]][1][0] == 1.0
    diff = page.locator("#compare-diff").inner_text()
    assert "steps" in diff and "record" not in diff, "only the setting that differs"
    board = page.locator("#compare-board").inner_text()
    assert f"#{ids[0]} instant" in board and "loss" in board
    # right on 160 of 200 examples instead of 133: +0.135, its 95 % interval clear of zero
    real = _wait_for_text(page, "#compare-significance", "instant:correct", 30)
    assert re.search(rf"#{ids[1]} instant\s+#{ids[0]} instant\s+instant:correct\s+\+0\.135 ± 0\.0\d+, significant"
                     r"\s+200", real), real
    _shot(page, "compare")



def test_an_evaluation_shows_its_scores_and_confusion_matrix_and_every_file_it_wrote(ws, lab_server, page):
    job_id = runs.submit(ws, "instant", params={"steps": "1", "scores": "true"})
    from jobs.worker import Worker

    Worker(ws, say=lambda m: None).serve(once=True)
    page.goto(f"{lab_server.start().url}?job={job_id}")
    _wait_for_text(page, "#run-head", "completed", 60)
    scores = _wait_for_text(page, "#run-scores", "eval/accuracy", 30)
    assert "0.75" in scores and "eval/macro_f1" in scores
    drawn = _wait_for_plot(page, "loss-chart", lambda d: "loss" in d["lines"])
    assert drawn["lines"]["loss"][0] == [1] and drawn["lines"]["loss"][2] == "lines+markers", "a single point shows"
    matrix = page.locator("#run-confusion .js-plotly-plot").first.evaluate("el => el.data[0].z")
    assert matrix == [[5, 1], [2, 4]]
    files = page.locator("#run-files").inner_text().replace("\n", "")  # the page breaks names at the dot
    assert "confusion_matrix.json" in files and "job.json" in files and "result.txt" in files
    _no_error_toast(page)
    _shot(page, "run-evaluation")


def test_the_playground_opens_a_dpo_job_on_its_rankings_with_every_field_filled(ws, lab_server, tiny_model_dir,
                                                                               tmp_path, page):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    registry.add_folder(ws, "tiny2", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", [{"prompt": "a", "completion": "b"}] * 2))
    datasets.add(ws, "playground-rankings", write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go."}] * 4))
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)
    _tab(page, "Train")  # another method and dataset chosen first: the button must replace both
    _choose(page, "train-dataset", "facts")
    _tab(page, "Playground")
    page.get_by_role("tab", name="Side by side and ranking").click()
    _choose(page, "sbs-models", "tiny2")
    page.get_by_role("button", name="Tune with DPO on it").click()
    page.wait_for_timeout(2500)
    assert page.locator("#train-dataset input").input_value() == "playground-rankings"
    assert page.locator("#train-model input").input_value() == "tiny2"
    _no_error_toast(page)
    page.locator("#launch").click()
    _wait_for_text(page, "#run-head", "dpo", 60)
    assert [(j["plugin"], j["dataset"], j["model"]) for j in runs.list_jobs(ws)] == [
        ("dpo", "playground-rankings", "tiny2")]
    _no_error_toast(page)

def test_rank_three_prompts_with_the_keyboard_only_then_open_a_reward_job_on_the_pairs(ws, lab_server,
                                                                                     tiny_model_dir, tmp_path, page):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    rows = [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"Question {i}: {XSS}"}],
             "candidates": [{"text": f"answer {c} to {i} {XSS if c == 'b' else ''}", "model": "tiny"}
                            for c in "abc"]} for i in range(5)]
    datasets.add(ws, "cands", write_jsonl(tmp_path / "cands.jsonl", rows))
    page.on("dialog", lambda d: (_ for _ in ()).throw(AssertionError("a script ran: " + d.message)))
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)
    _tab(page, "Rank")
    _choose(page, "rank-source", "cands")
    page.locator("#rank-annotator textarea").fill("ann")
    page.locator("#rank-into input").fill("ranked")
    page.locator("#rank-start").click()
    _wait_for_text(page, "#rank-progress", "0 of 5 judged by ann")
    assert page.locator("#rank-cards .rank-card").count() == 3 and XSS in page.locator("#rank-prompt").inner_text()
    page.focus("#rank-entry textarea")  # from here on, only keys
    for n, typed in enumerate(["2 1 3", "312", "b1 w3"], start=1):
        page.keyboard.type(typed)
        page.keyboard.press("Enter")
        _wait_for_text(page, "#rank-progress", f"{n} of 5 judged by ann.*{3 * n} pairs in ranked")
        assert page.evaluate("document.activeElement.closest('#rank-entry') !== null"), "the focus stays put"
    assert "answer 1: tiny" in page.locator("#rank-result").inner_text(), "models are shown after the vote"
    _shot(page, "rank")
    _no_error_toast(page)
    pairs = datasets.preview(ws, "ranked", 20)
    assert len(pairs) == 9 and {p["annotator"] for p in pairs} == {"ann"}
    assert {p["item"] for p in pairs} == {"q0", "q1", "q2"}
    page.locator("#rank-to-reward").click()
    page.wait_for_timeout(2500)
    assert page.locator("#train-dataset input").input_value() == "ranked"
    assert page.locator("#train-model input").input_value() == "tiny"
    _no_error_toast(page)
    page.locator("#launch").click()
    _wait_for_text(page, "#run-head", "reward", 60)
    assert [(j["plugin"], j["dataset"], j["model"]) for j in runs.list_jobs(ws)] == [("reward", "ranked", "tiny")]


XSS = "<img src=x onerror=alert(11)>"


def test_text_from_users_and_files_never_runs_as_script(ws, lab_server, tiny_model_dir, tmp_path, page):
    """The payload sits in every place the page shows user or file text: it must show literally, and no dialog
    may fire anywhere."""
    from lab import experiments, jobstore

    registry.add_folder(ws, "tiny", tiny_model_dir)
    experiments.create(ws, "xss", notes=XSS)
    datasets.add(ws, "cells", write_jsonl(tmp_path / "cells.jsonl", [{"text": XSS, "note": XSS}] * 3))
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", [{"prompt": "a", "completion": "b"}] * 2))
    job_id = runs.submit(ws, "instant", experiment="xss")
    claimed = jobstore.claim_next(ws, "test-worker")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.txt").write_text(f"step 1\n{XSS}\n")
    jobstore.started(ws, job_id, "test-worker", 1, str(run_dir))
    from lab.diagnosis import Failure

    jobstore.finish(ws, claimed.id, "test-worker", "failed", exit_code=1, log_tail=XSS,
                 failure=Failure("plugin_error", f"ValueError: {XSS}", f"next {XSS}"))
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)

    _tab(page, "Experiments")
    # the tables fill when the page's first load has answered (over 2 s on a busy machine)
    wait_until(lambda: XSS in page.locator("body").inner_text(), 30, "the experiment named by the payload, as text")
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
    _choose(page, "train-dataset", "facts")
    _wait_for_text(page, "#train-estimate", "tokens per step", 120)  # the first estimate loads TRL: let it finish
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
    shown = _wait_for_text(page, "#models-message", "invalid export name", 30)
    assert XSS in shown and "nothing was exported" in shown, "the refusal shows the name as it was typed"
    for name in ("Jobs", "Compare", "Playground"):
        _tab(page, name)
    _shot(page, "xss-literal")
    assert dialogs == []
    assert page.locator("img[src=x]").count() == 0


def test_a_csv_with_other_columns_and_encoding_is_mapped_on_the_page(ws, lab_server, tmp_path, page):
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)
    _tab(page, "Datasets")
    # the SMS spam file as distributed: Latin-1 bytes, header v1,v2,,,
    spam = tmp_path / "spam.csv"
    spam.write_bytes(("v1,v2,,,\nham,Ok lar... Joking wif u oni,,,\nspam,Free entry: win \xa3100 now,,,\n"
                      "ham,See you at the caf\xe9,,,\n").encode("latin-1"))
    page.locator("#dataset-upload input[type=file]").set_input_files(str(spam))
    said = _wait_for_text(page, "#dataset-columns", "cannot be read", 30)
    assert "byte 0xa3 on line 3 is not UTF-8" in said and "--encoding latin-1" in said
    page.locator("#dataset-encoding textarea, #dataset-encoding input").first.fill("latin-1")
    page.locator("#dataset-encoding textarea, #dataset-encoding input").first.press("Enter")
    said = _wait_for_text(page, "#dataset-columns", "look like", 30)
    assert "Columns: v1, v2." in said and "classification" in said
    assert page.locator("#map-text input").input_value() == "v2"
    assert page.locator("#map-label input").input_value() == "v1"
    page.locator("#dataset-check").click()
    report = _wait_for_text(page, "#dataset-report", "Would import", 30)
    assert "3 rows as classification" in report and "without a name and without data dropped" in report
    assert "Free entry: win £100 now" in page.locator("#dataset-first").inner_text()
    assert datasets.list_all(ws) == []  # a preview stores nothing
    _shot(page, "datasets-mapping")
    page.get_by_role("button", name="Import", exact=True).click()
    report = _wait_for_text(page, "#dataset-report", "Imported", 30)
    assert "3 rows, format classification, columns text, label" in report
    assert datasets.preview(ws, "spam", 1)[0] == {"text": "Ok lar... Joking wif u oni", "label": "ham"}
    _no_error_toast(page)


def test_models_on_this_machine_are_found_and_registered_from_the_page(ws, lab_server, tmp_path, monkeypatch,
                                                                      tiny_model_dir, page):
    from test_local_models import COMMIT, fake_cache

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the server inherits it
    monkeypatch.setenv("LMSTUDIO_MODELS", str(tmp_path / "none"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "none"))
    fake_cache(tmp_path / "hf" / "hub", "acme/tiny-chat", tiny_model_dir)
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)
    _tab(page, "Models")
    page.get_by_text("Models on this machine").click()
    page.locator("#models-scan").click()
    _wait_for_text(page, "#models-found", "acme/tiny-chat", 30)
    _choose(page, "models-found-pick", "hf-cache: acme/tiny-chat")
    page.locator("#models-found-name textarea, #models-found-name input").first.fill("smol")
    page.locator("#models-found-add").click()
    for _ in range(60):
        if "smol" in {m["name"] for m in registry.list_all(ws)}:
            break
        page.wait_for_timeout(500)
    _shot(page, "models-found")
    info = registry.info(ws, "smol")
    assert (info["hub_id"], info["revision"]) == ("acme/tiny-chat", COMMIT)
    _shot(page, "models-found")
    _no_error_toast(page)


def test_the_run_page_shows_the_phase_a_ticking_time_and_the_second_attempt(ws, lab_server, page):
    import os
    import signal

    job_id = runs.submit(ws, "sleeping", params={"seconds": "120"}, max_attempts=2)
    lab_server.start()
    run_dir = None
    for _ in range(120):  # the first attempt is running: kill its process as the kernel or a user would
        job = runs.get_job(ws, job_id)
        if job["status"] == "running" and job["run_dir"] and (Path(job["run_dir"]) / "pid.txt").is_file():
            run_dir = Path(job["run_dir"])
            break
        page.wait_for_timeout(500)
    assert run_dir is not None, "the job never started"
    first = int((run_dir / "pid.txt").read_text())
    os.kill(first, signal.SIGKILL)
    for _ in range(120):
        job = runs.get_job(ws, job_id)
        pid = (run_dir / "pid.txt").read_text() if (run_dir / "pid.txt").is_file() else ""
        if job["status"] == "running" and job["attempts"] == 2 and pid and int(pid) != first:
            break
        page.wait_for_timeout(500)
    assert job["attempts"] == 2 and job["status"] == "running", job
    page.goto(f"{lab_server.url}?job={job_id}")
    # the worker writes why the first start ended to the log just after it puts the job back in the queue, so a
    # second start may already run when the page first draws: the line shows at the next refresh
    head = _wait_for_text(page, "#run-head", "attempt 2 of 2.*Earlier starts: attempt 1 of 2 killed by SIGKILL", 30)
    assert page.locator("#run-head .run-phase").inner_text() == "loading the model and data"
    ran = re.search(r"ran (\d+:\d+(:\d+)?)", head).group(1)
    later = _wait_for_text(page, "#run-head", rf"ran (?!{ran}\b)\d+:\d+", 15)  # the time ticks between steps
    assert "running" in later
    _no_error_toast(page)
    _shot(page, "run-second-attempt")


def test_the_train_form_saves_and_loads_a_run_config(ws, lab_server, tiny_model_dir, tmp_path, page):
    import yaml

    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}] * 4))
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)
    _tab(page, "Train")
    page.get_by_label("max_steps").fill("12")
    _wait_for_text(page, "#train-command", "max_steps=12", 30)
    page.get_by_text("Run config file (YAML)").click()
    page.locator("#train-save-config").click()
    link = page.locator("#train-config-file a").first
    link.wait_for(timeout=30000)
    with page.expect_download() as caught:
        link.click()
    saved = yaml.safe_load(Path(caught.value.path()).read_text())
    assert saved == {"plugin": "sft", "model": "tiny", "dataset": "facts", "experiment": "default",
                     "params": {"max_steps": 12}}, saved
    # an edited config loads into the form, and Launch queues what it says
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump({**saved, "params": {"max_steps": 7, "lora_r": 4}, "priority": 2,
                                      "report_to": "tensorboard,mlflow"}))
    page.locator("#train-load-config input[type=file]").set_input_files(str(edited))
    _wait_for_text(page, "#train-message", "Loaded edited.yaml", 30)
    _wait_for_text(page, "#train-command", "max_steps=7", 30)
    assert "lora_r=4" in _text(page, "#train-command") and "--priority 2" in _text(page, "#train-command")
    assert "--report-to tensorboard,mlflow" in _text(page, "#train-command")
    page.locator("#launch").click()
    _wait_for_text(page, "#run-head", "sft", 60)
    job = runs.list_jobs(ws)[0]
    assert (job["plugin"], job["priority"]) == ("sft", 2)
    assert runs.get_job(ws, job["id"])["params"]["max_steps"] == 7
    assert runs.get_job(ws, job["id"])["report_to"] == "tensorboard,mlflow"
    _no_error_toast(page)


def test_clone_puts_a_job_s_whole_spec_back_in_the_train_form(ws, lab_server, tiny_model_dir, tmp_path, page):
    from lab import jobspec

    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}] * 4))
    first = runs.submit(ws, {
        "plugin": "sft", "model": "tiny", "dataset": "facts", "experiment": "cloned", "params": {"max_steps": 3},
        "priority": 5, "max_attempts": 2, "time_limit_min": 7.5, "report_to": "tensorboard", "nodes": 2,
        "memory_gb": 12, "then_eval": {"plugin": "eval-perplexity", "dataset": "facts", "params": {"limit": 2}},
        "group": "g1", "tags": ["first", "second"]})
    spec = runs.spec_of(ws, first)
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)
    _tab(page, "Jobs")
    _wait_for_text(page, "#jobs-table", rf"\b{first}\b", 30)
    page.locator("#selected-job input").fill(str(first))
    page.get_by_role("button", name="Clone into Train").click()
    _wait_for_text(page, "#train-command", "--priority 5", 30)
    _wait_for_text(page, "#train-command", "--eval-dataset facts", 30)
    assert jobspec.command_line(spec) in _text(page, "#train-command")
    page.locator("#launch").click()
    _wait_for_text(page, "#run-head", "sft", 60)
    again = max(j["id"] for j in runs.list_jobs(ws))
    assert again != first and runs.spec_of(ws, again) == spec, "Launch queues the cloned spec as it was"
    _no_error_toast(page)


@pytest.mark.llamacpp
def test_a_model_is_exported_as_gguf_and_served_from_the_models_page(ws, lab_server, tmp_path, page):
    import openai

    from lab import llamacpp
    from lab.pgserver import free_port

    llamacpp.ensure(ws, say=lambda m: None)
    _register_tiny_llama(ws, tmp_path)
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)
    _export_gguf_from_the_models_page(page)
    _wait_for_text(page, "#models-message", r"exported tiny to .*tiny-q8_0\.gguf", 180)
    assert (ws.workspace / "exports" / "tiny-q8_0" / "tiny-q8_0.gguf").is_file()
    files = _wait_for_text(page, "#export-files", "Modelfile", 30)  # drawn just after the message
    assert "tiny-q8_0\n.gguf" in files and "Modelfile" in files  # two downloads; the page shows the extension apart
    page.get_by_text("Serve a model (OpenAI-compatible endpoint)").click()
    _choose(page, "serve-model", "tiny")
    port = free_port()
    page.locator("#serve-port input").fill(str(port))
    page.locator("#serve-start").click()
    _wait_for_text(page, "#served", f"http://127.0.0.1:{port}/v1", 180)
    assert "client.chat.completions.create" in page.locator("#served").inner_text()
    _shot(page, "models-export-serve")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4).choices[0].message.content
    page.locator("#serve-stop").click()
    _wait_for_text(page, "#served", "No model is being served", 30)
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0).models.list()
    _no_error_toast(page)


@pytest.mark.llamacpp
def test_an_export_is_a_job_the_page_follows_finds_after_a_reload_and_cancels(ws, lab_server, tmp_path, page):
    """Held mid-conversion (its process group stopped), the export shows its phase on the Models page, still shows
    on the Jobs page after a reload, and Cancel there stops it with nothing published (what it left in the staging
    area is swept); the same export then succeeds."""
    import os
    import signal

    from lab import jobstore, llamacpp

    llamacpp.ensure(ws, say=lambda m: None)
    _register_tiny_llama(ws, tmp_path)
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)
    _export_gguf_from_the_models_page(page)
    job = wait_until(lambda: next((jobstore.get(ws, j["id"]) for j in runs.list_jobs(ws)
                                   if jobstore.get(ws, j["id"]).phase == "converting"), None), 240,
                     "the export converting")
    os.killpg(job.pid, signal.SIGSTOP)  # held in the middle of its conversion
    try:
        _wait_for_text(page, "#models-message", rf"exporting tiny: job {job.id} running \(converting\)", 30)
        page.reload()
        page.wait_for_timeout(1500)
        _tab(page, "Jobs")
        _wait_for_text(page, "#jobs-table", rf"(?s)\b{job.id}\b.*export-gguf.*converting", 30)
        page.locator("#selected-job input").fill(str(job.id))
        page.get_by_role("button", name="Cancel").click()
        # held, it cannot clean up after SIGTERM: the worker kills it after the cancel grace (3 s)
        wait_until(lambda: runs.get_job(ws, job.id)["status"] == "cancelled", 60, "the export cancelled")
    finally:
        try:
            os.killpg(job.pid, signal.SIGCONT)  # when the test failed before the job was killed
        except ProcessLookupError:
            pass
    exports = ws.workspace / "exports"
    assert not (exports / "tiny-q8_0").exists(), "a cancelled export publishes nothing"
    _wait_for_text(page, "#jobs-table", rf"(?s)\b{job.id}\b.*export-gguf.*cancelled", 30)
    _export_gguf_from_the_models_page(page)
    _wait_for_text(page, "#models-message", r"exported tiny to .*tiny-q8_0\.gguf", 180)
    assert (exports / "tiny-q8_0" / "tiny-q8_0.gguf").is_file() and not (exports / ".staging" / "tiny-q8_0").exists()
    _no_error_toast(page)


def _register_tiny_llama(ws, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-llama"
    _tiny_llama_with_starter_tokenizer(folder)
    registry.add_folder(ws, "tiny", str(folder))


def _export_gguf_from_the_models_page(page) -> None:
    """Models page: export `tiny` as GGUF Q8_0."""
    _tab(page, "Models")
    page.get_by_text("Export a model").click()
    _choose(page, "export-model", "tiny")
    page.locator("#export-format").get_by_text("GGUF", exact=True).click()
    _choose(page, "export-quant", "q8_0")
    page.locator("#export-go").click()


def _tiny_llama_with_starter_tokenizer(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    file = registry.starter_file()
    tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 tie_word_embeddings=True)).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_an_openai_endpoint_is_added_in_the_playground_and_ranked_against_a_lab_model(ws, lab_server,
                                                                                       tiny_model_dir, page):
    from test_model_server import _start, _stop

    registry.add_folder(ws, "tiny", tiny_model_dir)
    proc, base = _start(ws, "tiny")
    try:
        page.goto(lab_server.start().url)
        page.wait_for_timeout(2000)
        _tab(page, "Playground")
        page.get_by_text("OpenAI-compatible endpoints").click()
        page.locator("#ep-name input, #ep-name textarea").first.fill("served")
        page.locator("#ep-url input, #ep-url textarea").first.fill(f"{base}/v1")
        page.locator("#ep-add").click()
        _wait_for_text(page, "#ep-message", "added served: tiny at", 30)
        assert "served" in page.locator("#ep-list").inner_text()
        page.get_by_role("tab", name="Side by side and ranking").click()
        _choose(page, "sbs-models", "tiny")
        _choose(page, "sbs-models", "served · endpoint (tiny)")
        page.locator("#sbs-prompt textarea").fill("Hello")
        page.locator("#sbs-ask").click()
        _wait_for_text(page, "#sbs-answer-1", r"\S", 60)
        page.wait_for_timeout(1500)
        _shot(page, "playground-endpoint")
        page.locator("#vote-1").click()
        ranked = _wait_for_text(page, "#sbs-ranking", r"pair\(s\) added|the same", 30)
        if "pair(s) added" in ranked:
            row = datasets.preview(ws, "playground-rankings", 1)[0]
            assert (row["chosen_model"], row["rejected_model"]) == ("endpoint:served", "tiny")
        _no_error_toast(page)
    finally:
        _stop(proc)


def test_two_adapters_are_merged_from_the_models_page(ws, lab_server, tiny_model_dir, tmp_path, page):
    from test_merge import _adapter

    registry.add_folder(ws, "tiny", tiny_model_dir)
    for name, seed in (("lora-a", 1), ("lora-b", 2)):
        registry.add_folder(ws, name, _adapter(tiny_model_dir, tmp_path / name, seed), base="tiny")
    page.goto(lab_server.start().url)
    page.wait_for_timeout(2000)
    _tab(page, "Models")
    page.get_by_text("Merge fine-tunes").click()
    page.locator("#merge-go").click()  # nothing picked: said, nothing queued
    _wait_for_text(page, "#models-message", "pick the models to merge", 30)
    assert runs.list_jobs(ws) == []
    _choose(page, "merge-models", "lora-a")
    _choose(page, "merge-models", "lora-b")
    _choose(page, "merge-method", "ties")
    page.locator("#merge-weights textarea").fill("0.7,0.3")
    page.locator("#merge-go").click()
    made = _wait_for_text(page, "#models-message", r"merged lora-a × 0\.7, lora-b × 0\.3 \(ties\) as model merge-\d+",
                          180)
    name = re.search(r"as model (merge-\d+)", made).group(1)
    info = registry.info(ws, name)
    assert (info["kind"], info["base_model"]) == ("adapter", "tiny")
    assert re.search(rf"{name}\s+adapter", _wait_for_text(page, "#models-table", name, 30)), "the table shows it"
    _no_error_toast(page)
    _shot(page, "models-merge")
