"""What the tabs share: the settings, the components other tabs reach into, and the edge where errors become
messages (a LabError is a readable toast; anything else too, with the traceback kept in the server log)."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
from sqlalchemy.exc import OperationalError

from lab.db import unavailable_reason
from lab.errors import LabError
from lab.settings import Settings

log = logging.getLogger("lab.ui")
TERMINAL = ("completed", "failed", "cancelled")
STATUS_COLOURS = {"queued": "#6b7280", "running": "#2563eb", "completed": "#059669", "failed": "#dc2626",
                  "cancelled": "#d97706"}


@dataclass
class UI:
    settings: Settings
    c: dict[str, Any] = field(default_factory=dict)  # components other tabs wire to, by name

    def __getitem__(self, name: str):
        return self.c[name]

    def __setitem__(self, name: str, component) -> None:
        self.c[name] = component


DB_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)  # back-off when the database is locked past its busy timeout or away


def _with_db_retries(fn, *args, **kwargs):
    """Call fn; on a database OperationalError (its transaction was rolled back) wait and call again."""
    for delay in DB_RETRY_DELAYS:
        try:
            return fn(*args, **kwargs)
        except OperationalError as exc:
            log.warning("database busy or unreachable in %s (%s); retrying in %.1f s", fn.__name__,
                        unavailable_reason(exc), delay)
            time.sleep(delay)
    return fn(*args, **kwargs)


def user_errors(fn, html: bool = True):
    """Run `fn`; a LabError becomes a gr.Error with its message (and hint), never a traceback.
    html: line breaks as <br> for the page's toasts; plain text for API clients."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return _with_db_retries(fn, *args, **kwargs)
        except OperationalError as exc:
            raise gr.Error(f"the database is busy or unreachable ({unavailable_reason(exc)}); nothing was changed: "
                           "try again",
                           print_exception=False) from None
        except LabError as exc:
            text = str(exc).replace("\n", "<br>") if html else str(exc)
            raise gr.Error(text, print_exception=False) from None
        except gr.Error:
            raise
        except Exception as exc:
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"unexpected {type(exc).__name__}: {exc}", print_exception=False) from None

    return wrapper


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def badge(status: str) -> str:
    return (f'<span class="badge" style="background:{STATUS_COLOURS.get(status, "#6b7280")}">'
            f"{status}</span>")


def error_box(message: str) -> str:
    from html import escape

    return f'<div class="error-box">{escape(message).replace(chr(10), "<br>")}</div>'


def ok_box(message: str) -> str:
    from html import escape

    return f'<div class="ok-box">{escape(message).replace(chr(10), "<br>")}</div>'
