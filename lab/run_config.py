"""Run configs: a job (or a sweep) described in a YAML or JSON file of the user's own, kept beside their code.

    # sft-notes.yaml
    plugin: sft
    model: smollm2-135m-instruct
    dataset: notes
    experiment: notes
    params: {max_steps: 100, learning_rate: 2.0e-4}
    then_eval: {plugin: eval-generate, dataset: notes-test, params: {limit: 50}}

    lab run --config sft-notes.yaml --set max_steps=20      # command-line options override the file
    lab sweep --config sft-notes.yaml --grid lora_r=8,16    # a sweep takes one too (its `grid` key as well)

The Train page downloads its form as such a file and loads one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lab.errors import LabError


class FollowUp(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plugin: str
    dataset: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class RunConfig(BaseModel):
    """The keys a run config may hold; every one is optional in the file (the command line may give it)."""

    model_config = ConfigDict(extra="forbid")
    plugin: str | None = None
    model: str | None = None
    dataset: str | None = None
    experiment: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int | None = None
    processes: int | None = Field(None, ge=1, le=64)
    devices: int | None = Field(None, ge=0, le=64)
    nodes: int | None = Field(None, ge=1, le=1024)
    memory_gb: float | None = Field(None, gt=0, description="memory per node of a Slurm job, in GB")
    max_attempts: int | None = Field(None, ge=1, le=20)
    time_limit: float | None = Field(None, ge=0, description="minutes one attempt may run")
    then_eval: FollowUp | None = None
    report_to: str | None = Field(None, description="trackers, comma-separated: wandb, tensorboard, trackio, "
                                  "mlflow, or none")
    grid: dict[str, list[Any]] | None = None  # sweeps: parameter -> values
    group: str | None = None  # sweeps: the group's name


KEYS = tuple(RunConfig.model_fields)


def _problem(path: Path, err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key `{where}` in {path.name} (known: {', '.join(KEYS)})"
    return f"`{where}` in {path.name}: {err['msg']}"


def load(path: str | Path) -> RunConfig:
    """A run config from a .yaml/.yml or .json file, checked: an unknown key or a wrong type is named."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise LabError(f"no such file: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise LabError(f"{path.name} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                       f"{str(exc).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LabError(f"{path.name} must hold a mapping of keys ({', '.join(KEYS)}), got {type(data).__name__}")
    if isinstance(data.get("report_to"), list):  # `report_to: [wandb, tensorboard]` reads as well as a string
        data["report_to"] = ",".join(str(t) for t in data["report_to"]) or "none"
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(path, e) for e in exc.errors()]
        raise LabError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")) from None
    from lab import trackers

    trackers.parse(config.report_to, f"`report_to` in {path.name}")
    return config


def dump(config: dict) -> str:
    """A run config as YAML text, without the keys that are empty (what the Train page downloads)."""
    import yaml

    checked = RunConfig.model_validate(config).model_dump(exclude_none=True, exclude_defaults=True)
    order = {k: i for i, k in enumerate(KEYS)}
    return yaml.safe_dump(dict(sorted(checked.items(), key=lambda kv: order[kv[0]])), sort_keys=False,
                          allow_unicode=True)


def pick(given: Any, from_file: Any, default: Any = None) -> Any:
    """The command line's value when it gave one, else the file's, else the default."""
    return given if given is not None else from_file if from_file is not None else default
