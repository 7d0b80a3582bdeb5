"""What the tabs share: the settings, the components other tabs reach into, and the edge where errors become
messages (a LabError is a readable toast; anything else too, with the traceback kept in the server log)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from sqlalchemy.exc import OperationalError

from lab.db import retrying, unavailable_reason
from lab.dependencies import describe, internal
from lab.errors import LabError, from_known_error
from lab.settings import Settings
from lab.ui.html import text as html_text
from lab.workspace import inside

log = logging.getLogger("lab.ui")
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class UI:
    settings: Settings
    c: dict[str, Any] = field(default_factory=dict)  # components other tabs wire to, by name
    refreshers: list[tuple[Callable, list, list]] = field(default_factory=list)  # see on_refresh
    tickers: list[tuple[Callable, list, list]] = field(default_factory=list)  # see on_tick
    train: Any = None  # the Train page (lab.ui.tabs.train.TrainPage): Jobs, Rank and the Playground fill it

    def __getitem__(self, name: str):
        return self.c[name]

    def __setitem__(self, name: str, component) -> None:
        self.c[name] = component

    def on_refresh(self, fn: Callable[[dict], dict], outputs: list, inputs: list = ()) -> None:
        """What a tab shows afresh from the database when the page loads and whenever a tab is opened:
        fn({component: value} of `inputs`) -> {component: update} for `outputs` (lab.ui.app wires them all)."""
        self.refreshers.append((fn, list(inputs), list(outputs)))

    def on_tick(self, fn: Callable[[dict], dict], outputs: list, inputs: list = ()) -> None:
        """What a tab follows live, every few seconds: fn({component: value} of `inputs`) -> {component: update}
        for those of `outputs` that changed. lab.ui.app wires them all into one timer event: the browser's cost of
        an event grows with the page's components, not with the event's outputs, so one event beats several."""
        self.tickers.append((fn, list(inputs), list(outputs)))


DB_PATIENCE_S = 8.0  # how long a page action waits for a database that is locked past its busy timeout or away


def user_errors(fn, html: bool = True):
    """Run `fn`; a LabError becomes a gr.Error with its message (and hint), never a traceback.
    html: line breaks as <br> for the page's toasts; plain text for API clients."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return retrying(fn, *args, patience_s=DB_PATIENCE_S, say=lambda m: log.warning("%s: %s", fn.__name__, m),
                            **kwargs)
        except OperationalError as exc:
            message = (f"the database is busy or unreachable ({unavailable_reason(exc)}); nothing was changed: "
                       "try again")
            raise gr.Error(html_text(message) if html else message, print_exception=False) from None
        except LabError as exc:
            text = html_text(str(exc)) if html else str(exc)
            raise gr.Error(text, print_exception=False) from None
        except gr.Error:
            raise
        except Exception as exc:
            known = from_known_error(exc)
            if known is not None:
                raise gr.Error(html_text(str(known)) if html else str(known), print_exception=False) from None
            log.exception("unexpected error in %s", fn.__name__)
            message = describe(exc)
            raise gr.Error(html_text(message) if html else message, print_exception=False) from None

    return wrapper


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def uploaded(file) -> Path:
    """The path of a file that arrived through an upload to this server. Anything else (a plain path, a dict
    naming a server file) is refused: reading the server's own files is a command-line matter."""
    with internal("gradio-upload-folder"):
        from gradio.utils import get_upload_folder

    if not file:
        raise LabError("choose a file to upload")
    path = file.get("path") if isinstance(file, dict) else getattr(file, "path", file)
    if not isinstance(path, str):
        raise LabError("the file must be uploaded with the request (gradio_client: handle_file(PATH))")
    if not inside(Path(get_upload_folder()), Path(path)) or not Path(path).is_file():
        raise LabError("only a file uploaded with the request can be imported here, not a path on the server",
                       "upload it (gradio_client: handle_file(PATH)), or on the server run `lab datasets add NAME "
                       "PATH`")
    return Path(path).resolve()
