"""A lab job inside Slurm: the batch script runs `main([JOB_ID])` (lab.slurm.batch_script) on the first node.

- one node, one process: the runner (`python -m jobs.runner JOB_ID`);
- one node, N processes: `torchrun --standalone --nproc-per-node=N` (as a local worker does);
- several tasks in the allocation (`--nodes M`): one `srun` step that starts `python -m jobs.slurm_launch --task
  JOB_ID` once per node; each starts torchrun with Slurm's own rendezvous values: `--nnodes` the task count,
  `--node-rank` the task's SLURM_PROCID (its SLURM_NODEID with one task per node), `--master-addr` the address of
  the first node of SLURM_JOB_NODELIST and a `--master-port` derived from the Slurm job id. Rank 0 alone records.

The launcher reads the workspace's secrets file on the node and gives the secrets to the job's processes only (they
never pass through sbatch or the controller), copies the job's output to its own (Slurm's output file is the run's
log.txt) with them masked, and exits with the job's exit code. Slurm's SIGTERM (scancel, time limit) reaches every
process of the step: the launcher lets the job stop (a training run writes a checkpoint) and waits for it.

`python -m jobs.slurm_launch --probe` is the worker's start-up check that a node sees the workspace and the
database.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from jobs.supervise import copy_masked


def _say(text: str) -> None:
    print(f"[lab] {text}", flush=True)


def _first_node_address() -> str:
    """The address of the first node of the allocation, as Slurm knows it (NodeAddr), for torchrun's rendezvous."""
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, check=True, timeout=30).stdout.split()
    node = hosts[0]
    shown = subprocess.run(["scontrol", "--oneliner", "show", "node", node], capture_output=True, text=True,
                           check=False, timeout=30).stdout
    fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
    return fields.get("NodeAddr") or node


def master_port(slurm_job_id: str) -> int:
    return 20000 + int(slurm_job_id) % 20000


def torchrun_task(job_id: int, processes: int) -> list[str]:
    """The torchrun command of this task (one per node) of a multi-node job."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={os.environ['SLURM_NTASKS']}",
            f"--nproc-per-node={processes}", f"--node-rank={os.environ['SLURM_PROCID']}",
            f"--master-addr={_first_node_address()}", f"--master-port={master_port(os.environ['SLURM_JOB_ID'])}",
            "--module", "jobs.runner", str(job_id)]


def _threads(processes: int) -> str:
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1)
    return str(max(1, cpus // processes))


def batch(job_id: int) -> int:
    """The batch step: start the job's processes, copy their output with the secrets masked, return their code."""
    from jobs.supervise import job_command
    from lab import jobstore
    from lab.settings import load, read_secrets

    settings = load()
    secrets = read_secrets(settings)
    job = jobstore.get(settings, job_id)
    processes = max(1, job.processes or 1)
    tasks = int(os.environ.get("SLURM_NTASKS") or 1)
    env = {**os.environ, **secrets, "OMP_NUM_THREADS": _threads(processes)}
    env.pop("LAB_WORKER_PID", None)  # the job outlives the worker that submitted it
    if tasks > 1:
        command = ["srun", "--kill-on-bad-exit=1", "--export=ALL",
                   f"--cpus-per-task={os.environ.get('SLURM_CPUS_PER_TASK') or 1}",
                   sys.executable, "-m", "jobs.slurm_launch", "--task", str(job_id)]
        how = f"{tasks} tasks (srun), {processes} process(es) each"
    else:  # the runner, or torchrun for several processes on this node, as a local worker starts them
        command = job_command(job, env)
        how = f"{processes} processes (torchrun)" if processes > 1 else "one process"
    _say(f"Slurm job {os.environ.get('SLURM_JOB_ID')} on {os.environ.get('SLURM_JOB_NODELIST', socket.gethostname())}"
         f": {how}")
    # Slurm signals every process of the step itself; the launcher outlives the job's own handling of it
    signal.signal(signal.SIGTERM, lambda *_: _say("SIGTERM from Slurm: the job stops (a training run after a "
                                                  "checkpoint)"))
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env)
    masks = sorted((v.encode() for v in secrets.values() if v), key=len, reverse=True)

    def write(out: bytes) -> None:
        sys.stdout.buffer.write(out)
        sys.stdout.flush()

    copy_masked(proc.stdout.fileno(), masks, write)
    code = proc.wait()
    return code if code >= 0 else 128 - code


def task(job_id: int) -> int:
    """One task of the srun step: this node's torchrun agent (replaces this process)."""
    from lab import jobstore
    from lab.settings import load

    command = torchrun_task(job_id, max(1, jobstore.get(load(), job_id).processes or 1))
    os.execv(command[0], command)
    return 1  # not reached


def probe() -> int:
    """Check from a node that the workspace is there and writable and that the database answers."""
    from sqlalchemy import text

    from lab.db import read_session
    from lab.settings import load

    node = socket.gethostname()
    settings = load()
    if not settings.workspace.is_dir():
        print(f"[lab] probe failed: node {node} has no folder {settings.workspace}", flush=True)
        return 2
    mark = settings.workspace / "slurm" / f".probe-{node}-{os.getpid()}"
    try:
        mark.parent.mkdir(exist_ok=True)
        mark.write_text("ok")
        mark.unlink()
    except OSError as exc:
        print(f"[lab] probe failed: node {node} cannot write to {settings.workspace}: {exc}", flush=True)
        return 2
    try:
        with read_session(settings) as db:
            db.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error: say it plainly
        print(f"[lab] probe failed: node {node} cannot reach the database: {type(exc).__name__}: {exc}"[:600],
              flush=True)
        return 3
    print(f"[lab] probe ok: node {node} sees the workspace {settings.workspace} and the database", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lab.errors import LabError

    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "--probe":
            return probe()
        if argv and argv[0] == "--task":
            return task(int(argv[1]))
        return batch(int(argv[0]))
    except LabError as exc:  # e.g. a secrets file others can read: said in the log, no traceback
        _say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
