"""Exports and imports are jobs of kind `tool` (export-hf, export-gguf, import-gguf): queued like any run, with a
log, a phase, cancel and the same failure kinds; a bad one is refused before anything is queued, and the CLI
commands queue them and follow them (or return at once with --no-wait)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from conftest import lab_cli

from lab import jobstore, plugins, registry, runs
from lab.errors import LabError


@pytest.fixture
def tiny(ws):
    registry.create_tiny(ws, "t", hidden=32, layers=1)
    return ws


def _jobs(ws) -> int:
    return len(runs.list_jobs(ws, limit=1000))


def test_every_tool_is_a_plugin_of_kind_tool_that_needs_no_dataset(ws):
    found, _ = plugins.discover(ws)
    tools = sorted(p.id for p in found.values() if p.kind == "tool")
    assert tools == ["export-gguf", "export-hf", "import-gguf", "merge"]
    assert not any(found[t].needs_dataset for t in tools) and not any(found[t].resumable for t in tools)


def test_an_export_is_a_job_in_the_tools_experiment_and_its_result_is_read_back(tiny, jobs_worker):
    job_id = runs.submit_tool(tiny, "export-hf", model="t", params={"export_name": "shared"})
    job = runs.get_job(tiny, job_id)
    assert (job["status"], job["experiment"], job["priority"]) == ("queued", runs.TOOLS_EXPERIMENT, runs.TOOL_PRIORITY)
    jobs_worker(tiny).serve(once=True)
    job = runs.get_job(tiny, job_id)
    assert job["status"] == "completed", job
    done = runs.tool_result(tiny, job_id)
    folder = tiny.workspace / "exports" / "shared"
    assert done["folder"] == str(folder) and (folder / "README.md").is_file()
    with tarfile.open(done["archive"]) as tar:
        assert "shared/config.json" in tar.getnames()
    log = (Path(job["run_dir"]) / "log.txt").read_text()
    assert "copying t's files" in log and "archiving shared.tar.gz" in log
    assert json.loads((Path(job["run_dir"]) / "job.json").read_text())["model"]["name"] == "t"
    assert job["output_model"] is None, "an export registers no model"


@pytest.mark.parametrize(("plugin", "model", "params", "words"), [
    ("export-hf", "nosuch", {}, "no model named 'nosuch'"),
    ("export-hf", "t", {"adapter": True}, "not an adapter"),
    ("export-hf", "t", {"export_name": "../up"}, "export name"),
    ("export-gguf", "t", {"quant": "q3_x"}, "q3_x"),
    ("import-gguf", None, {"name": "m", "file": "/no/such.gguf"}, "no such file"),
    ("import-gguf", None, {"name": "t", "file": "/no/such.gguf"}, "already exists"),
    ("sft", "t", {}, "not a tool"),
])
def test_a_bad_tool_job_is_refused_and_nothing_is_queued(tiny, plugin, model, params, words):
    before = _jobs(tiny)
    with pytest.raises(LabError) as err:
        runs.submit_tool(tiny, plugin, model=model, params=params)
    assert words in str(err.value)
    assert _jobs(tiny) == before
    assert not [p for p in (tiny.workspace / "exports").glob("*") if p.name != ".staging"]


def test_a_file_that_is_not_gguf_is_refused_before_queueing(tiny, tmp_path, jobs_worker):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(LabError, match="not a GGUF file"):
        runs.submit_tool(tiny, "import-gguf", params={"name": "m", "file": str(fake)})
    refused = lab_cli("models", "import-gguf", "m", str(fake))
    assert refused.returncode == 2 and "not a GGUF file" in refused.stderr and "Traceback" not in refused.stderr
    assert _jobs(tiny) == 0


def test_the_cli_queues_an_export_without_waiting_and_a_worker_runs_it(tiny, jobs_worker):
    queued = lab_cli("models", "export", "t", "--as", "later", "--no-wait", check=True)
    (job,) = runs.list_jobs(tiny)
    assert f"queued job {job['id']} (export-hf)" in queued.stdout and job["status"] == "queued"
    assert not (tiny.workspace / "exports" / "later").exists()
    jobs_worker(tiny).serve(once=True)
    assert runs.get_job(tiny, job["id"])["status"] == "completed"
    assert (tiny.workspace / "exports" / "later.tar.gz").is_file()
    waited = lab_cli("models", "export", "t", "--as", "now", check=True)
    assert f"exported t to {tiny.workspace / 'exports' / 'now'}" in waited.stdout


def test_a_cancelled_export_publishes_nothing_and_the_same_export_then_works(tiny, jobs_worker, monkeypatch):
    """Cancelled while it runs (the job is stopped by SIGTERM in the middle of its work): no folder, no archive."""
    import threading

    from conftest import wait_until

    registry.create_tiny(tiny, "big", hidden=256, layers=4)  # a few MB: the archive takes a moment
    job_id = runs.submit_tool(tiny, "export-hf", model="big")
    worker = jobs_worker(tiny)
    thread = threading.Thread(target=worker.serve, kwargs={"until_empty": True}, daemon=True)
    thread.start()
    staging = tiny.workspace / "exports" / ".staging" / "big"
    wait_until(lambda: staging.is_dir() and any(staging.iterdir()), 120, "the export writing its files")
    jobstore.cancel(tiny, job_id)
    thread.join(120)
    job = runs.get_job(tiny, job_id)
    assert job["status"] == "cancelled", job
    exports = tiny.workspace / "exports"
    assert not (exports / "big").exists() and not (exports / "big.tar.gz").exists()
    again = runs.submit_tool(tiny, "export-hf", model="big")
    jobs_worker(tiny).serve(once=True)
    assert runs.get_job(tiny, again)["status"] == "completed"
    assert (tiny.workspace / "exports" / "big.tar.gz").is_file() and not staging.exists()
