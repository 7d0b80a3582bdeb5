"""Where a worker's jobs run: an `Executor` claims the jobs that fit it and supervises each one to its end.

- `LocalExecutor`: job processes on this machine, each on its share of the worker's accelerators or a CPU slot
  (jobs.supervise).
- `SlurmExecutor`: jobs handed to Slurm with sbatch and followed there (jobs.slurm_supervise); it also takes over
  following the Slurm jobs of workers that are gone.

A supervision sees its worker only through `jobs.supervise.Link`; how a job ended is decided by lab.outcome.
"""

from __future__ import annotations

from typing import Protocol

from jobs.slurm_supervise import SlurmSupervision
from jobs.supervise import Link, Supervision
from lab import jobstore
from lab.settings import Settings
from lab.tables import Job


class Executor(Protocol):
    capacity: str  # what it offers, for the Workers view: "gpus 0,1 + 1 cpu slot", "slurm (up to 32 jobs)"

    def claim(self, worker_id: str, busy: list[list[str]]) -> tuple[Job, list[str]] | None:
        """Claim the next queued job that fits beside the running ones (`busy`: each one's devices; [] = a CPU slot
        or a job in Slurm), and the devices it gets."""

    def supervise(self, link: Link, job: Job, devices: list[str]) -> str:
        """Run a claimed job to its end and record its outcome; the status ("queued" when it went back)."""

    def orphans(self, worker_id: str) -> list[Job]:
        """Running jobs of workers that are gone that this executor now follows (none for local processes)."""


class LocalExecutor:
    def __init__(self, settings: Settings, gpus: list[str], slots: int):
        self.settings, self.gpus, self.slots = settings, list(gpus), slots
        devices = f"gpus {','.join(self.gpus)} + " if self.gpus else ""
        self.capacity = f"{devices}{slots} cpu slot{'s' if slots != 1 else ''}"

    def claim(self, worker_id: str, busy: list[list[str]]) -> tuple[Job, list[str]] | None:
        used = {d for devices in busy for d in devices}
        free = [d for d in self.gpus if d not in used]
        slots = self.slots - sum(1 for devices in busy if not devices)
        if not free and slots < 1:
            return None
        job = jobstore.claim_next(self.settings, worker_id, free_devices=len(free), free_slots=slots,
                                  owns_devices=bool(self.gpus))
        if job is None:
            return None
        wanted = job.processes if job.devices is None and self.gpus else (job.devices or 0)
        return job, free[:wanted]  # no devices: the job takes a CPU slot

    def supervise(self, link: Link, job: Job, devices: list[str]) -> str:
        # a worker that owns accelerators gives each job only its own (a CPU job sees none)
        return Supervision(link, job, devices if self.gpus else None).run()

    def orphans(self, worker_id: str) -> list[Job]:
        return []  # a local job whose worker is gone is reaped (lab.jobstore.reap_stale)


class SlurmExecutor:
    def __init__(self, settings: Settings):
        self.settings = settings
        where = ", ".join(filter(None, [settings.slurm_partition and f"partition {settings.slurm_partition}",
                                        settings.slurm_account and f"account {settings.slurm_account}"]))
        self.capacity = f"slurm ({where + ', ' if where else ''}up to {settings.slurm_max_jobs} jobs)"

    def claim(self, worker_id: str, busy: list[list[str]]) -> tuple[Job, list[str]] | None:
        if len(busy) >= self.settings.slurm_max_jobs:
            return None
        job = jobstore.claim_next(self.settings, worker_id, cluster=True)
        return None if job is None else (job, [])

    def supervise(self, link: Link, job: Job, devices: list[str]) -> str:
        return SlurmSupervision(link, job).run()

    def orphans(self, worker_id: str) -> list[Job]:
        return jobstore.adopt_slurm(self.settings, worker_id)


def executor_for(settings: Settings, gpus: list[str] | None = None, slots: int = 1) -> Executor:
    """The executor the settings name (LAB_EXECUTOR / `lab worker --executor`)."""
    if settings.executor == "slurm":
        return SlurmExecutor(settings)
    return LocalExecutor(settings, gpus or [], slots)
