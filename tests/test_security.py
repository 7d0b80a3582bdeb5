"""Security: no shell, plugin code only from importable modules, secrets given to jobs but never stored or logged,
names and uploads kept inside the workspace."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT, lab_cli
from sqlalchemy import update

from jobs.supervise import Supervision
from jobs.worker import Worker
from lab import db, jobstore, runs, settings
from lab.errors import LabError
from lab.tables import Base, Job

SECRET = "wandb-key-0123456789abcdef"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_no_user_string_reaches_a_shell():
    """Subprocesses get argument lists: no shell=True, os.system or os.popen anywhere in the lab's code."""
    found = []
    for folder in ("lab", "jobs", "plugins"):
        for path in (ROOT / folder).rglob("*.py"):
            for call in _calls(ast.parse(path.read_text())):
                name = ast.unparse(call.func)
                if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                    found.append(f"{path}:{call.lineno} {name}")
                if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in call.keywords):
                    found.append(f"{path}:{call.lineno} shell=")
    assert found == []


@pytest.mark.parametrize("value", ["/tmp/evil.py", "../plugins/x", "workspace/datasets/x/original.py", "a-b"])
def test_extra_plugins_are_module_names_never_file_paths(ws, monkeypatch, value):
    monkeypatch.setenv("LAB_EXTRA_PLUGINS", value)
    with pytest.raises(LabError, match="importable module names"):
        settings.load()


def test_secrets_reach_the_job_but_not_its_log_record_or_database(ws, tmp_path, monkeypatch, jobs_worker):
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"# keys for the jobs\nWANDB_API_KEY={SECRET}\nexport HF_TOKEN='hf_abcdefgh'\n")
    secrets.chmod(0o600)
    monkeypatch.setenv("LAB_SECRETS_FILE", str(secrets))
    s = settings.load()
    job_id = runs.submit(s, "leaky")
    jobs_worker(s).serve(once=True)
    job = runs.get_job(s, job_id)
    run_dir = Path(job["run_dir"])
    assert job["status"] == "completed"
    assert (run_dir / "output" / "seen.txt").read_text() == "WANDB_API_KEY,HF_TOKEN", "the job was given both"
    assert "my key is [secret]" in (run_dir / "log.txt").read_text()
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    with db.read_session(s) as session:
        for table in Base.metadata.sorted_tables:
            assert SECRET not in repr(session.execute(table.select()).all())


def test_a_secrets_file_others_can_read_is_refused(ws, tmp_path, monkeypatch, jobs_worker):
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"WANDB_API_KEY={SECRET}\n")
    secrets.chmod(0o644)
    monkeypatch.setenv("LAB_SECRETS_FILE", str(secrets))
    done = lab_cli("worker", "--once")
    assert done.returncode == 2 and "can be read by other users (mode 644)" in done.stderr
    assert "chmod 600" in done.stderr and SECRET not in done.stderr + done.stdout
    secrets.chmod(0o600)
    secrets.write_text("not a pair\n")
    with pytest.raises(LabError, match="line 1: expected KEY=VALUE"):
        Worker(settings.load(), say=lambda m: None)


def test_a_job_cannot_import_code_from_its_run_folder(ws, tmp_path, jobs_worker):
    """The job process runs in its run folder, which is kept off its import path (PYTHONSAFEPATH): a file there
    named like a library (here pydantic.py) is not imported in the library's place."""
    job_id = runs.submit(ws, "instant")
    folder = tmp_path / "run-folder"
    folder.mkdir()
    (folder / "pydantic.py").write_text("raise SystemExit('imported from the run folder')\n")
    with db.session(ws) as session:  # the folder a retried job runs in again
        session.execute(update(Job).where(Job.id == job_id).values(run_dir=str(folder)))
    jobs_worker().serve(once=True)
    assert jobstore.get(ws, job_id).status == "completed", (folder / "log.txt").read_text()


def test_an_uploaded_file_name_never_becomes_a_path(ws, tmp_path):
    """Whatever the uploaded file is called, it is stored as original.<ext> in its dataset's own folder."""
    from lab import datasets

    odd = tmp_path / "..;rm -rf ~ $(touch pwned) ..jsonl"
    odd.write_text('{"text": "hello"}\n')
    before = {p for p in ws.workspace.rglob("*")} if ws.workspace.exists() else set()
    datasets.add(ws, "odd", odd)
    created = {p.relative_to(ws.workspace).as_posix() for p in ws.workspace.rglob("*")} - {
        p.relative_to(ws.workspace).as_posix() for p in before}
    created = {c for c in created if not c.startswith("lab.db")}
    assert created == {"datasets", "datasets/odd", "datasets/odd/data.jsonl", "datasets/odd/original.jsonl",
                       "datasets/odd/dataset.json", "datasets/.staging", "datasets/.staging/odd.lock"}
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_a_secret_split_across_two_reads_is_still_masked(ws, tmp_path, monkeypatch):
    import subprocess
    import sys

    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"WANDB_API_KEY={SECRET}\n")
    secrets.chmod(0o600)
    monkeypatch.setenv("LAB_SECRETS_FILE", str(secrets))
    worker = Worker(settings.load(), say=lambda m: None)
    half = len(SECRET) // 2
    code = (f"import sys, time; sys.stdout.write('key {SECRET[:half]}'); sys.stdout.flush(); time.sleep(0.3); "
            f"sys.stdout.write('{SECRET[half:]} done\\nnext line\\n'); sys.stdout.flush()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    log = tmp_path / "log.txt"
    with open(log, "wb") as out:
        Supervision(worker, job=None)._tee(proc, out)  # the job itself plays no part in the tee
    proc.wait()
    assert log.read_text() == "key [secret] done\nnext line\n"


def test_every_secret_is_masked_wherever_text_leaves_a_job(ws, tmp_path, monkeypatch, jobs_worker):
    """Short secrets too, in the log, the error stored in the database, job.json, and the API's answers."""
    short = "k3y!x"
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"WANDB_API_KEY={short}\nHF_TOKEN={SECRET}\n")
    secrets.chmod(0o600)
    monkeypatch.setenv("LAB_SECRETS_FILE", str(secrets))
    s = settings.load()
    job_id = runs.submit(s, "leaky", params={"note": f"token {SECRET} and {short}", "fail": True})
    jobs_worker(s).serve(once=True)
    job = runs.get_job(s, job_id)
    assert job["status"] == "failed"
    assert "the hub refused token [secret]" in job["error"]
    run_dir = Path(job["run_dir"])
    assert "my key is [secret]" in (run_dir / "log.txt").read_text()
    assert "token [secret] and [secret]" in (run_dir / "job.json").read_text()
    for text in [repr(job), *(p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())]:
        assert SECRET not in text and short not in text
    stored = jobstore.get(s, job_id)  # the parameters keep what the user typed: the job needs it
    assert "the hub refused token [secret]" in stored.error
    assert SECRET not in stored.error + (stored.log_tail or "") and short not in stored.error + (stored.log_tail or "")


def test_a_secret_too_short_to_mask_is_refused(ws, tmp_path, monkeypatch):
    secrets = tmp_path / "secrets.env"
    secrets.write_text("HF_TOKEN=ab\n")
    secrets.chmod(0o600)
    monkeypatch.setenv("LAB_SECRETS_FILE", str(secrets))
    with pytest.raises(LabError, match="HF_TOKEN has only 2 characters") as refused:
        settings.read_secrets(settings.load())
    assert "ab" not in str(refused.value).replace("masking", "").replace("characters", "")
