"""The web lab attacked as a hostile page or script would on 127.0.0.1: workspace files, server paths, foreign
hosts and origins, password guessing. Each test failed against the lab before these holes were closed."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse

import pytest
from conftest import LabServer, write_jsonl

from lab import datasets, settings
from lab.guard import HostPolicy, LoginThrottle

SECRET = "hf_secret_value_0123456789"


def _request(server: LabServer, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """One raw HTTP request (urllib would fix up the Host header); returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        wanted = {"Host": f"127.0.0.1:{server.port}", **(headers or {})}
        for key, value in wanted.items():
            if value is not None:
                conn.putheader(key, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _call(server: LabServer, name: str, data: list, headers: dict | None = None) -> tuple[str, str]:
    """A named endpoint called the way a script does it by hand: POST, then read the event stream."""
    status, _, body = _request(server, "POST", f"/gradio_api/call/{name}",
                               {"Content-Type": "application/json", **(headers or {})},
                               json.dumps({"data": data}).encode())
    assert status == 200, body
    event = json.loads(body)["event_id"]
    _, _, stream = _request(server, "GET", f"/gradio_api/call/{name}/{event}")
    kind = "complete" if b"event: complete" in stream else "error"
    return kind, stream.decode()


@pytest.fixture
def armed(ws, tmp_path):
    """A workspace holding what must never leave it: an owner-only secrets file and the database, plus a run
    artifact that may be downloaded."""
    datasets.add(ws, "notes", write_jsonl(tmp_path / "notes.jsonl", [{"text": "hello"}]))
    secrets = ws.workspace / "secrets.env"
    secrets.write_text(f"HF_TOKEN={SECRET}\n")
    secrets.chmod(0o600)
    run = ws.workspace / "experiments" / "default" / "runs" / "1-sft"
    run.mkdir(parents=True)
    (run / "job.json").write_text('{"job_id": 1}\n')
    (run / "leak").symlink_to(secrets)  # a link planted inside an allowed folder
    return ws


def _file(server: LabServer, path) -> tuple[int, bytes]:
    status, _, body = _request(server, "GET", "/gradio_api/file=" + urllib.parse.quote(str(path)))
    return status, body


def test_no_workspace_file_is_served_but_run_artifacts_are(armed, serves):
    ws = armed.workspace
    server = LabServer(ws, workers=0).start()
    try:
        run = ws / "experiments" / "default" / "runs" / "1-sft"
        for path in [ws / "secrets.env", ws / "lab.db", ws / "experiments" / ".." / "lab.db", run / "leak",
                     ws / "datasets" / ".." / "secrets.env", ws / "logs" / "worker-1.log", "/etc/passwd",
                     f"{ws}/../ws/secrets.env"]:
            status, body = _file(server, path)
            assert status in (403, 404), f"{path} was served ({status})"
            assert SECRET.encode() not in body and b"SQLite format" not in body
        status, body = _file(server, ws / "experiments" / "default" / "runs" / "1-sft" / "job.json")
        assert (status, body) == (200, b'{"job_id": 1}\n')
        status, body = _file(server, ws / "datasets" / "notes" / "data.jsonl")
        assert status == 200 and b"hello" in body
    finally:
        server.stop()


def test_logged_in_clients_get_no_workspace_file_either(armed, serves):
    server = LabServer(armed.workspace, workers=0, extra=("--password", "pw-for-test")).start()
    try:
        status, headers, _ = _request(server, "POST", "/login",
                                      {"Content-Type": "application/x-www-form-urlencoded"},
                                      b"username=lab&password=pw-for-test")
        assert status == 200
        cookies = "; ".join(c.split(";", 1)[0] for c in headers.get("set-cookie", "").split(", ") if "=" in c)
        for path in [armed.workspace / "secrets.env", armed.workspace / "lab.db"]:
            status, _, body = _request(server, "GET", "/gradio_api/file=" + urllib.parse.quote(str(path)),
                                       {"Cookie": cookies})
            assert status in (403, 404) and SECRET.encode() not in body
    finally:
        server.stop()


@pytest.mark.parametrize("payload", ["{server}", {"path": "{server}"},
                                     {"path": "{server}", "meta": {"_type": "gradio.FileData"}}])
def test_upload_dataset_takes_only_uploaded_files(ws, tmp_path, payload, serves):
    """A plain path, or a file-looking object that names a server file, is refused and nothing is stored."""
    private = write_jsonl(tmp_path / "private.jsonl", [{"text": "the server's own file"}])
    private.chmod(0o600)
    data = json.loads(json.dumps(payload).replace("{server}", str(private)))
    server = LabServer(ws.workspace, workers=0).start()
    try:
        kind, stream = _call(server, "upload_dataset", ["stolen", data, "auto", "", "", "", ""])
        assert kind == "error", stream
        assert "uploaded" in stream
        assert datasets.list_all(settings.load()) == []
        assert not (ws.workspace / "datasets" / "stolen").exists()
    finally:
        server.stop()


def test_foreign_hosts_and_origins_are_refused(ws, serves):
    server = LabServer(ws.workspace, workers=0).start()
    try:
        status, _, _ = _request(server, "GET", "/", {"Host": "attacker.example"})
        assert status == 421
        status, _, _ = _request(server, "GET", "/gradio_api/info", {"Host": "attacker.example:7860"})
        assert status == 421
        for origin in ("http://attacker.example", "null", f"http://localhost:{server.port + 1}"):
            status, headers, _ = _request(server, "GET", "/gradio_api/info", {"Origin": origin})
            assert status == 403 and "access-control-allow-origin" not in headers, origin
            status, headers, _ = _request(server, "OPTIONS", "/gradio_api/call/list_models",
                                          {"Origin": origin, "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in headers, origin
        # a DNS-rebinding page: foreign name and foreign origin together
        status, headers, _ = _request(server, "POST", "/gradio_api/call/list_models",
                                      {"Host": "attacker.example", "Origin": "http://attacker.example",
                                       "Content-Type": "application/json"}, b'{"data": []}')
        assert status == 421 and "access-control-allow-origin" not in headers
        # the lab's own page and names are answered
        for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
            status, _, _ = _request(server, "GET", "/", {"Host": host})
            assert status == 200, host
        kind, _ = _call(server, "list_models", [], {"Origin": f"http://127.0.0.1:{server.port}"})
        assert kind == "complete"
    finally:
        server.stop()


def test_allowed_hosts_lets_a_proxy_name_in(ws, serves):
    server = LabServer(ws.workspace, workers=0, extra=("--allowed-hosts", "lab.internal")).start()
    try:
        status, _, _ = _request(server, "GET", "/", {"Host": "lab.internal"})
        assert status == 200
        status, _, _ = _request(server, "GET", "/gradio_api/info",
                                {"Host": "lab.internal", "Origin": "https://lab.internal"})
        assert status == 200
        status, _, _ = _request(server, "GET", "/", {"Host": "attacker.example"})
        assert status == 421
    finally:
        server.stop()


def test_host_policy_rules():
    loop = HostPolicy("127.0.0.1", 7860)
    assert loop.host_ok("127.0.0.1:7860") and loop.host_ok("localhost") and loop.host_ok("[::1]:7860")
    assert not loop.host_ok("attacker.example") and not loop.host_ok(None) and not loop.host_ok("10.0.0.5:7860")
    assert loop.origin_ok("http://127.0.0.1:7860", "127.0.0.1:7860")
    assert not loop.origin_ok("http://127.0.0.1:9999", "127.0.0.1:7860")
    assert not loop.origin_ok("null", "127.0.0.1:7860")
    assert not loop.origin_ok("file://", "127.0.0.1:7860")
    every = HostPolicy("0.0.0.0", 7860)
    assert every.host_ok("10.0.0.5:7860") and not every.host_ok("attacker.example")
    assert HostPolicy("127.0.0.1", 7860, ["*"]).host_ok("anything.example")


def test_login_throttle_doubles_per_client():
    now = [0.0]
    throttle = LoginThrottle(first=0.5, cap=4.0, clock=lambda: now[0])
    assert throttle.delay("a") == 0
    waits = []
    for _ in range(5):
        throttle.failed("a")
        waits.append(throttle.delay("a"))
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert throttle.delay("b") == 0, "another client is not slowed"
    throttle.succeeded("a")
    assert throttle.delay("a") == 0
    throttle.failed("a")
    now[0] += 3600
    assert throttle.delay("a") == 0, "old failures are forgotten"


def test_password_guessing_slows_down(ws, serves):
    server = LabServer(ws.workspace, workers=0, extra=("--password", "right-one")).start()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    try:
        took = []
        for guess in range(4):
            start = time.monotonic()
            status, _, _ = _request(server, "POST", "/login", form, f"username=lab&password=guess{guess}".encode())
            took.append(time.monotonic() - start)
            assert status != 200
        assert took[1] >= 0.45 and took[2] >= 0.95 and took[3] >= 1.95, took
        status, _, _ = _request(server, "POST", "/login", form, b"username=lab&password=right-one")
        assert status == 200
        start = time.monotonic()
        _request(server, "POST", "/login", form, b"username=lab&password=wrong-again")
        assert time.monotonic() - start < 0.45, "a good password clears the count"
    finally:
        server.stop()
