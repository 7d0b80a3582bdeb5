"""Why a job failed, in the user's terms: a kind, a one-line reason and the next step to take.

The job process diagnoses its own exceptions here (`diagnose`) and stores them while it runs; what the process cannot
say itself (a signal, a lost lease, an exit without output, Slurm's end states) and which of the two stands is
decided in lab.outcome. The job keeps them (`failure`, `error`, `next_step`), shown first in the run view,
`lab jobs show`, the API and the Jobs page.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from lab.dependencies import DependencyChanged, describe
from lab.errors import DataError, Diverged, LabError

KINDS = {
    "oom": "out of memory",
    "diverged": "the loss or the weights became NaN or infinite",
    "data": "the data cannot train",
    "disk_full": "disk full",
    "killed": "killed from outside",
    "timeout": "ran past its time limit",
    "lost": "lost its worker",
    "dependency": "a package is missing",
    "no_output": "wrote no output",
    "plugin_error": "the plugin failed",
    "cluster": "the cluster refused the job",
}


@dataclass(frozen=True)
class Failure:
    kind: str
    reason: str
    next_step: str

    def __post_init__(self):
        assert self.kind in KINDS, self.kind


OOM_STEP = ("lower batch_size or max_length (or raise grad_accum to keep the effective batch), train a LoRA "
            "adapter instead of every weight, or give the job more memory")
TRACEBACK_STEP = "the traceback is at the end of the run's log.txt"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 10:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _disk_full(folders: list[Path]) -> bool:
    """True when a folder the job writes to has (almost) no room left."""
    for folder in folders:
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            continue
        if usage.free < 1 << 20 or usage.free < usage.total * 0.001:
            return True
    return False


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "can't allocate memory", "out of memory", "Cannot allocate memory", "CUDA error: out of memory"))


def diagnose(exc: BaseException, folders: list[Path] = ()) -> Failure:
    """The failure an exception raised inside a job means. folders: where the job writes (to recognise a full
    disk, which torch reports only as a failed or short write)."""
    chain = _chain(exc)
    text = f"{type(exc).__name__}: {exc}"[:600]
    for e in chain:
        if isinstance(e, Diverged):
            return Failure("diverged", str(e), (e.hint or "lower the learning rate (or raise warmup_steps, or set "
                           "max_grad_norm)") + "; earlier checkpoints are kept and nothing was registered")
    for e in chain:
        if isinstance(e, DataError):
            return Failure("data", e.message, e.hint or "fix the dataset or the length limits and launch again")
    for e in chain:
        if isinstance(e, DependencyChanged):
            return Failure("dependency", e.message, e.hint or TRACEBACK_STEP)
    if any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for e in chain) \
            or "No space left on device" in text \
            or (isinstance(exc, (OSError, RuntimeError)) and _disk_full(list(folders))):
        return Failure("disk_full", f"the disk is full (no space left on device) while the job was writing ({text})",
                       "free some space (old runs' checkpoints/ folders are the largest) and run the job again; "
                       "earlier checkpoints are kept")
    for e in chain:
        if _is_oom(e):
            return Failure("oom", f"the job ran out of memory ({type(e).__name__}: {str(e)[:300]})", OOM_STEP)
    for e in chain:
        if isinstance(e, ModuleNotFoundError) and e.name:
            package = e.name.split(".")[0]
            return Failure("dependency", f"the Python module `{e.name}` is not installed",
                           f"install it into the lab's environment (`.venv/bin/pip install {package}`, or "
                           "`make install` for the lab's own packages) and run the job again")
        if isinstance(e, ImportError):
            return Failure("dependency", f"a package cannot be imported: {str(e)[:400]}",
                           "check the installed versions (`make install` puts back the lab's pinned ones)")
    if isinstance(exc, LabError):
        return Failure("plugin_error", exc.message, exc.hint or TRACEBACK_STEP)
    return Failure("plugin_error", describe(exc).removeprefix("unexpected ")[:600], TRACEBACK_STEP)


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has killed in this process's cgroup (v2 memory.events
    or v1 memory.oom_control); None when the count cannot be read. The worker compares it before and after a job
    that died of SIGKILL."""
    try:
        groups = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines())
    except (OSError, ValueError):
        return None
    places = []
    if "" in groups:
        places.append(Path("/sys/fs/cgroup") / groups[""].lstrip("/") / "memory.events")
    if "memory" in groups:
        places.append(Path("/sys/fs/cgroup/memory") / groups["memory"].lstrip("/") / "memory.oom_control")
        places.append(Path("/sys/fs/cgroup/memory/memory.oom_control"))
    for place in places:
        try:
            for row in place.read_text().splitlines():
                key, _, value = row.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None
