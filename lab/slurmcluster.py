"""A throwaway single-node Slurm cluster on this machine (Debian's `slurm-wlm` and `munge`) for tests and
benchmarks: slurmctld and slurmd on 127.0.0.1, job completion records in a text file (`sacct --completion`), memory
limits enforced by polling (no cgroups needed). Runs as root.

Not how a lab is deployed: there, a Slurm worker runs on a login node of a real cluster (see the README).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lab.errors import LabError
from lab.pgserver import free_port

DAEMONS = ("slurmctld", "slurmd", "munged")


def missing() -> list[str]:
    return [d for d in (*DAEMONS, "sbatch", "squeue", "sacct", "scancel", "scontrol", "sinfo")
            if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def ensure_munge() -> bool:
    """Start munged (as the munge user) unless it answers already; True when this call started it."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return False
    for folder in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        shutil.chown(key, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True)
    deadline = time.monotonic() + 10
    while subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise LabError("munged did not start", "see /var/log/munge/munged.log")
        time.sleep(0.1)
    return True


def write_conf(root: Path, cpus: int, memory_mb: int) -> Path:
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=labtest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "AuthType=auth/munge",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        # no cgroups: processes tracked by their parentage, memory limits enforced by polling (every second)
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/linux", "JobAcctGatherFrequency=1", "JobAcctGatherParams=OverMemoryKill",
        # the finished jobs' records, for `sacct --completion`, without a slurmdbd
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root / 'jobcomp.txt'}",
        "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "MpiDefault=none", "ReturnToService=2", "KillWait=5", "MinJobAge=300", "InactiveLimit=0",
        # more CPUs than the machine has, so that tests run several small jobs side by side
        "SlurmdParameters=config_overrides", f"DefMemPerCPU={max(256, memory_mb // (2 * cpus))}",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=lab Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    return conf


@contextmanager
def throwaway_cluster(cpus: int = 8) -> Iterator[Path]:
    """Start munged (if needed), slurmctld and slurmd with a new configuration; yield the slurm.conf path (give it
    to the Slurm commands as SLURM_CONF); stop the daemons and delete their folder afterwards."""
    if os.geteuid() != 0:
        raise LabError("a throwaway Slurm cluster needs root (slurmd starts the jobs)")
    lacking = missing()
    if lacking:
        raise LabError(f"Slurm is not installed here (missing {', '.join(lacking)})",
                       "`make slurm` installs Debian's slurm-wlm and munge")
    started_munge = ensure_munge()
    root = Path(tempfile.mkdtemp(prefix="lab-slurm-"))
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = write_conf(root, cpus, int(_memory_mb() * 0.8))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, capture_output=True, env=env)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, capture_output=True, env=env)
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True,
                                   env=env).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                break
            if time.monotonic() > deadline:
                log = (root / "slurmctld.log").read_text(errors="replace")[-2000:] if (
                    root / "slurmctld.log").exists() else ""
                raise LabError(f"the Slurm node did not come up (state {state!r})\n{log}")
            time.sleep(0.2)
        yield conf
    finally:
        subprocess.run(["scancel", "--full", "--signal=KILL", "--user=root"], capture_output=True, env=env)
        deadline = time.monotonic() + 15  # let slurmd see its job steps end, so none lingers after it
        while time.monotonic() < deadline and subprocess.run(
                ["squeue", "--noheader", "--format=%i"], capture_output=True, text=True, env=env).stdout.strip():
            time.sleep(0.2)
        for pidfile in ("slurmd.pid", "slurmctld.pid"):
            try:
                os.kill(int((root / pidfile).read_text().strip()), 15)
            except (OSError, ValueError):
                pass
        time.sleep(0.5)
        if started_munge:
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)
            # gone before the next cluster looks for it: a munged still exiting answers `munge -n`, and the next
            # cluster would then rely on a daemon about to vanish
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and subprocess.run(["pgrep", "-x", "munged"],
                                                                 capture_output=True).returncode == 0:
                time.sleep(0.1)
        shutil.rmtree(root, ignore_errors=True)
