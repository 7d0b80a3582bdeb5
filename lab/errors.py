"""Errors meant for users: a message, and where useful a hint. The CLI and the UI turn them into one line each."""

from __future__ import annotations


class LabError(Exception):
    """Something the user can fix; `message` says what, `hint` how."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


class ValidationError(LabError):
    """Several problems found at once (e.g. bad rows of a dataset); the message lists the first ones."""

    MAX_SHOWN = 20

    def __init__(self, summary: str, problems: list[str], hint: str | None = None):
        shown = problems[: self.MAX_SHOWN]
        lines = [summary, *(f"  - {p}" for p in shown)]
        if len(problems) > len(shown):
            lines.append(f"  ... and {len(problems) - len(shown)} more")
        super().__init__("\n".join(lines), hint)
        self.summary = summary
        self.problems = problems


class JobCancelled(Exception):
    """Raised inside a job's process when the user cancelled it; the runner exits with CANCELLED_EXIT."""


CANCELLED_EXIT = 3
INTERRUPTED_EXIT = 4  # stopped by a signal at a step boundary, after writing a checkpoint to resume from


class JobInterrupted(Exception):
    """Raised inside a job's process when it was asked to stop (SIGTERM) and not cancelled: the runner exits with
    INTERRUPTED_EXIT, and the job goes back to the queue to resume from the checkpoint it just wrote."""


class DataError(LabError):
    """The job's data cannot train: every row truncated away, too few prompts, one label. Diagnosed as `data`."""


class Diverged(Exception):
    """A training value or saved weight became NaN or infinite. Diagnosed as `diverged`; `hint` replaces the usual
    next step (lower the learning rate) where the cause is known to be another."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def from_os_error(exc: BaseException) -> LabError | None:
    """A full disk, a read-only or forbidden place, in one sentence with a next step; None for other errors."""
    import errno

    err = getattr(exc, "errno", None)
    where = getattr(exc, "filename", None)
    at = f" ({where})" if where else ""
    if err in (errno.ENOSPC, errno.EDQUOT):
        return LabError(f"the disk is full{at}: nothing was stored", "free some space and run the command again")
    if err == errno.EROFS:
        return LabError(f"the workspace is on a read-only file system{at}: nothing was stored",
                        "use a writable workspace (--workspace DIR or LAB_WORKSPACE)")
    if err in (errno.EACCES, errno.EPERM):
        return LabError(f"permission denied{at}: nothing was stored",
                        "give this user write access to the workspace, or use another (--workspace DIR)")
    return None


def from_known_error(exc: BaseException) -> LabError | None:
    """from_os_error's, and a number too large for the database (a job id or a priority typed as 10**20): one
    sentence instead of the driver's; None for other errors."""
    known = from_os_error(exc)
    if known is not None:
        return known
    text = str(getattr(exc, "orig", None) or exc)
    too_large = (isinstance(exc, OverflowError) and "SQLite INTEGER" in text) or (
        type(exc).__name__ == "DataError" and "out of range" in text.lower())
    if too_large:
        return LabError("a number is too large for the database: nothing was changed",
                        "check the number; `lab jobs list` shows the job ids")
    return None
