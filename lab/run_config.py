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

Its keys are the fields of `lab.jobspec.JobSpec` (every one optional here: the command line may give the rest), and
`grid` for a sweep. The Train page saves its form as such a file (`jobspec.to_config`) and loads one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import jobspec
from lab.errors import LabError

KEYS = (*jobspec.FIELDS, "grid")


@dataclass
class RunConfig:
    """What a file gives: some of a spec's fields (checked), and a sweep's grid (parameter -> values)."""

    spec: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] | None = None


def _grid(value, where: str) -> dict[str, list] | None:
    if value is None:
        return None
    bad = not isinstance(value, dict) or any(not isinstance(v, list) or not v for v in value.values())
    if bad:
        raise LabError(f"`grid` in {where} must map each parameter to a list of values, e.g. {{lora_r: [8, 16]}}")
    return {str(k): list(v) for k, v in value.items()}


def parse(data: Any, where: str) -> RunConfig:
    """A run config from its parsed mapping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LabError(f"{where} must hold a mapping of keys ({', '.join(KEYS)}), got {type(data).__name__}")
    data = dict(data)
    grid = _grid(data.pop("grid", None), where)
    return RunConfig(jobspec.check_partial(data, where), grid)


def load(path: str | Path) -> RunConfig:
    """A run config from a .yaml/.yml or .json file, checked: an unknown key or a wrong value is named."""
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
    return parse(data, path.name)
