"""The schema comes from alembic and matches the tables; several processes can open a new database at once."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from lab.db import engine_for
from lab.migrate import current_revision, head_revision
from lab.tables import Base


def test_migrations_build_exactly_the_declared_schema(ws):
    engine = engine_for(ws)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("metrics")}
    assert indexes["ix_metrics_key_job_step_value"] == ["key", "job_id", "step", "value"]
    assert indexes["ix_metrics_job_id"] == ["job_id", "id"]


def test_long_runs_are_read_from_the_indexes(ws):
    """The compare page's curves come from the index alone, and a run's new points by the (job, id) index."""
    from sqlalchemy import select

    from lab.tables import Metric

    engine = engine_for(ws)
    curves = select(Metric.job_id, Metric.step, Metric.value).where(Metric.key == "loss", Metric.job_id.in_([1, 2]))
    since = select(Metric.id, Metric.key, Metric.step, Metric.value).where(Metric.job_id == 1, Metric.id > 10)
    with engine.connect() as conn:
        for query, index in ((curves.order_by(Metric.job_id, Metric.step), "COVERING INDEX ix_metrics_key_job_step"),
                             (since.order_by(Metric.id), "ix_metrics_job_id"),
                             (select(Metric.step, Metric.value).where(Metric.key == "loss", Metric.job_id == 1,
                                                                      Metric.id <= 10).order_by(Metric.step),
                              "COVERING INDEX ix_metrics_key_job_step")):
            sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
            assert index in plan and "TEMP B-TREE" not in plan, plan


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(ws):
    with engine_for(ws).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_concurrent_first_opens_migrate_once(ws):
    code = "from lab import settings, db; db.engine_for(settings.load()); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out.strip() == "ok", err
    assert current_revision(engine_for(ws)) == head_revision()


def _digest(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "newer schema"])
def test_a_damaged_or_newer_database_is_named_and_left_untouched(ws, damage):
    import os
    import sqlite3

    from conftest import lab_cli

    from lab import db as lab_db
    from lab import experiments

    path = ws.workspace / "lab.db"
    if damage == "garbage":
        ws.workspace.mkdir(parents=True)
        path.write_bytes(os.urandom(4096))
        expected = "file is not a database"
    else:
        experiments.get_or_create(ws, "default")
        lab_db.dispose_all()
        if damage == "truncated":
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
            expected = "cannot be read"
        else:
            with sqlite3.connect(path) as conn:
                conn.execute("UPDATE alembic_version SET version_num = 'ffff0000future'")
            with sqlite3.connect(path) as conn:  # into the main file, so that its bytes say it all
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            expected = "written by a newer version of the lab"
    before = _digest(path)
    done = lab_cli("datasets", "list")
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr and "unexpected" not in done.stderr
    assert _digest(path) == before, "the lab never modifies a database it cannot use"


def test_switching_a_new_database_to_wal_waits_for_the_others_switching_it(tmp_path):
    # Switching to WAL from two connections at once is a lock SQLite answers with "locked" at once, without waiting
    # (both hold a read lock and want the file to themselves); four processes opening a new workspace did that in CI.
    import sqlite3
    import threading

    from lab import db as lab_db

    errors = []
    for i in range(20):
        path = tmp_path / f"{i}.db"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE t (x)")
        barrier = threading.Barrier(8)

        def switch(path=path, barrier=barrier):
            conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            barrier.wait()
            try:
                lab_db._wal(conn.cursor())
                errors.extend([] if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal" else ["not wal"])
            except sqlite3.OperationalError as exc:
                errors.append(str(exc))
            finally:
                conn.close()

        threads = [threading.Thread(target=switch) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
