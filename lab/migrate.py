"""Bring a database to the newest schema with alembic, safely when several processes start at once."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from lab.errors import LabError

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.execution_options(lab_readonly=True).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Migrate to head. The write lock (SQLite) or an advisory lock (PostgreSQL) makes concurrent starts wait."""
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return
    known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current is not None and current not in known:
        raise LabError(f"the database was written by a newer version of the lab (schema {current}; this one knows "
                       f"up to {head}); it was not changed",
                       "update the lab (git pull, then make run), or point LAB_DATABASE_URL/--workspace elsewhere")
    cfg = alembic_config()
    with engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite: one migrator at a time
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7860)"))
        if MigrationContext.configure(conn).get_current_revision() == head:
            return  # another process migrated while we waited for the lock
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
