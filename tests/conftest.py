"""Shared fixtures: a fresh workspace per test (real SQLite file), fake plugins, a tiny model built once; and the
two tiers: `make test` runs everything, `make test-fast` (LAB_TEST_TIER=fast) leaves out what starts job
processes, servers, clusters or a browser. A test that starts job processes asks for the `jobs_worker` fixture,
one that starts a server for `lab_server` (or another server fixture): that marks it (`jobs`, `server`) at
collection. In the fast tier, a test that starts one anyway fails at once and says which fixture it needs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import db, settings
from lab.pgserver import free_port
from lab.tables import TERMINAL_STATES

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FAKE_PLUGINS = ("fake_plugins.instant,fake_plugins.failing,fake_plugins.sleeping,fake_plugins.silent,"
                "fake_plugins.leaky,fake_plugins.modelmaker")


FAST = os.environ.get("LAB_TEST_TIER") == "fast"
MARKED_BY_FIXTURE = {"jobs_worker": "jobs", "lab_server": "server", "serves": "server", "postgres_server": "server",
                     "page": "browser"}
# what a command line that starts a job, a worker, a server, a cluster or a browser looks like
STARTS = re.compile(r"jobs\.runner|jobs\.worker|lab\.model_backend|torchrun|\bsbatch\b|\bsrun\b|slurmctld|slurmd\b|"
                    r"munged|initdb|pg_ctl|chrom")
# `lab ...` arguments that run jobs or a server (an export or an import, the starter's too, is a job it follows)
STARTS_IN_CLI = {"--wait", "serve", "worker", "demo", "setup", "export", "import-gguf", "starter"}
STARTED_IN_FAST_TIER: list[str] = []  # what the running test tried to start; the waits below fail at once on it


def pytest_collection_modifyitems(config, items):
    """Mark each test by the fixtures it uses (directly or through other fixtures): `make test-fast` deselects
    the marks that need processes."""
    for item in items:
        for fixture, mark in MARKED_BY_FIXTURE.items():
            if fixture in item.fixturenames:
                item.add_marker(mark)
        if item.get_closest_marker("slurm"):  # one throwaway cluster: its tests stay on one xdist worker
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture(autouse=FAST)
def _fast_tier_starts_no_process(request, monkeypatch):
    """In the fast tier, starting a job process, a worker, a server or a browser fails the test with the fixture
    it should ask for (which moves it to the full suite); also where the code that tried catches the error."""
    if not FAST:
        yield
        return
    real = subprocess.Popen.__init__
    started = STARTED_IN_FAST_TIER
    started.clear()

    def guarded(self, args, *a, **kw):
        argv = [str(x) for x in args] if isinstance(args, (list, tuple)) else str(args).split()
        line = " ".join(argv)
        cli = "lab.cli" in line or (argv and Path(argv[0]).name == "lab")
        if STARTS.search(line) or (cli and STARTS_IN_CLI & set(argv)):
            started.append(line[:200])
            raise pytest.fail.Exception(
                f"{request.node.nodeid} starts `{line[:200]}` in the fast tier: ask for the `jobs_worker` fixture "
                "(job processes, a worker) or a server fixture (lab_server, serves), which marks it for the full "
                "suite only")
        return real(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield
    call = getattr(request.node, "rep_call", None)
    if started and (call is None or call.passed):  # the code that tried caught the error: fail the test here
        pytest.fail(f"the fast tier starts no `{started[0]}`")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test (the fast tier's guard reads whether the call passed)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def jobs_worker(ws):
    """What a test that runs jobs asks for. It marks the test `jobs` (left out of `make test-fast`), and gives a
    quiet worker: `jobs_worker()` or `jobs_worker(settings, slots=2)`, then `.serve(until_empty=True)`."""
    from jobs.worker import Worker

    def worker(s=None, **kw):
        kw.setdefault("say", lambda m: None)
        return Worker(s or ws, **kw)

    return worker


@pytest.fixture
def serves():
    """What a test that starts a server process itself (`lab serve`, `lab models serve`) asks for: it marks the
    test `server`. `serves(proc)` hands a process over to be killed at the end if the test left it running."""
    procs: list[subprocess.Popen] = []
    yield procs.append
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """Settings for a new workspace under tmp_path; child processes (workers, runners) inherit them."""
    monkeypatch.setenv("LAB_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("LAB_DATABASE_URL", raising=False)
    monkeypatch.delenv("LAB_PASSWORD", raising=False)
    monkeypatch.setenv("LAB_WANDB", "off")
    monkeypatch.setenv("LAB_EXTRA_PLUGINS", FAKE_PLUGINS)
    monkeypatch.setenv("LAB_HEARTBEAT_S", "0.5")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    s = settings.load()
    yield s
    db.dispose_all()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama model with its own tokenizer, built once per session and registered by reference."""
    from lab.registry import build_tiny

    folder = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny(folder)
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lab_cli(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `lab` command as a user would, in a child process with the current environment."""
    done = subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"lab {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def _not_started_in_fast_tier() -> None:
    """A wait for a job or a server that the fast tier did not let start ends at once."""
    if STARTED_IN_FAST_TIER:
        pytest.fail(f"the fast tier starts no `{STARTED_IN_FAST_TIER[0]}`: ask for the `jobs_worker` fixture (job "
                    "processes, a worker) or a server fixture (lab_server, serves), which marks the test for the "
                    "full suite")


def wait_until(predicate, timeout: float = 60, what: str = "the condition"):
    """Poll `predicate` until it returns something true (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _not_started_in_fast_tier()
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen in {timeout} s")


def stop_worker_mid_job(s, job_id: int, step: int, what: str, timeout: float = 120) -> None:
    """Run a worker until job `job_id` reports progress `step`, then stop it as Ctrl-C would: the job goes back to
    the queue."""
    import threading

    from jobs.worker import Worker
    from lab import jobstore

    worker = Worker(s, say=lambda m: None)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        wait_until(lambda: jobstore.get(s, job_id).step >= step, timeout, what)
        worker.stop.set()
        thread.join(timeout)
    finally:
        worker.stop.set()


def wait_for_status(s, job_id: int, statuses=TERMINAL_STATES, timeout: float = 120) -> str:
    from lab import jobstore

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _not_started_in_fast_tier()
        status = jobstore.get(s, job_id).status
        if status in statuses:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {status} after {timeout} s")


class LabServer:
    """`lab serve` in a child process, as a user starts it."""

    def __init__(self, workspace: Path, workers: int = 1, extra: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.workspace = workspace
        self.workers = workers
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log = workspace.parent / f"serve-{self.port}.log"

    def start(self, timeout: float = 90) -> LabServer:
        import urllib.error
        import urllib.request

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lab.cli", "serve", "--port", str(self.port), "--workers", str(self.workers),
             *self.extra],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lab serve exited:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError:
                return self  # it answers (e.g. 401 behind a password)
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"lab serve did not answer in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        return self.proc.returncode if self.proc else 0


@pytest.fixture
def lab_server(ws):
    server = LabServer(ws.workspace)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the session (Debian's binaries; `make test` installs them)."""
    from lab.pgserver import throwaway_server

    with throwaway_server() as url:
        yield url


_databases = iter(range(1, 1_000_000))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_ws(request, ws, monkeypatch):
    """The same settings as `ws`, on SQLite or on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return ws
    from lab.pgserver import create_database

    url = create_database(request.getfixturevalue("postgres_server"), f"lab_{os.getpid()}_{next(_databases)}")
    monkeypatch.setenv("LAB_DATABASE_URL", url)
    return settings.load()
