"""Settings read once from the command line and the environment, validated, and passed down explicitly.

Every setting has an environment variable; the command line's `--workspace` wins over `LAB_WORKSPACE`.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from lab.errors import LabError

# name -> (environment variable, default, help). The README's settings table is checked against this by a test.
SETTINGS_DOC: dict[str, tuple[str, str, str]] = {
    "workspace": ("LAB_WORKSPACE", "./workspace", "Folder holding the database, datasets, models and runs."),
    "database_url": (
        "LAB_DATABASE_URL",
        "sqlite:///<workspace>/lab.db",
        "SQLAlchemy URL of the database (e.g. postgresql+psycopg://user@host/lab).",
    ),
    "lease_s": ("LAB_LEASE_S", "30", "A running job whose heartbeat is older than this is considered lost."),
    "heartbeat_s": ("LAB_HEARTBEAT_S", "5", "How often a worker refreshes the heartbeat of its job and itself."),
    "poll_s": ("LAB_POLL_S", "0.1", "How often an idle worker looks for queued jobs (a cheap read)."),
    "cancel_grace_s": ("LAB_CANCEL_GRACE_S", "3", "Seconds between SIGTERM and SIGKILL when a job is cancelled."),
    "stop_grace_s": ("LAB_STOP_GRACE_S", "120", "Seconds a job whose worker stops gets to finish its step and "
                     "write a checkpoint (it resumes from it) before it is killed."),
    "wandb": ("LAB_WANDB", "offline", "W&B logging: offline (files in the run folder), online, or off."),
    "secrets_file": (
        "LAB_SECRETS_FILE",
        "<workspace>/secrets.env",
        "KEY=VALUE lines (e.g. WANDB_API_KEY, HF_TOKEN) given to job processes only; owner-only permissions.",
    ),
    "report_to": ("LAB_REPORT_TO", "wandb", "Experiment trackers a job reports to unless it names its own: any of "
                  "wandb, tensorboard, trackio, mlflow (comma-separated; files in the run folder), or none."),
    "llama_cpp_dir": ("LAB_LLAMA_CPP_DIR", "~/.cache/llm-lab",
                      "Where llama.cpp's converter and library are built on the first GGUF export (one build per "
                      "machine, shared by every workspace)."),
    "executor": ("LAB_EXECUTOR", "local", "Where a worker runs its jobs: local (child processes on its own machine) "
                 "or slurm (each job submitted to Slurm with sbatch and followed there)."),
    "slurm_partition": ("LAB_SLURM_PARTITION", "", "Slurm partition for the jobs (sbatch --partition); empty: the "
                        "cluster's default."),
    "slurm_account": ("LAB_SLURM_ACCOUNT", "", "Slurm account charged for the jobs (sbatch --account)."),
    "slurm_sbatch_args": ("LAB_SLURM_SBATCH_ARGS", "", "More sbatch arguments for every job, split like a command "
                          "line (e.g. --qos=normal --constraint=a100); they come last, so they win."),
    "slurm_time_limit_min": ("LAB_SLURM_TIME_LIMIT_MIN", "", "Time limit in minutes of a Slurm job that sets none "
                             "(sbatch --time); empty: the partition's default."),
    "slurm_memory_gb": ("LAB_SLURM_MEMORY_GB", "", "Memory per node in GB of a Slurm job that sets none (sbatch "
                        "--mem); empty: the cluster's default."),
    "slurm_cpus_per_process": ("LAB_SLURM_CPUS_PER_PROCESS", "1", "CPU cores Slurm gives each training process of "
                               "a job."),
    "slurm_poll_s": ("LAB_SLURM_POLL_S", "2", "How often a Slurm worker asks squeue about the jobs it follows."),
    "slurm_max_jobs": ("LAB_SLURM_MAX_JOBS", "32", "Jobs one Slurm worker keeps submitted at once (Slurm queues "
                       "them; the rest wait in the lab's queue)."),
    "extra_plugins": (
        "LAB_EXTRA_PLUGINS",
        "",
        "Comma-separated importable module names loaded as plugins, beside built-ins and entry points.",
    ),
}


MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
SECRET_KEY_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
MIN_SECRET_CHARS = 4


def read_secrets(settings: Settings) -> dict[str, str]:
    """The secrets file's KEY=VALUE pairs ({} without a file). A file others can read is refused; errors name the
    line, never the value."""
    path = settings.secrets_path
    if not path.is_file():
        return {}
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise LabError(f"{path} can be read by other users (mode {mode:o}): it holds secrets",
                       f"chmod 600 {path}")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not SECRET_KEY_RE.fullmatch(key.strip()):
            raise LabError(f"{path} line {n}: expected KEY=VALUE with an upper-case key")
        value = value.strip().strip("'\"")
        if 0 < len(value) < MIN_SECRET_CHARS:
            raise LabError(f"{path} line {n}: the value of {key.strip()} has only {len(value)} characters: masking it "
                           "in logs would hide every such string there",
                           f"secrets need {MIN_SECRET_CHARS} characters at least")
        out[key.strip()] = value
    return out


MASK = "[secret]"


def secret_values(settings: Settings) -> list[str]:
    """The values to mask; none when the secrets file cannot be used (the workers refuse it when they start)."""
    try:
        return list(read_secrets(settings).values())
    except (LabError, OSError):
        return []


def mask_all(value, secrets: list[str]):
    """Every string inside `value` (dicts and lists too) masked, e.g. an API answer."""
    if isinstance(value, str):
        return mask(value, secrets)
    if isinstance(value, dict):
        return {k: mask_all(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_all(v, secrets) for v in value]
    return value


def mask(text: str, secrets: dict[str, str] | list[str]) -> str:
    """`text` with every secret value replaced by [secret]: the one masking rule for logs, stored errors, job.json
    and API answers. Longer secrets first, so one that contains another is hidden whole."""
    values = secrets.values() if isinstance(secrets, dict) else secrets
    for value in sorted((v for v in values if v), key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def _env(name: str) -> str | None:
    value = os.environ.get(SETTINGS_DOC[name][0])
    return value if value not in (None, "") else None


def _float(name: str) -> float:
    raw = _env(name) or SETTINGS_DOC[name][1]
    try:
        value = float(raw)
    except ValueError:
        raise LabError(f"{SETTINGS_DOC[name][0]} must be a number, got {raw!r}") from None
    if value <= 0:
        raise LabError(f"{SETTINGS_DOC[name][0]} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    workspace: Path
    database_url: str
    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    poll_s: float = 0.1
    cancel_grace_s: float = 3.0
    stop_grace_s: float = 120.0
    wandb: str = "offline"
    report_to: str = "wandb"
    extra_plugins: tuple[str, ...] = field(default_factory=tuple)
    secrets_file: Path | None = None  # None: <workspace>/secrets.env
    llama_cpp_dir: Path = field(default_factory=lambda: Path(SETTINGS_DOC["llama_cpp_dir"][1]).expanduser())
    executor: str = "local"
    slurm_partition: str = ""
    slurm_account: str = ""
    slurm_sbatch_args: tuple[str, ...] = field(default_factory=tuple)
    slurm_time_limit_min: float | None = None
    slurm_memory_gb: float | None = None
    slurm_cpus_per_process: int = 1
    slurm_poll_s: float = 2.0
    slurm_max_jobs: int = 32

    @property
    def secrets_path(self) -> Path:
        return self.secrets_file or self.workspace / "secrets.env"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that make a child process see these same settings."""
        return {
            "LAB_WORKSPACE": str(self.workspace),
            "LAB_DATABASE_URL": self.database_url,
            "LAB_LEASE_S": str(self.lease_s),
            "LAB_HEARTBEAT_S": str(self.heartbeat_s),
            "LAB_POLL_S": str(self.poll_s),
            "LAB_CANCEL_GRACE_S": str(self.cancel_grace_s),
            "LAB_STOP_GRACE_S": str(self.stop_grace_s),
            "LAB_WANDB": self.wandb,
            "LAB_REPORT_TO": self.report_to,
            "LAB_EXTRA_PLUGINS": ",".join(self.extra_plugins),
            "LAB_SECRETS_FILE": str(self.secrets_path),
            "LAB_LLAMA_CPP_DIR": str(self.llama_cpp_dir),
            "LAB_EXECUTOR": self.executor,
            "LAB_SLURM_PARTITION": self.slurm_partition,
            "LAB_SLURM_ACCOUNT": self.slurm_account,
            "LAB_SLURM_SBATCH_ARGS": shlex.join(self.slurm_sbatch_args),
            "LAB_SLURM_TIME_LIMIT_MIN": "" if self.slurm_time_limit_min is None else str(self.slurm_time_limit_min),
            "LAB_SLURM_MEMORY_GB": "" if self.slurm_memory_gb is None else str(self.slurm_memory_gb),
            "LAB_SLURM_CPUS_PER_PROCESS": str(self.slurm_cpus_per_process),
            "LAB_SLURM_POLL_S": str(self.slurm_poll_s),
            "LAB_SLURM_MAX_JOBS": str(self.slurm_max_jobs),
        }

    def with_executor(self, executor: str | None = None, *, partition: str | None = None,
                      account: str | None = None, sbatch_args: list[str] | None = None) -> Settings:
        """These settings with a worker's command-line choices (`lab worker --executor slurm --partition P ...`)."""
        changes: dict = {}
        if executor is not None:
            changes["executor"] = check_executor(executor, "--executor")
        if partition is not None:
            changes["slurm_partition"] = partition
        if account is not None:
            changes["slurm_account"] = account
        if sbatch_args:
            changes["slurm_sbatch_args"] = self.slurm_sbatch_args + tuple(sbatch_args)
        return replace(self, **changes)


