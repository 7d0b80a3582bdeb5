"""Every path rule of the workspace: where datasets, models and runs live, and which names are allowed."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from lab.errors import LabError
from lab.settings import Settings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str) -> str:
    """A name that is safe as a folder name and in a URL: letters, digits, '.', '_', '-'; at most 64 characters."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise LabError(
            f"invalid {what} name {name!r}",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/' or '..')",
        )
    return name


def datasets_dir(settings: Settings) -> Path:
    return settings.workspace / "datasets"


def models_dir(settings: Settings) -> Path:
    return settings.workspace / "models"


def experiment_dir(settings: Settings, experiment: str) -> Path:
    return settings.workspace / "experiments" / check_name(experiment, "experiment")


def new_run_dir(settings: Settings, experiment: str, job_id: int, plugin: str) -> Path:
    """A fresh folder for a run; never one that holds another run's files (e.g. after the database was reset)."""
    runs = experiment_dir(settings, experiment) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    base = f"{job_id}-{plugin}"
    for n in range(1, 1000):
        candidate = runs / (base if n == 1 else f"{base}.{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise LabError(f"no free run folder for job {job_id} under {runs}")


def inside(root: Path, path: Path) -> bool:
    """True when `path` (after resolving links) lies inside `root`."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


STAGING = ".staging"  # beside the published folders: one build folder and one lock file per name


def _try_lock(area: Path, name: str) -> int | None:
    """The open, exclusively locked lock file of `name` in the staging area; None while another process holds it.
    Closing the descriptor releases the lock."""
    fd = os.open(area / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _sweep(area: Path, keep: str) -> None:
    """Remove build folders that interrupted commands left behind (their lock is free: no one is building)."""
    for item in area.iterdir():
        if item.suffix == ".lock" or item.name == keep:
            continue
        fd = _try_lock(area, item.name)
        if fd is None:
            continue  # another command is building it right now
        try:
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextmanager
def staging(final: Path, what: str = "folder", registered: Callable[[], bool] | None = None):
    """Build a folder in `<parent>/.staging/<name>` and publish it at `final` with one rename when the block
    succeeds; on an exception (Ctrl-C included) the build folder is removed.

    One command at a time builds a name (a second one is refused at once). What an interrupted command left is
    repaired here: its build folder is removed, and a published folder that nothing points at
    (`registered()` is False: the command died between the rename and writing its row) is removed and built
    again. Without `registered`, an existing `final` is always refused.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    area = final.parent / STAGING
    area.mkdir(exist_ok=True)
    fd = _try_lock(area, final.name)
    if fd is None:
        raise LabError(f"{what} {final.name} is being created by another command right now",
                       "wait for it to finish, or pick another name")
    try:
        _sweep(area, keep=final.name)
        if final.exists() or final.is_symlink():
            if registered is None or registered():
                raise LabError(f"{final} already exists")
            shutil.rmtree(final) if final.is_dir() and not final.is_symlink() else final.unlink()
        tmp = area / final.name
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(fd)


LOG_TAIL_LINES = 40


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log as a person reads them: each progress bar redrawn with carriage returns shown in its
    final state, terminal colour codes removed."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    data = ANSI.sub("", data)
    rows = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in data.split("\n")]  # not splitlines: it splits at \r
    if rows and rows[-1] == "":
        rows.pop()
    return "\n".join(rows[-lines:])


ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*(\x07|\x1b\\)|[@-Z\\-_])")  # CSI, OSC and 2-byte codes


def checkpoint_step(folder: Path) -> int:
    """The step of a Trainer checkpoint folder (checkpoint-<step>); -1 when the name carries none."""
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete Trainer checkpoint (trainer_state.json is written last) in `folder`."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file() and checkpoint_step(p) >= 0]
    return max(done, key=checkpoint_step, default=None)
