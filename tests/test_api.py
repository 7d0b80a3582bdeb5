"""The named API endpoints, driven with gradio_client against a running `lab serve`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import wait_for_status, wait_until, write_jsonl
from gradio_client import Client, handle_file

from lab import datasets, registry, runs

API = {"submit_job", "submit_sweep", "list_jobs", "get_job", "cancel_job", "job_metrics", "list_models",
       "list_datasets", "upload_dataset", "rank_next", "rank_submit", "rank_status"}


def _poll(client: Client, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.predict(job_id, api_name="/get_job")
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


def test_a_client_uploads_trains_and_reads_metrics(ws, lab_server, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    client = Client(lab_server.start().url, verbose=False)
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {f"/{n}" for n in API} == named, "exactly the documented endpoints are public"

    rows = [{"instruction": "Say yes", "input": "", "output": "yes"}] * 6
    info = client.predict("yes", handle_file(str(write_jsonl(tmp_path / "yes.jsonl", rows))), "auto",
                          api_name="/upload_dataset")
    assert (info["name"], info["format"], info["rows"]) == ("yes", "alpaca", 6)
    assert [d["name"] for d in client.predict(api_name="/list_datasets")] == ["yes"]
    # a file with other column names and another encoding: mapped and decoded as asked
    spam = tmp_path / "spam.csv"
    spam.write_bytes("v1,v2\nham,caf\xe9 at 5\nspam,win \xa3100\n".encode("latin-1"))
    with pytest.raises(Exception, match="not UTF-8"):
        client.predict("spam", handle_file(str(spam)), "auto", api_name="/upload_dataset")
    info = client.predict("spam", handle_file(str(spam)), "auto", "text=v2,label=v1", "latin-1",
                          api_name="/upload_dataset")
    assert (info["format"], info["rows"], info["notes"]) == ("classification", 2, [])
    assert datasets.preview(ws, "spam", 1)[0] == {"text": "café at 5", "label": "ham"}

    job = client.predict(json.dumps({"plugin": "sft", "model": "tiny", "dataset": "yes", "experiment": "api",
                                     "params": {"max_steps": 3}}), api_name="/submit_job")
    assert job["status"] == "queued" and job["experiment"] == "api"
    done = _poll(client, job["id"])
    assert done["status"] == "completed", done["log_tail"]
    metrics = client.predict(job["id"], "loss,learning_rate", api_name="/job_metrics")
    assert len(metrics["loss"]) == 3 and set(metrics) == {"loss", "learning_rate"}
    assert [j["id"] for j in client.predict("api", "", api_name="/list_jobs")] == [job["id"]]
    tracked = client.predict(json.dumps({"plugin": "instant", "experiment": "api", "report_to": "tensorboard,mlflow"}),
                             api_name="/submit_job")
    assert runs.get_job(ws, tracked["id"])["report_to"] == "tensorboard,mlflow"
    swept = client.predict(json.dumps({"plugin": "instant", "experiment": "api", "group": "api-sweep"}),
                           json.dumps({"steps": [1, 2]}), api_name="/submit_sweep")
    assert swept["group"] == "api-sweep" and len(swept["ids"]) == 2
    assert sorted(runs.spec_of(ws, i).params["steps"] for i in swept["ids"]) == [1, 2]
    assert done["output_model"] in {m["name"] for m in client.predict(api_name="/list_models")}


def test_api_errors_are_messages_and_change_nothing(ws, lab_server, tmp_path):
    client = Client(lab_server.start().url, verbose=False)
    with pytest.raises(Exception, match="unknown plugin 'nope'"):
        client.predict('{"plugin": "nope"}', api_name="/submit_job")
    with pytest.raises(Exception, match="spec must be a JSON object"):
        client.predict('{"plugin": "instant", "params": [1', api_name="/submit_job")
    with pytest.raises(Exception, match="unknown tracker 'comet'"):
        client.predict('{"plugin": "instant", "report_to": "comet"}', api_name="/submit_job")
    with pytest.raises(Exception, match="unknown key `learning_rate` in spec"):
        client.predict('{"plugin": "instant", "learning_rate": 1}', api_name="/submit_job")
    with pytest.raises(Exception, match="grid must map each parameter to a non-empty list"):
        client.predict('{"plugin": "instant"}', '{"steps": 3}', api_name="/submit_sweep")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n')
    with pytest.raises(Exception, match="line 1: `text` is empty"):
        client.predict("bad", handle_file(str(bad)), "auto", api_name="/upload_dataset")
    with pytest.raises(Exception, match="no job 42"):
        client.predict(42, api_name="/cancel_job")
    assert runs.list_jobs(ws) == [] and client.predict(api_name="/list_datasets") == []


def test_cancel_through_the_api(ws, lab_server):
    client = Client(lab_server.start().url, verbose=False)
    job = client.predict(json.dumps({"plugin": "sleeping", "params": {"seconds": 60}}), api_name="/submit_job")
    wait_for_status(ws, job["id"], ("running",))
    assert client.predict(job["id"], api_name="/cancel_job") == "cancelling"
    assert _poll(client, job["id"], timeout=30)["status"] == "cancelled"


def test_a_server_restart_mid_job_loses_nothing(ws, lab_server):
    server = lab_server.start()
    job_id = runs.submit(ws, "sleeping", params={"seconds": "6"})
    wait_for_status(ws, job_id, ("running",))
    wait_until(lambda: runs.get_job(ws, job_id)["run_dir"], what="the run folder")
    log = Path(runs.get_job(ws, job_id)["run_dir"]) / "log.txt"
    wait_until(lambda: log.is_file() and "sleeping" in log.read_text(), what="the plugin to start")
    assert server.stop() == 0
    job = runs.get_job(ws, job_id)
    assert job["status"] == "queued" and job["error"].startswith("interrupted"), "never left running"
    server.start()
    assert wait_for_status(ws, job_id, timeout=90) == "completed"
    job = runs.get_job(ws, job_id)
    assert job["attempts"] == 1, "a stop by the server is not the job's fault: it uses up no attempt"
    assert "started again (attempt 1 of 1)" in (Path(job["run_dir"]) / "log.txt").read_text()


def test_binding_beyond_loopback_needs_a_password(ws, serves):
    from conftest import lab_cli

    done = lab_cli("serve", "--host", "0.0.0.0", "--port", "1")
    assert done.returncode == 2
    assert "set a password" in done.stderr and "Traceback" not in done.stderr


def test_a_password_protects_the_page_and_the_api(ws, serves):
    import urllib.error
    import urllib.request

    from conftest import LabServer

    server = LabServer(ws.workspace, workers=0, extra=("--password", "s3cret")).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.url + "config", timeout=5)
        assert refused.value.code == 401
        with pytest.raises(ValueError, match="Could not login"):
            Client(server.url, verbose=False, auth=("lab", "wrong"))
        client = Client(server.url, verbose=False, auth=("lab", "s3cret"))
        assert client.predict(api_name="/list_models") == []
    finally:
        server.stop()


def test_workers_stop_when_the_server_is_killed(ws, lab_server):
    import signal

    from lab import jobstore

    server = lab_server.start()
    deadline = time.monotonic() + 30
    while not jobstore.live_workers(ws) and time.monotonic() < deadline:
        time.sleep(0.2)
    (worker,) = jobstore.live_workers(ws)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    deadline = time.monotonic() + 15
    while jobstore.live_workers(ws) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not jobstore.live_workers(ws), f"worker {worker.id} outlived its server"


def test_another_front_end_ranks_through_the_api(ws, lab_server, tmp_path):
    rows = [{"id": f"q{i}", "prompt": f"Prompt {i}?", "candidates": [{"text": f"{c}{i}", "model": f"m-{c}"}
                                                                   for c in "abc"]} for i in range(3)]
    datasets.add(ws, "cands", write_jsonl(tmp_path / "cands.jsonl", rows))
    client = Client(lab_server.start().url, verbose=False)
    item = client.predict("cands", "ann", api_name="/rank_next")
    assert item["item"] == "q0" and [a["number"] for a in item["answers"]] == [1, 2, 3]
    assert "m-a" not in json.dumps(item), "the models stay hidden"
    done = client.predict("cands", "q0", "ann", "order", "3,1,2", "prefs", "best-vs-rest", api_name="/rank_submit")
    assert done["added"] == 2 and done["pairs"] == 2 and sorted(done["models"]) == ["m-a", "m-b", "m-c"]
    done = client.predict("cands", "q1", "ann", "best_worst", "", "prefs", "all", 2, 3, api_name="/rank_submit")
    assert done["added"] == 3 and done["pairs"] == 5
    with pytest.raises(Exception, match="already judged item q0"):
        client.predict("cands", "q0", "ann", "order", "1,2,3", "prefs", "all", api_name="/rank_submit")
    with pytest.raises(Exception, match="'9' is not an answer number"):
        client.predict("cands", "q2", "ann", "order", "9,1,2", "prefs", "all", api_name="/rank_submit")
    status = client.predict("cands", api_name="/rank_status")
    assert status["annotators"] == {"ann": {"done": 2, "skipped": 0}} and status["ranked_by_anyone"] == 2
    assert datasets.info(ws, "prefs")["rows"] == 5
