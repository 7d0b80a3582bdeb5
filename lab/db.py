"""Engine factory and sessions. SQLite gets WAL, a busy timeout and foreign keys; writes take the lock up front.

Write transactions on SQLite start with `BEGIN IMMEDIATE`, so a transaction that reads and then writes never
fails half-way with "database is locked": it waits (busy timeout) for the write lock before it starts.
Read-only sessions (`read_session`) use a plain deferred `BEGIN`, which in WAL mode never blocks writers.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session

from lab.errors import LabError
from lab.settings import Settings

BUSY_TIMEOUT_MS = 30_000
_engines: dict[str, Engine] = {}
_ready: set[str] = set()
_lock = threading.Lock()


def _sqlite_engine(url: str) -> Engine:
    path = make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _wal(cur)
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        readonly = conn.get_execution_options().get("lab_readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def _wal(cur) -> None:
    """Turn on WAL (it stays on in the file). Switching needs the file to itself, and SQLite answers "locked" at once,
    without its busy handler, while another process opening a new database is doing the same: wait and try again."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def engine_for(settings: Settings) -> Engine:
    """The process-wide engine for the settings' database, created on first use and migrated to the newest schema."""
    url = settings.database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            try:
                if url.startswith("sqlite"):
                    engine = _sqlite_engine(url)
                else:
                    engine = create_engine(url, pool_pre_ping=True)
            except Exception as exc:  # bad URL, missing driver
                shown = make_url(url).render_as_string(hide_password=True) if "://" in url else url
                raise LabError(f"cannot open database {shown!r}: {str(exc).replace(url, shown)}") from None
            _engines[url] = engine
        if url not in _ready:
            from lab.migrate import upgrade

            try:
                upgrade(engine)
            except OperationalError:
                raise  # locked or unreachable: the callers wait and retry
            except DatabaseError as exc:  # not a database, or a damaged one: say so and touch nothing
                shown = make_url(url).render_as_string(hide_password=True) if "://" in url else url
                raise LabError(f"the database {shown} cannot be read: {unavailable_reason(exc)}; the lab changed "
                               "nothing in it",
                               "restore it from a backup, or move it aside (the lab then starts a new, empty one; "
                               "the workspace's files stay)") from None
            _ready.add(url)
    return engine


def dispose_all() -> None:
    """Close every pooled connection (tests, and before a process hands its database to another)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _ready.clear()


@contextmanager
def session(settings: Settings) -> Iterator[Session]:
    """A write transaction: committed when the block ends, rolled back on an exception."""
    with Session(engine_for(settings), expire_on_commit=False) as s, s.begin():
        yield s


@contextmanager
def read_session(settings: Settings) -> Iterator[Session]:
    """A read-only transaction that never takes the write lock."""
    engine = engine_for(settings).execution_options(lab_readonly=True)
    with Session(engine, expire_on_commit=False) as s, s.begin():
        yield s


def plain_rows(s: Session, stmt) -> list[tuple]:
    """Every row of a Core select as the driver's plain tuples, without SQLAlchemy's per-row processing (a third of
    the time of reading a long run): only for columns that need no conversion (numbers and text, not times)."""
    result = s.connection().execute(stmt)
    try:
        return result.cursor.fetchall()
    finally:
        result.close()


def retrying(fn, *args, patience_s: float = 7.5, stop: threading.Event | None = None, say=None, **kwargs):
    """Call fn(*args, **kwargs); while the database is locked past its busy timeout or unreachable (an
    OperationalError: the transaction was rolled back), wait 0.5 s, doubling up to 30 s, and call again. Gives up
    (raises) after `patience_s` in all, or at once when `stop` is set. say: told of each wait."""
    import time

    deadline = time.monotonic() + patience_s
    delay = 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except OperationalError as exc:
            if (stop is not None and stop.is_set()) or time.monotonic() + delay > deadline:
                raise
            if say is not None:
                say(f"the database cannot be used ({unavailable_reason(exc)}); retrying in {delay:.1f} s")
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 2, 30.0)


def unavailable_reason(exc: Exception) -> str:
    """The driver's first line for a database that is locked or away (an OperationalError), kept short."""
    return str(getattr(exc, "orig", exc)).splitlines()[0][:200]


def is_sqlite(settings: Settings) -> bool:
    return settings.database_url.startswith("sqlite")


def ping(settings: Settings) -> None:
    with read_session(settings) as s:
        s.execute(text("SELECT 1"))