EXECUTORS = ("local", "slurm")


def check_executor(value: str, where: str) -> str:
    value = value.strip().lower()
    if value not in EXECUTORS:
        raise LabError(f"{where} must be one of {', '.join(EXECUTORS)}, got {value!r}")
    return value


def _optional_float(name: str) -> float | None:
    return None if _env(name) is None else _float(name)


def load(workspace: str | Path | None = None) -> Settings:
    """Settings from the environment; `workspace` (the `--workspace` option) overrides `LAB_WORKSPACE`."""
    ws = Path(workspace or _env("workspace") or SETTINGS_DOC["workspace"][1]).expanduser().resolve()
    if ws.exists() and not ws.is_dir():
        raise LabError(f"workspace {ws} exists and is not a folder")
    url = _env("database_url") or f"sqlite:///{ws / 'lab.db'}"
    wandb = (_env("wandb") or "offline").lower()
    if wandb not in ("offline", "online", "off"):
        raise LabError(f"LAB_WANDB must be offline, online or off, got {wandb!r}")
    extra = tuple(m.strip() for m in (_env("extra_plugins") or "").split(",") if m.strip())
    for module in extra:  # plugin code comes from importable modules only, never from a file path or an upload
        if not MODULE_RE.fullmatch(module):
            raise LabError(f"LAB_EXTRA_PLUGINS takes importable module names such as my_pkg.my_plugin, "
                           f"got {module!r}", "install the plugin's package (pip install -e PATH) and name its module")
    from lab import trackers

    report_to = _env("report_to") or SETTINGS_DOC["report_to"][1]
    trackers.parse(report_to, "LAB_REPORT_TO")  # a typo stops here, not in every job
    try:
        sbatch_args = tuple(shlex.split(_env("slurm_sbatch_args") or ""))
    except ValueError as exc:
        raise LabError(f"LAB_SLURM_SBATCH_ARGS cannot be split into arguments: {exc}") from None
    secrets = _env("secrets_file")
    settings = Settings(workspace=ws, database_url=url, wandb=wandb, report_to=report_to, extra_plugins=extra,
                        secrets_file=Path(secrets).expanduser().resolve() if secrets else None,
                        llama_cpp_dir=Path(_env("llama_cpp_dir") or SETTINGS_DOC["llama_cpp_dir"][1]).expanduser()
                        .resolve())
    return replace(
        settings,
        lease_s=_float("lease_s"),
        heartbeat_s=_float("heartbeat_s"),
        poll_s=_float("poll_s"),
        cancel_grace_s=_float("cancel_grace_s"),
        stop_grace_s=_float("stop_grace_s"),
        executor=check_executor(_env("executor") or "local", "LAB_EXECUTOR"),
        slurm_partition=_env("slurm_partition") or "",
        slurm_account=_env("slurm_account") or "",
        slurm_sbatch_args=sbatch_args,
        slurm_time_limit_min=_optional_float("slurm_time_limit_min"),
        slurm_memory_gb=_optional_float("slurm_memory_gb"),
        slurm_cpus_per_process=int(_float("slurm_cpus_per_process")),
        slurm_poll_s=_float("slurm_poll_s"),
        slurm_max_jobs=max(1, int(_float("slurm_max_jobs"))),
    )
