"""A job's specification: one type that every way of launching a job builds, and everything shown about a job is
derived from.

    spec = JobSpec.of({"plugin": "sft", "model": "tiny", "dataset": "notes", "params": {"max_steps": 20}})
    runs.submit(settings, spec)          # checks what needs the workspace (plugin, model, dataset), then queues it
    command_line(spec)                   # 'lab run sft --model tiny --dataset notes --set max_steps=20'
    to_config(spec)                      # the same job as a run config file (YAML)

The four entry points build it: the Train page (its widgets are generated from the fields below), `lab run` and
`lab sweep` (one option set, generated from the fields), the API's `submit_job` (the spec as JSON) and a run config
file. A field added here appears in all four: its `option` says its flags, label and where the Train page shows it.
Checks that need no workspace live here (ranges, names, trackers); checks that do (the plugin's kind, the model and
the dataset) are in `lab.runs.submit`.
"""

from __future__ import annotations

import json
import math
import shlex
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from lab.errors import LabError

DEFAULT_EXPERIMENT = "default"
MAX_TIME_LIMIT_MIN = 60 * 24 * 30  # 30 days
MAX_MEMORY_GB = 1 << 16

# where the Train page shows a field (the top of the form is laid out by hand: method, model, dataset, priority)
TOP, RESOURCES, CLUSTER, GROUPING = "top", "Resources and retries", "Cluster (Slurm)", "Grouping"


def option(*flags: str, label: str, help: str, section: str = TOP, widget: str = "number",  # noqa: A002
           choices: tuple = ()) -> dict:
    """How a field is offered: its command-line flags (the first is the long one), the Train page's label, widget
    (number, text, dropdown, checkboxes) and section, and the help text both show."""
    return {"flags": list(flags), "label": label, "help": help, "section": section, "widget": widget,
            "choices": list(choices)}


