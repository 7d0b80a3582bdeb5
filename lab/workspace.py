"""Every path rule of the workspace: where datasets, models and runs live, and which names are allowed."""

from __future__ import annotations

import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lab.errors import LabError
from lab.settings import Settings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str) -> str:
    """A name that is safe as a folder name and in a URL: letters, digits, '.', '_', '-'; at most 64 characters."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
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


@contextmanager
def staging(final: Path):
    """Build a folder next to its final place and move it there only when the block succeeds.

    Nothing half-written is ever left at `final`; on an exception the staging folder is removed.
    """
    if final.exists():
        raise LabError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".staging-{final.name}-", dir=final.parent))
    try:
        yield tmp
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
