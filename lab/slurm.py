"""Slurm as the lab's cluster engine: the sbatch command of a job, what squeue and sacct say of it, and what that
means for the lab's job row. Every command runs with an argument list, never through a shell.

A Slurm job of the lab runs `python -m jobs.slurm_launch JOB_ID` as its batch script (jobs/slurm_launch.py): the
runner directly, torchrun for several processes on one node, or one `srun` step that starts torchrun on every node
with Slurm's own rendezvous values. Its output file is the run's log.txt.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError
from lab.settings import Settings

COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol")
CALL_TIMEOUT_S = 30.0

# Slurm states that are over; anything else (PENDING, RUNNING, CONFIGURING, COMPLETING, SUSPENDED, REQUEUED, ...)
# is still going
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
# ended by the cluster, not by the job: it goes back to the lab's queue while attempts remain
RETRYABLE = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}
# what slurmstepd writes to the job's output when it kills a step over its memory limit (without cgroups, the
# state is then FAILED with signal 9 rather than OUT_OF_MEMORY)
OOM_MARKS = ("Exceeded job memory limit", "exceeded memory limit", "oom-kill event", "oom_kill event")


RETRY_STEP = "run it again with --max-attempts 2 or more: it resumes from its last checkpoint"


class SlurmError(LabError):
    pass


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def call(args: list[str], *, timeout: float = CALL_TIMEOUT_S, env: dict | None = None,
         input: str | None = None) -> subprocess.CompletedProcess:
    """Run one Slurm command (an argument list); a missing command or a hung controller becomes a SlurmError."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, input=input,
                              check=False)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} is not installed on this machine",
                         "a Slurm worker runs where Slurm's commands work (a login node of the cluster)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]} did not answer in {timeout:g} s", "check that slurmctld is up (sinfo)") from None


def job_name(settings: Settings, job_id: int) -> str:
    """The Slurm job name of lab job `job_id`: unique per workspace, so a worker finds a job it submitted even
    when it stopped before recording its Slurm id."""
    tag = hashlib.sha1(str(settings.workspace).encode()).hexdigest()[:6]
    return f"lab-{tag}-{job_id}"


def time_limit_minutes(job, settings: Settings) -> int | None:
    seconds = job.time_limit_s
    if seconds is None:
        return None if settings.slurm_time_limit_min is None else max(1, math.ceil(settings.slurm_time_limit_min))
    return max(1, math.ceil(seconds / 60))  # Slurm counts whole minutes


def memory_mb(job, settings: Settings) -> int | None:
    gb = job.memory_gb if job.memory_gb is not None else settings.slurm_memory_gb
    return None if gb is None else max(1, round(gb * 1024))


def batch_script(job_id: int) -> str:
    """The batch script: Python itself (the lab's interpreter, which must exist on the nodes at the same path), so
    no shell reads anything of the job."""
    return (f"#!{sys.executable}\n"
            f"# lab job {job_id}: the lab's launcher (jobs/slurm_launch.py) runs it on the allocated node(s)\n"
            "import sys\n\nfrom jobs.slurm_launch import main\n\n"
            f"sys.exit(main([{str(job_id)!r}]))\n")


def sbatch_args(job, settings: Settings, run_dir: Path, script: Path) -> list[str]:
    """sbatch's argument list for a claimed job. The settings' extra arguments come last, so they win."""
    processes = max(1, job.processes or 1)
    args = ["sbatch", "--parsable", f"--job-name={job_name(settings, job.id)}",
            f"--output={run_dir / 'log.txt'}", "--open-mode=append", f"--chdir={run_dir}",
            "--export=ALL", "--no-requeue",  # the lab requeues (and resumes) itself, with its attempts
            f"--nodes={max(1, job.nodes or 1)}", "--ntasks-per-node=1",  # one launcher (torchrun agent) per node
            f"--cpus-per-task={processes * settings.slurm_cpus_per_process}"]
    if job.devices:
        args.append(f"--gres=gpu:{job.devices}")
    minutes = time_limit_minutes(job, settings)
    if minutes is not None:
        args.append(f"--time={minutes}")
    mb = memory_mb(job, settings)
    if mb is not None:
        args.append(f"--mem={mb}M")
    if settings.slurm_partition:
        args.append(f"--partition={settings.slurm_partition}")
    if settings.slurm_account:
        args.append(f"--account={settings.slurm_account}")
    return [*args, *settings.slurm_sbatch_args, str(script)]


