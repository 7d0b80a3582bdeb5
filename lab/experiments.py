"""Experiments group runs. A job names its experiment; one that does not exist yet is created."""

from __future__ import annotations

from sqlalchemy import func, select

from lab.db import read_session, session
from lab.errors import LabError
from lab.settings import Settings
from lab.tables import Experiment, Job
from lab.workspace import check_name

DEFAULT = "default"


def get_or_create(settings: Settings, name: str) -> int:
    """The id of experiment `name`, creating it when absent; archived experiments take no new runs."""
    check_name(name, "experiment")
    with session(settings) as s:
        row = s.scalar(select(Experiment).where(Experiment.name == name))
        if row is None:
            row = Experiment(name=name)
            s.add(row)
            s.flush()
        elif row.archived:
            raise LabError(f"experiment {name!r} is archived", "unarchive it or pick another experiment")
        return row.id


def list_all(settings: Settings) -> list[dict]:
    with read_session(settings) as s:
        counts = dict(s.execute(select(Job.experiment_id, func.count()).group_by(Job.experiment_id)).all())
        return [
            {"id": e.id, "name": e.name, "notes": e.notes, "archived": e.archived, "runs": counts.get(e.id, 0),
             "created_at": e.created_at.isoformat(timespec="seconds")}
            for e in s.scalars(select(Experiment).order_by(Experiment.id))
        ]


def _get(s, name: str) -> Experiment:
    row = s.scalar(select(Experiment).where(Experiment.name == name))
    if row is None:
        raise LabError(f"no experiment named {name!r}")
    return row


def create(settings: Settings, name: str, notes: str = "") -> dict:
    check_name(name, "experiment")
    with session(settings) as s:
        if s.scalar(select(Experiment.id).where(Experiment.name == name)) is not None:
            raise LabError(f"an experiment named {name!r} already exists")
        s.add(Experiment(name=name, notes=notes or ""))
    return next(e for e in list_all(settings) if e["name"] == name)


def rename(settings: Settings, name: str, new_name: str) -> None:
    """Rename an experiment. Runs keep their folders; later runs go under the new name's folder."""
    check_name(new_name, "experiment")
    with session(settings) as s:
        if s.scalar(select(Experiment.id).where(Experiment.name == new_name)) is not None:
            raise LabError(f"an experiment named {new_name!r} already exists")
        _get(s, name).name = new_name


def set_notes(settings: Settings, name: str, notes: str) -> None:
    with session(settings) as s:
        _get(s, name).notes = notes or ""


def set_archived(settings: Settings, name: str, archived: bool) -> None:
    """Archived experiments stay listed with their runs but take no new runs."""
    with session(settings) as s:
        _get(s, name).archived = archived
