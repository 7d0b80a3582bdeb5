"""What a completed job leaves behind in the database: its output model (or the dataset a data job made) and the
evaluation queued on it.

The job process only trains and writes files. The worker prepares these records from the run folder and writes
them in the same transaction that marks the job completed, so a job's output is registered exactly once, and never
for a job that is not completed (a worker killed before recording the outcome registers nothing; the retry does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from lab import datasets, plugins, registry
from lab.errors import LabError
from lab.settings import Settings
from lab.tables import Dataset, Job, Model
from lab.workspace import STAGING, datasets_dir

DATASET_MANIFEST = "dataset.json"  # a data job's output/: this file ({format, prefix, source}) and data.jsonl


@dataclass
class Completion:
    """Rows to add when the job is marked completed, and lines for the run's log."""

    model: dict | None = None  # Model fields, name aside (chosen inside the transaction)
    dataset: dict | None = None  # a data job's dataset: Dataset fields, prefix and the data's folder
    follow_up: dict | None = None  # Job fields of the evaluation, model aside
    notes: list[str] = field(default_factory=list)

    def write(self, s: Session, job: Job) -> list[str]:
        """Add the rows inside the caller's transaction; returns what was done, for the log."""
        done = []
        model_id = None
        if self.dataset is not None:
            done.append(_register_dataset(s, job, self.dataset))
        if self.model is not None:
            name = f"{job.plugin}-{job.id}"
            taken = set(s.scalars(select(Model.name).where(Model.name.like(f"{job.plugin}-{job.id}%"))))
            n = 2
            while name in taken:  # e.g. the database was reset while models of that name remain
                name, n = f"{job.plugin}-{job.id}.{n}", n + 1
            row = Model(name=name, **self.model)
            s.add(row)
            s.flush()
            model_id = row.id
            done.append(f"output registered as model {name} ({row.kind})")
            registry.write_model_json(Path(row.path), name=name, source="run", job_id=job.id,
                                      base_model_id=row.base_model_id)
        if self.follow_up is not None and model_id is not None:
            follow = Job(status="queued", model_id=model_id, **self.follow_up)
            s.add(follow)
            s.flush()
            done.append(f"queued job {follow.id}: {follow.plugin} of the output")
        return self.notes + done


def prepare(settings: Settings, job: Job, run_dir: Path) -> Completion:
    """Read the run's output folder (outside any transaction: fingerprinting a model takes a while)."""
    out = Completion()
    folder = run_dir / "output"
    if (folder / DATASET_MANIFEST).is_file():
        out.dataset = {**_dataset_fields(folder), "root": str(datasets_dir(settings))}
        return out
    if not ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
        if job.follow_up:
            out.notes.append("no model came out of this run: the follow-up evaluation is not queued")
        return out
    base = None
    if job.model_id:  # an adapter trained on top of an adapter still applies to the same full model
        start = registry.get_by_id(settings, job.model_id)
        base = start.base_model_id if start is not None and start.kind == "adapter" else job.model_id
    out.model = {**registry.model_fields(folder, folder, "run"), "job_id": job.id, "base_model_id": base}
    if job.follow_up:
        out.follow_up, note = _follow_up(settings, job, out.model)
        if note:
            out.notes.append(note)
    return out


def _follow_up(settings: Settings, job: Job, model: dict) -> tuple[dict | None, str | None]:
    """The evaluation's Job fields, checked against the output as a model; or why it cannot follow."""
    follow = job.follow_up
    try:
        plugin = plugins.get(settings, follow["plugin"])
        params = plugins.validate_params(plugin, follow["params"])
        dataset = datasets.info(settings, follow["dataset"]) if follow["dataset"] else None
        as_model = {**model, "name": f"{job.plugin}-{job.id}", "id": None}
        problems = plugin.check_inputs(params, as_model, dataset, settings)
        if problems:
            raise LabError("; ".join(problems))
    except LabError as exc:  # the training itself succeeded: say why the evaluation could not follow
        return None, f"the follow-up evaluation could not be queued: {exc}"
    return {"experiment_id": job.experiment_id, "plugin": plugin.id, "params": params.model_dump(mode="json"),
            "dataset_id": dataset["id"] if dataset else None, "priority": job.priority,
            "group_name": job.group_name, "tags": [*job.tags, f"eval-of-{job.id}"]}, None


def _dataset_fields(folder: Path) -> dict:
    """A data job's output checked as a dataset import would be: every row valid for its format."""
    from lab import formats

    manifest = json.loads((folder / DATASET_MANIFEST).read_text())
    fmt = manifest.get("format")
    if fmt not in formats.FORMATS:
        raise LabError(f"output/{DATASET_MANIFEST} names no known format ({fmt!r})")
    data = (folder / datasets.DATA_FILE).read_bytes()
    rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    problems = [f"row {i}: {p}" for i, row in enumerate(rows, start=1) for p in formats.check_row(fmt, row)]
    if problems or not rows:
        raise LabError(f"the rows in output/{datasets.DATA_FILE} are not a valid {fmt} dataset: "
                       + ("; ".join(problems[:3]) if problems else "there are none"))
    return {"format": fmt, "columns": datasets.columns_of(rows), "rows": len(rows),
            "fingerprint": hashlib.sha256(data).hexdigest(), "source": str(manifest.get("source") or ""),
            "prefix": manifest.get("prefix") or fmt, "folder": str(folder)}


def _register_dataset(s: Session, job: Job, found: dict) -> str:
    """Add the Dataset row (named `<prefix>-<job id>`) and publish its folder with one rename; a folder that an
    interrupted recording left under that name, with no row, is replaced."""
    settings_root = Path(found["root"])
    base = f"{found['prefix']}-{job.id}"
    taken = set(s.scalars(select(Dataset.name).where(Dataset.name.like(f"{base}%"))))
    name, n = base, 2
    while name in taken:
        name, n = f"{base}.{n}", n + 1
    final = settings_root / name
    row = Dataset(name=name, format=found["format"], path=str(final), columns=found["columns"], rows=found["rows"],
                  fingerprint=found["fingerprint"], source=found["source"], job_id=job.id)
    s.add(row)
    s.flush()
    tmp = settings_root / STAGING / f"{name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(Path(found["folder"]) / datasets.DATA_FILE, tmp / datasets.DATA_FILE)
    meta = {"name": name, "format": found["format"], "columns": found["columns"], "rows": found["rows"],
            "fingerprint": found["fingerprint"], "source": found["source"], "job_id": job.id}
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    if final.exists():  # left by a recording that died before its commit: nothing points at it
        shutil.rmtree(final)
    tmp.rename(final)
    return f"output registered as dataset {name} ({found['format']}, {found['rows']} rows)"