def submit(args: list[str], env: dict) -> str:
    done = call(args, env=env)
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {(done.stderr or done.stdout).strip()[-500:]}",
                         "check the partition, account and extra sbatch arguments (lab worker --help)")
    slurm_id = done.stdout.strip().split(";")[0]
    if not re.fullmatch(r"\d+", slurm_id):
        raise SlurmError(f"sbatch answered {done.stdout.strip()[:200]!r} instead of a job id")
    return slurm_id


def find_by_name(name: str) -> str | None:
    """A live Slurm job with this name (one the lab submitted before it could record its id)."""
    done = call(["squeue", "--noheader", f"--name={name}", "--format=%i"])
    ids = [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []
    return ids[0] if ids else None


@dataclass
class Seen:
    """One look at a Slurm job."""

    state: str  # PENDING, RUNNING, ... or one of ENDED; "" when Slurm no longer knows the job
    reason: str = ""  # squeue's reason (Priority, Resources, ...) or sacct's
    nodes: str = ""
    exit_code: int = 0  # the batch script's exit code
    signal: int = 0  # the signal that ended it, if any
    cancelled_by: str = ""  # "CANCELLED by 1000": the uid

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def label(self) -> str:
        reason = f" ({self.reason})" if self.reason and self.reason not in ("None", "(null)") else ""
        return (self.state + reason)[:64]


def _exit(text: str) -> tuple[int, int]:
    code, _, sig = (text or "0:0").partition(":")
    try:
        return int(code or 0), int(sig or 0)
    except ValueError:
        return 0, 0


def parse_state(text: str) -> tuple[str, str]:
    """"CANCELLED by 0" -> ("CANCELLED", "0"); "RUNNING" -> ("RUNNING", "")."""
    state, _, by = text.strip().partition(" by ")
    return state.strip().upper(), by.strip()


def squeue(slurm_id: str) -> Seen | None:
    """The job as the controller's queue shows it; None when it is not there (ended and forgotten, or never)."""
    done = call(["squeue", "--noheader", f"--jobs={slurm_id}", "--states=all", "--format=%T|%r|%N"])
    line = next((ln for ln in done.stdout.splitlines() if ln.strip()), "") if done.returncode == 0 else ""
    if not line:
        return None
    state, reason, nodes = (line.split("|") + ["", ""])[:3]
    return Seen(state=state.strip().upper(), reason=reason.strip(), nodes=nodes.strip())


_SACCT_COMPLETION: dict[str, bool] = {}  # SLURM_CONF -> True when only the job completion store answers


def sacct(slurm_id: str, env: dict | None = None) -> Seen | None:
    """The job's final record in Slurm's accounting (slurmdbd), or in the job completion store (`sacct -c`,
    jobcomp/filetxt) on a cluster without accounting; None when neither knows it yet."""
    import os

    key = (env or os.environ).get("SLURM_CONF", "")
    base = ["sacct", "--noheader", "--parsable2", f"--jobs={slurm_id}", "--format=JobIDRaw,State,ExitCode,NodeList"]
    for completion in ([True] if _SACCT_COMPLETION.get(key) else [False, True]):
        done = call([*base, "--completion"] if completion else [*base, "--allocations"], env=env)
        if done.returncode != 0:
            if not completion and "accounting storage" in (done.stderr or "").lower():
                _SACCT_COMPLETION[key] = True
                continue
            return None
        for line in done.stdout.splitlines():
            fields = line.split("|")
            if len(fields) >= 4 and fields[0].strip() == slurm_id:
                state, by = parse_state(fields[1])
                code, sig = _exit(fields[2])
                return Seen(state=state, nodes=fields[3].strip(), exit_code=code, signal=sig, cancelled_by=by)
        return None
    return None


def scontrol(slurm_id: str) -> Seen | None:
    """The controller's own view of a job it still remembers (MinJobAge): the fallback when no accounting answers."""
    done = call(["scontrol", "--oneliner", "show", "job", slurm_id])
    if done.returncode != 0:
        return None
    fields = dict(f.split("=", 1) for f in done.stdout.split() if "=" in f)
    state, by = parse_state(fields.get("JobState", ""))
    code, sig = _exit(fields.get("ExitCode", "0:0"))
    return Seen(state=state, reason=fields.get("Reason", ""), nodes=fields.get("NodeList", ""), exit_code=code,
                signal=sig, cancelled_by=by)


def look(slurm_id: str) -> Seen:
    """The job now: the queue while it is there and not over, then the accounting record (the truth of how it
    ended), then the controller's memory. State "" when nobody knows it."""
    seen = squeue(slurm_id)
    if seen is not None and not seen.ended:
        return seen
    final = sacct(slurm_id) or scontrol(slurm_id)
    if final is not None and final.ended:
        if seen is not None and not final.nodes:
            final.nodes = seen.nodes
        return final
    return seen or final or Seen(state="")


def cancel(slurm_id: str, *, kill: bool = False) -> None:
    """scancel the job: SIGTERM, then Slurm's KillWait, then SIGKILL; kill=True sends SIGKILL to every step now."""
    args = ["scancel", "--full", "--signal=KILL", slurm_id] if kill else ["scancel", slurm_id]
    done = call(args)
    if done.returncode != 0 and "already completing or completed" not in done.stderr.lower() \
            and "invalid job id" not in done.stderr.lower():
        raise SlurmError(f"scancel {slurm_id} failed: {done.stderr.strip()[-300:]}")


PROBE_TIMEOUT_S = 300.0


def probe(settings: Settings, env: dict, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """A tiny Slurm job that checks, from a node, what the lab's jobs need there: the lab's Python at the same path,
    the workspace (shared file system, same path, writable) and the database. Returns the node's answer; raises
    SlurmError saying what is wrong. A cluster too busy to run it within `timeout_s` is not an error: the answer
    says the check was skipped."""
    import os
    import socket

    missing = missing_commands()
    if missing:
        raise SlurmError(f"Slurm's commands are missing here: {', '.join(missing)}",
                         "run a Slurm worker on a machine of the cluster (a login node), where sbatch works")
    folder = settings.workspace / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"probe-{socket.gethostname()}-{os.getpid()}"
    out, script = folder / f"{stem}.out", folder / f"{stem}.py"
    out.unlink(missing_ok=True)
    script.write_text(f"#!{sys.executable}\nimport sys\n\nfrom jobs.slurm_launch import main\n\n"
                      "sys.exit(main(['--probe']))\n")
    script.chmod(0o700)
    name = f"{job_name(settings, 0)[:-2]}-probe"
    args = ["sbatch", "--parsable", "--wait", f"--job-name={name}", f"--output={out}", "--ntasks=1", "--time=5",
            "--mem=1024M", f"--chdir={folder}", "--export=ALL"]
    if settings.slurm_partition:
        args.append(f"--partition={settings.slurm_partition}")
    if settings.slurm_account:
        args.append(f"--account={settings.slurm_account}")
    args += [*settings.slurm_sbatch_args, str(script)]
    try:
        done = call(args, env=env, timeout=timeout_s)
    except SlurmError:
        call(["scancel", f"--name={name}"])
        return (f"the probe job did not run within {timeout_s:g} s (a busy cluster?): starting without checking "
                "that the nodes see the workspace and the database")
    finally:
        script.unlink(missing_ok=True)
    said = out.read_text(errors="replace").strip() if out.is_file() else ""
    out.unlink(missing_ok=True)
    if done.returncode == 0 and "probe ok" in said:
        return said.splitlines()[-1].removeprefix("[lab] ")
    if not said and done.returncode != 0 and not done.stdout.strip():
        raise SlurmError(f"sbatch refused the probe job: {(done.stderr or '').strip()[-400:]}",
                         "check that Slurm answers here (`sinfo`), and the partition, account and extra sbatch "
                         "arguments")
    if not said:
        raise SlurmError(f"the probe job wrote nothing to {out}: the nodes do not see the workspace "
                         f"{settings.workspace} (it must be on a file system they share, at the same path)",
                         "put the workspace on the cluster's shared file system and start the worker with "
                         "--workspace pointing there")
    lines = [ln.removeprefix("[lab] ") for ln in said.splitlines() if ln.strip()]
    why = next((ln for ln in lines if "probe failed" in ln), lines[-1])
    if "No such file" in said and sys.executable in said:
        why = (f"the lab's Python {sys.executable} does not exist on the node: install the lab in a virtual "
               "environment on the shared file system")
    raise SlurmError(f"the Slurm probe job failed: {why}",
                     "the nodes need the lab's Python at the same path, the workspace on a shared file system, "
                     "and a database they reach (PostgreSQL by LAB_DATABASE_URL for several machines)")
