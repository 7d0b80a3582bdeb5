"""Serve one model of the lab at an OpenAI-compatible endpoint: transformers' own server (/v1/chat/completions
streamed or not, /v1/completions, /v1/responses) in a child process (lab.model_backend), behind a gate of the lab's.

Why transformers' server and not llama.cpp's: it serves the lab's models as they are (HF folders, adapters merged,
the same weights and chat template the Playground uses), with no conversion and no build; llama.cpp's server is for
the GGUF exports and is the user's to run (the README shows how).

The child answers only on a Unix socket in a private folder; the gate (Gate around Proxy, plain ASGI) listens on the
user's port and keeps what transformers' server would otherwise allow any caller:
- only the served model: its lab name is the only model id; any other name gets OpenAI's 404 `model_not_found`
  (transformers' server would load any hub id or server path it is given);
- only the OpenAI routes (`/load_model`, `/reset` and the rest answer 404);
- loopback by default; binding elsewhere needs an API key (`--api-key` or LAB_API_KEY) and a request without it
  gets 401, as OpenAI answers;
- the Host header must be one of the server's names (421) and a browser page from another origin is refused (403),
  as for the web lab (lab.guard).
The model is served under its lab name: the child runs in a folder where that name holds the model's files, so no
server path appears in any answer.
"""

from __future__ import annotations

import hmac
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lab import registry
from lab.errors import LabError
from lab.export import generates, generating_architecture, merge_into
from lab.guard import HostPolicy, check_port, is_loopback
from lab.jobstore import process_alive
from lab.settings import Settings

ROUTES = {("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
          ("POST", "/v1/responses"), ("GET", "/health")}
MAX_BODY = 8 * 2**20


def _error(status: int, message: str, kind: str, code: str | None = None) -> tuple[int, bytes]:
    return status, json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class Gate:
    """ASGI middleware: the served model only, the OpenAI routes only, the API key, the Host and Origin rules."""

    def __init__(self, app, model: str, policy: HostPolicy, api_key: str | None, created: int):
        self.app, self.model, self.policy, self.api_key, self.created = app, model, policy, api_key, created

    async def _send(self, send, status: int, body: bytes, extra: tuple = ()) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra]})
        await send({"type": "http.response.body", "body": body})

    def _check(self, scope) -> tuple[int, bytes] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.policy.host_ok(headers.get("host")):
            return _error(421, "this server does not answer to that host name", "invalid_request_error")
        if "origin" in headers and not self.policy.origin_ok(headers["origin"], headers.get("host")):
            return _error(403, "requests from other sites' pages are refused", "invalid_request_error")
        if self.api_key:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return _error(401, "a valid API key is needed: Authorization: Bearer KEY", "invalid_request_error",
                              "invalid_api_key")
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if (method, path) not in ROUTES and not (method == "GET" and path.startswith("/v1/models/")):
            return _error(404, f"no route {method} {path}", "invalid_request_error")
        return None

    def _model_entry(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "llm-lab"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self._check(scope)
        if refused:
            return await self._send(send, *refused)
        path = scope["path"].rstrip("/")
        if path == "/v1/models":
            body = {"object": "list", "data": [self._model_entry()]}
            return await self._send(send, 200, json.dumps(body).encode())
        if path.startswith("/v1/models/"):
            asked = path.removeprefix("/v1/models/")
            if asked != self.model:
                return await self._send(send, *_error(404, f"The model `{asked}` does not exist",
                                                      "invalid_request_error", "model_not_found"))
            return await self._send(send, 200, json.dumps(self._model_entry()).encode())
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the body to check the model it asks for, then hand it on unchanged
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                return await self._send(send, *_error(413, "request body too large", "invalid_request_error"))
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            asked = json.loads(body or b"{}").get("model")
        except (ValueError, AttributeError):
            return await self._send(send, *_error(400, "the body must be a JSON object", "invalid_request_error"))
        if asked is not None and asked != self.model:
            return await self._send(send, *_error(404, f"The model `{asked}` does not exist (this server serves "
                                                       f"`{self.model}`)", "invalid_request_error",
                                                  "model_not_found"))
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def servable(settings: Settings, name: str) -> dict:
    """The model to serve, or a clear refusal: classifiers and reward heads do not generate text."""
    info = registry.info(settings, name)
    if info["kind"] in ("classifier", "reward"):
        raise LabError(f"{name} is a {info['kind']} model: it scores text and cannot answer chat completions",
                       "serve a causal language model or an adapter")
    arch = generating_architecture(settings, info)
    if not generates(arch):
        raise LabError(f"{name} is a {arch} model, not a causal language model: it cannot generate text")
    return info


def _folder(settings: Settings, info: dict, tmp: Path, say: Callable[[str], None]) -> Path:
    """The HF folder to load: the model's own, or an adapter merged into its base (in a temporary folder)."""
    if info["kind"] != "adapter":
        return Path(info["path"])
    say(f"merging the adapter {info['name']} into its base")
    return merge_into(settings, info, tmp / "merged")


def state_file(settings: Settings, name: str) -> Path:
    return settings.workspace / "serving" / f"{name}.json"


HOP_BY_HOP = {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
              b"proxy-authorization", b"authorization", b"content-length"}


class Proxy:
    """ASGI app: each request goes to the model's process on its socket, and the answer comes back as it is made
    (a stream chunk by chunk). A client that leaves stops its generation: the connection to the model's process is
    closed, and transformers' server cancels a request whose client went away."""

    def __init__(self, socket_path: Path, stopped: Callable[[], str | None]):
        import httpx

        self.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
                                        base_url="http://model", timeout=httpx.Timeout(None, connect=10))
        self.stopped = stopped

    async def __call__(self, scope, receive, send):
        import asyncio

        import httpx

        if scope["type"] != "http":
            return None
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in HOP_BY_HOP]
        request = self.client.build_request(scope["method"], scope["path"], headers=headers, content=b"".join(chunks),
                                            params=scope.get("query_string", b"").decode("latin-1"))

        async def forward():
            try:
                response = await self.client.send(request, stream=True)
            except httpx.TransportError:
                why = self.stopped() or "it does not answer"
                status, body = _error(503, f"the model's server is not running: {why}", "server_error")
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json")]})
                return await send({"type": "http.response.body", "body": body})
            try:
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await response.aclose()

        answering = asyncio.ensure_future(forward())

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            answering.cancel()

        watching = asyncio.ensure_future(watch())
        try:
            await answering
        except asyncio.CancelledError:
            if not answering.cancelled():
                raise
        finally:
            watching.cancel()


