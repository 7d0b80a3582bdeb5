"""The database tables. The schema itself is created and changed only by the alembic migrations in lab/migrations."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    """Naive UTC: stored and compared the same way on SQLite and PostgreSQL."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime()}


class Experiment(Base):
    __tablename__ = "experiments"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    notes: Mapped[str] = mapped_column(Text, default="")
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    format: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)  # folder under workspace/datasets
    columns: Mapped[list] = mapped_column(JSON, default=list)
    rows: Mapped[int] = mapped_column(Integer)
    test_rows: Mapped[int | None] = mapped_column(Integer, nullable=True)  # a held-out split kept beside, if any
    fingerprint: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text, default="")  # the file it was imported from
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the run that produced it (generate, ...)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Ranking(Base):
    """One annotator's verdict on one item of a candidates dataset (lab.ranking)."""

    __tablename__ = "rankings"
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    item: Mapped[str] = mapped_column(String(128))  # the candidates row's id
    annotator: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))  # order, best_worst, tie, skip
    ranking: Mapped[list] = mapped_column(JSON)  # candidate indices as stored, best first (best_worst: [best, worst])
    shown: Mapped[list] = mapped_column(JSON)  # the order the answers were shown in (stored indices)
    into_dataset: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the preference dataset fed
    pairs_mode: Mapped[str | None] = mapped_column(String(16), nullable=True)  # all, best-vs-rest
    pairs_added: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("dataset_id", "item", "annotator", name="uq_rankings_item_annotator"),)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))  # full, adapter, reward, classifier
    source: Mapped[str] = mapped_column(String(32))  # local, hub (the local HF cache), gguf, starter, tiny, run
    hub_id: Mapped[str | None] = mapped_column(String(256), nullable=True)  # ORG/NAME when known (cache, adapter)
    revision: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the cached snapshot's commit
    architecture: Mapped[str] = mapped_column(String(128), default="")
    parameters: Mapped[int | None] = mapped_column(Integer, nullable=True)
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"), nullable=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the run that produced it (jobs.id)
    fingerprint: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"))
    plugin: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"), nullable=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    # accelerators asked for: None = one per process on a worker that owns accelerators, none elsewhere
    devices: Mapped[int | None] = mapped_column(Integer, nullable=True)
    processes: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))  # >1: torchrun
    time_limit_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # per attempt; None: no limit
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))  # >1: a Slurm multi-node job
    memory_gb: Mapped[float | None] = mapped_column(Float, nullable=True)  # a Slurm job's --mem; None: the default
    slurm_job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # set while Slurm runs it
    slurm_state: Mapped[str | None] = mapped_column(String(64), nullable=True)  # last seen, e.g. "PENDING (Priority)"
    node_list: Mapped[str | None] = mapped_column(Text, nullable=True)  # Slurm's node list, e.g. "gpu[01-02]"
    report_to: Mapped[str | None] = mapped_column(String(200), nullable=True)  # trackers; None: settings' default
    phase: Mapped[str | None] = mapped_column(String(16), nullable=True)  # while running: see lab.jobstore.PHASES
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    run_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # a failed job's reason, in one line or a few
    failure: Mapped[str | None] = mapped_column(String(32), nullable=True)  # its kind: lab.diagnosis.KINDS
    next_step: Mapped[str | None] = mapped_column(Text, nullable=True)  # what the user can do about it
    log_tail: Mapped[str | None] = mapped_column(Text, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    group_name: Mapped[str | None] = mapped_column(String(64), nullable=True)  # a sweep's jobs
    tags: Mapped[list] = mapped_column(JSON, default=list, server_default=text("'[]'"))
    follow_up: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # an evaluation to queue on success
    spec: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # lab.jobspec.JobSpec as given (None: older jobs)

    __table_args__ = (Index("ix_jobs_group_name", "group_name"),)


# the claim's order (priority descending, then id): the claim reads one index entry however long the queue
Index("ix_jobs_claim_order", Job.status, Job.priority.desc(), Job.id)


class Metric(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(128))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)  # NULL: the run logged NaN
    time: Mapped[datetime] = mapped_column(default=utcnow)

    # "all points of key K for jobs J1..Jn", in step order, from the index alone (it holds the value); "a run's
    # points", and "its points since id N" (the run view's tick)
    __table_args__ = (Index("ix_metrics_key_job_step_value", "key", "job_id", "step", "value"),
                      Index("ix_metrics_job_id", "job_id", "id"))


class Worker(Base):
    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="idle")  # idle, busy, stopped
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    capacity: Mapped[str | None] = mapped_column(String(256), nullable=True)  # e.g. "gpus 0,1; 1 cpu slot"
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


TERMINAL_STATES = ("completed", "failed", "cancelled")
JOB_STATES = ("queued", "running", *TERMINAL_STATES)