def _whole(value, what: str, low: int | None = None, high: int | None = None):
    """A whole number (not a bool, not 2.5), within [low, high] when they are given."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or (low is not None and not low <= value <= high):
        within = f" from {low} to {high}" if low is not None else ""
        raise LabError(f"{what} must be a whole number{within}, got {value!r}")
    return value


# the checks of the fields that need more than their type: what each is called in a message, and its range
WHOLE = {"priority": ("priority", None, None), "max_attempts": ("max attempts", 1, 20),
         "processes": ("processes", 1, 64), "devices": ("devices", 0, 64), "nodes": ("nodes", 1, 1024)}
POSITIVE = {"time_limit_min": (MAX_TIME_LIMIT_MIN, f"the time limit must be a number of minutes above 0 and at most "
                               f"{MAX_TIME_LIMIT_MIN:,} (30 days)", "leave it empty for no limit"),
            "memory_gb": (MAX_MEMORY_GB, f"memory must be a number of GB above 0 and at most {MAX_MEMORY_GB}", None)}
NAMES = {"experiment": "experiment", "group": "group", "tags": "tag"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class FollowUp(BaseModel):
    """An evaluation queued on a training run's output once it completes."""

    model_config = ConfigDict(extra="forbid")
    plugin: str
    dataset: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class JobSpec(BaseModel):
    """Everything that says what a job is and how it runs. Defaults are what a user gets without saying."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    plugin: str = Field(json_schema_extra=option(label="Method (plugin)", help="Plugin id (see `lab plugins list`)."))
    model: str | None = Field(None, json_schema_extra=option(
        "--model", "-m", label="Base model", help="Registered model or run output.", widget="dropdown"))
    dataset: str | None = Field(None, json_schema_extra=option(
        "--dataset", "-d", label="Dataset", help="Registered dataset.", widget="dropdown"))
    experiment: str = Field(DEFAULT_EXPERIMENT, json_schema_extra=option(
        "--experiment", "-e", label="Experiment", help="The experiment the run belongs to.", widget="text"))
    params: dict[str, Any] = Field(default_factory=dict, json_schema_extra=option(
        "--set", "-s", label="Parameters", help="Parameter as key=value; repeatable.", widget="form"))
    priority: int = Field(0, json_schema_extra=option("--priority", label="Priority", help="Higher runs first."))
    max_attempts: int = Field(1, json_schema_extra=option(
        "--max-attempts", label="Attempts", section=RESOURCES,
        help="Starts allowed: a killed or lost job is retried from its last checkpoint."))
    time_limit_min: float | None = Field(None, json_schema_extra=option(
        "--time-limit", label="Time limit (minutes)", section=RESOURCES,
        help="Minutes one attempt may run; past them the job writes a checkpoint and fails as timeout (empty: none)."))
    processes: int = Field(1, json_schema_extra=option(
        "--processes", label="Processes", section=RESOURCES,
        help="Run data-parallel in this many processes (torchrun); sft, pretrain, classify."))
    devices: int | None = Field(None, json_schema_extra=option(
        "--devices", label="Accelerators", section=RESOURCES, widget="dropdown", choices=("auto", *range(9)),
        help="Accelerators the job needs (auto: one per process on a worker with GPUs, else none)."))
    report_to: str | None = Field(None, json_schema_extra=option(
        "--report-to", label="Report to", section=RESOURCES, widget="checkboxes",
        choices=("wandb", "tensorboard", "trackio", "mlflow"),
        help="Trackers beside the lab's own metrics: wandb, tensorboard, trackio, mlflow (comma-separated) or none "
             "(empty: LAB_REPORT_TO)."))
    nodes: int = Field(1, json_schema_extra=option(
        "--nodes", label="Nodes", section=CLUSTER,
        help="Spread a data-parallel job over this many nodes (a Slurm worker runs it)."))
    memory_gb: float | None = Field(None, json_schema_extra=option(
        "--memory-gb", label="Memory per node (GB)", section=CLUSTER,
        help="Memory per node of a Slurm job, in GB (empty: LAB_SLURM_MEMORY_GB or the cluster's default)."))
    then_eval: FollowUp | None = Field(None, json_schema_extra=option(
        "--then-eval", label="Evaluation to queue on the output when the run completes", widget="follow-up",
        help="An eval plugin to run on the output (--eval-dataset, --eval-set give its dataset and parameters)."))
    group: str | None = Field(None, json_schema_extra=option(
        "--group", label="Group name (optional)", section=GROUPING, widget="text",
        help="A group of runs compared together (a sweep's name)."))
    tags: list[str] = Field(default_factory=list, json_schema_extra=option(
        "--tag", label="Tags", section=GROUPING, widget="text", help="Labels to find the run by; repeatable."))

    @model_validator(mode="before")
    @classmethod
    def _older_names(cls, data):
        """Config files written before the spec say `time_limit` (minutes) and may list trackers."""
        if isinstance(data, dict) and "time_limit" in data:
            data = {**data}
            if "time_limit_min" in data:
                raise LabError("give time_limit or time_limit_min, not both")
            data["time_limit_min"] = data.pop("time_limit")
        return data

    @field_validator("plugin")
    @classmethod
    def _plugin(cls, value):
        if not value:
            raise LabError("which plugin? `lab run PLUGIN ...`, `lab run --config FILE` or `lab run --from-job-json "
                           "PATH`")
        return value

    @field_validator("model", "dataset", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return value or None

    @field_validator(*WHOLE, mode="before")
    @classmethod
    def _whole_number(cls, value, info: ValidationInfo):
        what, low, high = WHOLE[info.field_name]
        return None if info.field_name == "devices" and value in (None, "", "auto") else _whole(value, what, low, high)

    @field_validator(*POSITIVE, mode="before")
    @classmethod
    def _positive(cls, value, info: ValidationInfo):
        """Empty means none; otherwise a number above 0 and at most the field's limit."""
        if value is None or value == "":
            return None
        high, message, hint = POSITIVE[info.field_name]
        if not (_number(value) and 0 < value <= high):
            raise LabError(f"{message}, got {value!r}", hint)
        return float(value)

    @field_validator(*NAMES, mode="before")
    @classmethod
    def _name(cls, value, info: ValidationInfo):
        """Names safe in a folder and a URL; the experiment's empty is the default, tags may be comma-separated."""
        from lab.workspace import check_name

        what = NAMES[info.field_name]
        if info.field_name == "tags":
            if isinstance(value, str):
                value = [t.strip() for t in value.split(",") if t.strip()]
            return [check_name(t, what) for t in value or []]
        return check_name(value, what) if value else (DEFAULT_EXPERIMENT if what == "experiment" else None)

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value):
        """None: the settings' default; otherwise the chosen trackers, comma-separated ('none' for none)."""
        from lab import trackers

        if value is None:
            return None
        chosen = trackers.parse(value)
        return ",".join(chosen) if chosen else "none"

    @field_validator("then_eval", mode="before")
    @classmethod
    def _then_eval(cls, value):
        return value or None

    @model_validator(mode="after")
    def _resources(self):
        if self.devices and self.processes > 1 and self.devices != self.processes:
            raise LabError(f"a data-parallel job runs one process per device: devices={self.devices} but "
                           f"processes={self.processes}", "give the same number for both, or devices=0 to run on CPU")
        return self

    @classmethod
    def of(cls, data: dict | JobSpec, where: str = "the job") -> JobSpec:
        """A spec from a mapping (API JSON, a config file, the Train form); an unknown key or a wrong type is a
        LabError that names it."""
        if isinstance(data, JobSpec):
            return data
        if not isinstance(data, dict):
            raise LabError(f"{where} must be a mapping of {', '.join(FIELDS)}, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _refused(exc, where) from None

    def changed(self) -> dict:
        """The fields that differ from their defaults (what a command line or a config file says)."""
        return self.model_dump(mode="json", exclude_defaults=True)


FIELDS = tuple(JobSpec.model_fields)


def meta(name: str) -> dict:
    """A field's option: flags, label, help, section, widget, choices."""
    return JobSpec.model_fields[name].json_schema_extra


def value_type(name: str) -> type:
    """int, float, str or list: the type a field holds (None aside); object for params and then_eval."""
    kind = JobSpec.model_fields[name].annotation
    origin = getattr(kind, "__origin__", None)
    if origin in (list, dict):
        return list if origin is list else object
    for t in (int, float, str):
        if kind is t or t in getattr(kind, "__args__", ()) or getattr(kind, "__origin__", None) is t:
            return t
    return object


def default(name: str) -> Any:
    return JobSpec.model_fields[name].get_default(call_default_factory=True)


def check_partial(data: dict, where: str) -> dict:
    """Check the keys a config file gives (every one optional there: the command line may give the rest); returns
    them, normalised."""
    if not isinstance(data, dict):
        raise LabError(f"{where} must hold a mapping of keys ({', '.join(FIELDS)}), got {type(data).__name__}")
    data = JobSpec._older_names(data)
    probe = JobSpec.model_construct(plugin="-")
    out = {}
    for key, value in data.items():
        if key not in JobSpec.model_fields:
            raise LabError(f"unknown key `{key}` in {where} (known: {', '.join(FIELDS)})")
        try:
            setattr(probe, key, value)
        except ValidationError as exc:
            raise _refused(exc, where) from None
        except LabError as exc:
            message = exc.message.removeprefix(f"{key}: ")
            raise LabError(f"`{key}` in {where}: {message}", exc.hint) from None
        out[key] = getattr(probe, key)
    return out


def merge(*layers: dict) -> JobSpec:
    """Later layers override earlier ones, key by key; `params` merge key by key too. None means 'not given'."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is None:
                continue
            if key == "params":
                out["params"] = {**out.get("params", {}), **value}
            elif key == "then_eval" and isinstance(value, FollowUp):
                out[key] = value.model_dump()
            else:
                out[key] = value
    return JobSpec.of(out)


def _refused(exc: ValidationError, where: str) -> LabError:
    problems = []
    for err in exc.errors():
        at = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = FollowUp.model_fields if err["loc"][0] == "then_eval" else FIELDS
            problems.append(f"unknown key `{at}` in {where} (known: {', '.join(known)})")
        elif err["type"] == "missing":
            problems.append(f"`{at}` is missing in {where}")
        else:
            problems.append(f"`{at}` in {where}: {err['msg']}")
    return LabError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def command_line(spec: JobSpec, grid: dict[str, list] | None = None) -> str:
    """The `lab run` (or, with a grid, `lab sweep`) command that queues the same job: only what differs from the
    defaults, in the fields' order."""
    parts = ["lab", "sweep" if grid else "run", spec.plugin]
    given = spec.changed()
    given.setdefault("experiment", spec.experiment)  # said always: where the run lands
    for name in FIELDS:
        if name == "plugin" or name not in given:
            continue
        value = getattr(spec, name)
        flag = meta(name)["flags"][0]
        if name == "params":
            parts += [x for key, v in value.items() for x in ("--set", f"{key}={_text(v)}")]
        elif name == "tags":
            parts += [x for tag in value for x in ("--tag", tag)]
        elif name == "then_eval":
            parts += ["--then-eval", value.plugin]
            if value.dataset:
                parts += ["--eval-dataset", value.dataset]
            parts += [x for key, v in value.params.items() for x in ("--eval-set", f"{key}={_text(v)}")]
        elif isinstance(value, float):
            parts += [flag, f"{value:g}"]
        else:
            parts += [flag, str(value)]
    for key, values in (grid or {}).items():
        parts += ["--grid", f"{key}={','.join(_text(v) for v in values)}"]
    return shlex.join(parts)


def to_config(spec: JobSpec, grid: dict[str, list] | None = None) -> str:
    """The job as a run config file's YAML text (only what differs from the defaults); a sweep's grid as `grid`."""
    import yaml

    data = spec.changed()
    data["plugin"] = spec.plugin
    data["experiment"] = spec.experiment  # said always, as on the command line: where the run lands
    ordered = {k: data[k] for k in FIELDS if k in data}
    if grid:
        ordered["grid"] = {k: list(v) for k, v in grid.items()}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)