def _start_backend(name: str, folder: Path, tmp: Path, log: Path) -> tuple[subprocess.Popen, Path]:
    """The model's process (lab.model_backend), to answer on a socket in `tmp`."""
    socket_path = tmp / "model.sock"
    here = tmp / "names"
    here.mkdir()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lab.model_backend", str(socket_path), name, str(folder)],
                                cwd=here, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return proc, socket_path


def _wait_ready(backend: subprocess.Popen, socket_path: Path, name: str, log: Path, wait_s: float = 900) -> None:
    deadline = time.monotonic() + wait_s
    while not _answers(socket_path):
        if backend.poll() is not None:
            raise LabError(f"the model's server stopped while loading {name} (exit {backend.returncode}):\n"
                           f"{_tail(log)}", f"the whole output is in {log}")
        if time.monotonic() > deadline:
            raise LabError(f"the model's server did not answer within {wait_s:.0f} s", f"its output is in {log}")
        time.sleep(0.2)


def _answers(socket_path: Path) -> bool:
    import socket

    if not socket_path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(socket_path))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: model\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:]).strip()
    except OSError:
        return ""


def serve(settings: Settings, name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          say: Callable[[str], None] = print) -> None:
    """Serve `name` until SIGINT or SIGTERM."""
    if not is_loopback(host) and not api_key:
        raise LabError(f"binding to {host} makes the model reachable from other machines: set an API key",
                       "pass --api-key or set LAB_API_KEY, or bind to 127.0.0.1")
    if not 0 < port < 65536:
        raise LabError(f"--port must be between 1 and 65535, got {port}")
    info = servable(settings, name)
    check_port(host, port)
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise LabError("transformers' server needs fastapi, uvicorn and openai", "pip install 'transformers[serving]'")
    import uvicorn

    logs = settings.workspace / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"serve-{name}.model.log"
    log.write_text("")
    # uvicorn stops on SIGTERM and then raises it again: with this handler that ends in the `finally` below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="lab-serve-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o700)  # the model's socket: for the gate only
        folder = _folder(settings, info, tmp, say)
        say(f"loading {name} ...")
        backend, socket_path = _start_backend(name, folder, tmp, log)
        record = state_file(settings, name)
        try:
            _wait_ready(backend, socket_path, name, log)
            server = uvicorn.Server(uvicorn.Config(
                Gate(Proxy(socket_path, lambda: _stopped(backend, log)), name, HostPolicy(host, port), api_key,
                     int(time.time())), host=host, port=port, log_level="warning"))
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"name": name, "pid": os.getpid(), "url": url, "host": host, "port": port,
                                          "api_key": bool(api_key), "started": time.time()}))
            say(f"serving {name} at {url} (OpenAI-compatible: /models, /chat/completions, /completions); "
                "Ctrl-C stops")
            if not is_loopback(host):
                say(f"{host} is not loopback: requests need the header 'Authorization: Bearer <API key>'")
            _stop_with(backend, server)
            server.run()
            if backend.poll() is not None:
                raise LabError(f"the model's server stopped: {_stopped(backend, log)}", f"its output is in {log}")
        finally:
            record.unlink(missing_ok=True)
            _end(backend)


