"""Commands killed at their worst moment (SIGKILL, and Ctrl-C) leave nothing that stops the same command from
working when it is run again: builds happen in a staging folder, publish with one rename, and a rerun clears what
an interrupted one left."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import lab_cli, write_jsonl

from lab import datasets, jobstore, registry, runs

pytestmark = pytest.mark.interrupts  # each kills a command mid-work and runs it again: the full suite only


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child, before it runs Python: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt as under a terminal, even when the tests run where it is ignored (a shell's background job
    ignores SIGINT, and every process it starts inherits that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lab.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_in_a_terminal)


def _kill_when(proc: subprocess.Popen, ready, sig: int, timeout: float = 120) -> None:
    """Send `sig` the moment `ready()` holds (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the command ended before the moment came: {proc.communicate()}"
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.001)
    proc.send_signal(sig)
    if sig != signal.SIGSTOP:
        proc.wait(60)


def _leftovers(folder: Path) -> list[str]:
    area = folder / ".staging"
    return sorted(p.name for p in area.iterdir() if p.suffix != ".lock") if area.is_dir() else []


def _nonempty_dir(path: Path):
    return lambda: path.is_dir() and any(path.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_create_tiny_killed_mid_build_then_run_again(ws, sig):
    models = ws.workspace / "models"
    proc = _start("models", "create-tiny", "t1")
    _kill_when(proc, _nonempty_dir(models / ".staging" / "t1"), sig)
    assert not (models / "t1").exists()
    assert "Traceback" not in proc.stderr.read()
    lab_cli("models", "create-tiny", "t1", check=True)
    assert [m["name"] for m in registry.list_all(ws)] == ["t1"]
    assert _leftovers(models) == []
    assert lab_cli("models", "create-tiny", "t1").returncode == 2, "a finished model is still refused"


def test_ctrl_c_between_the_rename_and_the_commit_takes_the_folder_back_out(ws, monkeypatch):
    """The moment a killed build can race to under load: the folder is in place and the row not yet committed."""
    import contextlib

    real = registry.session

    @contextlib.contextmanager
    def interrupted_before_the_commit(settings):
        with real(settings) as s:
            yield s
            raise KeyboardInterrupt

    monkeypatch.setattr(registry, "session", interrupted_before_the_commit)
    with pytest.raises(KeyboardInterrupt):
        registry.create_tiny(ws, "t9")
    assert not (ws.workspace / "models" / "t9").exists() and registry.list_all(ws) == []
    monkeypatch.undo()
    assert registry.create_tiny(ws, "t9")["name"] == "t9"


def test_a_published_folder_without_its_row_is_rebuilt(ws):
    """The command died between the rename and the commit: the folder is there, the registry knows nothing."""
    stray = ws.workspace / "models" / "t2"
    stray.mkdir(parents=True)
    (stray / "half.bin").write_bytes(b"\0" * 10)
    lab_cli("models", "create-tiny", "t2", check=True)
    info = registry.info(ws, "t2")
    assert not (stray / "half.bin").exists() and (stray / "config.json").is_file()
    assert info["fingerprint"] == registry.fingerprint_folder(stray)


def test_two_create_tiny_at_once_one_wins_the_other_is_told(ws):
    first = _start("models", "create-tiny", "twin")
    _kill_when(first, _nonempty_dir(ws.workspace / "models" / ".staging" / "twin"), signal.SIGSTOP)
    try:
        second = lab_cli("models", "create-tiny", "twin")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert "being created by another command" in second.stderr and "Traceback" not in second.stderr
    first.wait(120)
    assert first.returncode == 0, first.stderr.read()
    assert [m["name"] for m in registry.list_all(ws)] == ["twin"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_datasets_add_killed_while_storing_then_run_again(ws, tmp_path, sig):
    rows = [{"text": "x" * 2000 + str(i)} for i in range(15_000)]  # about 30 MB: a window to hit
    big = write_jsonl(tmp_path / "big.jsonl", rows)
    folder = ws.workspace / "datasets"
    proc = _start("datasets", "add", "big", str(big))
    _kill_when(proc, lambda: (folder / ".staging" / "big").is_dir(), sig)
    assert not (folder / "big").exists()
    assert datasets.list_all(ws) == []
    lab_cli("datasets", "add", "big", str(big), check=True)
    assert datasets.info(ws, "big")["rows"] == 15_000
    assert _leftovers(folder) == []


def test_a_dataset_folder_without_its_row_is_replaced(ws, tmp_path):
    stray = ws.workspace / "datasets" / "notes"
    stray.mkdir(parents=True)
    (stray / "data.jsonl").write_text("half a line")
    lab_cli("datasets", "add", "notes", str(write_jsonl(tmp_path / "n.jsonl", [{"text": "a"}])), check=True)
    assert (stray / "data.jsonl").read_text() == json.dumps({"text": "a"}) + "\n"


def test_a_stale_staging_folder_of_another_name_is_swept(ws, tmp_path):
    area = ws.workspace / "datasets" / ".staging"
    (area / "killed-upload").mkdir(parents=True)
    (area / "killed-upload" / "data.jsonl").write_text("partial")
    lab_cli("datasets", "add", "other", str(write_jsonl(tmp_path / "o.jsonl", [{"text": "a"}])), check=True)
    assert _leftovers(ws.workspace / "datasets") == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_export_killed_while_archiving_then_run_again(ws, sig):
    """The export is a job run by a worker inside the command (none other is running): killing the command stops
    the job with it (SIGKILL: its job process follows its worker within a second; Ctrl-C: the command cancels it).
    The export is then published whole or not at all, and running the command again ends with a whole export."""
    lab_cli("models", "create-tiny", "src", "--hidden", "256", "--layers", "4", check=True)  # a few MB to pack
    exports = ws.workspace / "exports"
    partial = exports / ".staging" / "src" / ".archive.partial"
    proc = _start("models", "export", "src")
    _kill_when(proc, lambda: partial.is_file() and partial.stat().st_size > 0, sig)
    (job,) = runs.list_jobs(ws)
    if sig == signal.SIGINT:
        assert "was cancelled" in proc.stderr.read() and runs.get_job(ws, job["id"])["status"] == "cancelled"
    deadline = time.monotonic() + 30  # the job process follows its killed worker
    while time.monotonic() < deadline and _runner_alive(ws, job["id"]):
        time.sleep(0.1)
    assert not _runner_alive(ws, job["id"]), "the job process outlived the command that ran it"
    published = (exports / "src").exists()
    again = lab_cli("models", "export", "src")
    if published:  # it had finished before the kill reached it: whole, and a second export is refused
        assert again.returncode == 2 and "already exists" in again.stderr
    else:
        assert again.returncode == 0, again.stderr
    with tarfile.open(exports / "src.tar.gz") as tar:
        names = tar.getnames()
    assert "src/README.md" in names and "src/config.json" in names
    assert not any(n.endswith(".partial") for n in names)
    assert _leftovers(exports) == []
    assert lab_cli("models", "export", "src").returncode == 2, "a finished export is still refused"


def _runner_alive(ws, job_id: int) -> bool:
    """The job's process (its pid as recorded when it started) still runs the job."""
    pid = jobstore.get(ws, job_id).pid
    try:
        return pid is not None and b"jobs.runner" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.slow
def test_setup_killed_during_the_starter_import_then_run_again(ws):
    """`make run` calls `lab setup`: a first start interrupted while the starter model is being imported must not
    leave the next start stuck on "already exists"."""
    models = ws.workspace / "models"
    proc = _start("setup")
    _kill_when(proc, _nonempty_dir(models / ".staging" / registry.STARTER_NAME), signal.SIGKILL, timeout=300)
    lab_cli("setup", check=True, timeout=600)
    assert registry.STARTER_NAME in [m["name"] for m in registry.list_all(ws)]
    assert _leftovers(models) == []