def _stopped(backend: subprocess.Popen, log: Path) -> str | None:
    """Why the model's process is gone (its exit code and last lines), or None while it runs."""
    code = backend.poll()
    if code is None:
        return None
    how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit {code}"
    return f"{how}: {_tail(log, 5)}"


def _stop_with(backend: subprocess.Popen, server) -> None:
    """The gate stops when the model's process does (a crash, the out-of-memory killer): a server that answers
    503 forever helps no one."""
    import threading

    def watch():
        backend.wait()
        server.should_exit = True

    threading.Thread(target=watch, daemon=True, name="model-process").start()


def _end(backend: subprocess.Popen) -> None:
    if backend.poll() is None:
        backend.terminate()
        try:
            backend.wait(15)
        except subprocess.TimeoutExpired:
            backend.kill()
            backend.wait()


# --- started and stopped from the Models page -------------------------------------------------------------------


def running(settings: Settings) -> list[dict]:
    """The model servers started from this workspace that are still alive (stale records are removed)."""
    out = []
    for f in sorted((settings.workspace / "serving").glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if process_alive(int(rec.get("pid", 0))):
            out.append(rec)
        else:
            f.unlink(missing_ok=True)
    return out


def start(settings: Settings, name: str, port: int, wait_s: float = 300) -> dict:
    """Start `lab models serve NAME --port P` in its own process (loopback only) and wait until it answers."""
    servable(settings, name)
    if any(r["name"] == name for r in running(settings)):
        raise LabError(f"{name} is already being served", "stop it first")
    check_port("127.0.0.1", port)
    logs = settings.workspace / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"serve-{name}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "models", "serve", name, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **settings.env})
    deadline = time.monotonic() + wait_s
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (logs / f"serve-{name}.log").read_text()[-800:]
            raise LabError(f"the server for {name} stopped (exit {proc.returncode}): {tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return next(r for r in running(settings) if r["name"] == name)
        except (OSError, StopIteration):
            time.sleep(0.5)
    proc.terminate()
    raise LabError(f"the server for {name} did not answer within {wait_s:.0f} s", f"see {logs / f'serve-{name}.log'}")


def stop(settings: Settings, name: str) -> None:
    rec = next((r for r in running(settings) if r["name"] == name), None)
    if rec is None:
        raise LabError(f"{name} is not being served")
    try:
        os.killpg(int(rec["pid"]), signal.SIGTERM)  # its own session: the server and anything it started
    except ProcessLookupError:
        pass
    for _ in range(100):
        if not process_alive(int(rec["pid"])):
            break
        time.sleep(0.1)
    state_file(settings, name).unlink(missing_ok=True)
