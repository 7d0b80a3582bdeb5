"""Plugin discovery and parameter validation.

A plugin is a module with:
    ID: str                  unique id, used in `lab run ID`
    KIND: str                "train", "eval", "data" (its output is a dataset: generate, synthesize) or "tool" (an
                             export or an import: started from the Models page and `lab models`, not Train)
    ACCEPTS: tuple[str, ...] dataset formats it takes (see lab.formats); () when it needs no dataset
    Params: pydantic model   every parameter with default, bounds and description
    run(ctx, params)         does the work (lab.sdk.RunContext)
and optionally DESCRIPTION (else the docstring's first line), NEEDS_MODEL (True, False or "optional";
default True), NEEDS_DATASET ("optional" when a dataset in an accepted format may be left out), PASSTHROUGH (True when
unknown `--set` names go to `params.extra_args`), RESUMABLE (False for a trainer that cannot resume from a
checkpoint: its jobs take no retries), MODEL_KINDS (the registry kinds it starts from; default full and
adapter), check(params) -> list of problems, and check_inputs(params, model, dataset, settings) -> list of
problems (model and dataset as registry dicts, or None), both run before queueing.

Built-ins are found exactly like third-party plugins: a list of module names, plus the `lab.plugins` entry-point
group, plus `LAB_EXTRA_PLUGINS`.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, Field

from lab.errors import LabError, ValidationError
from lab.settings import Settings

BUILTINS = ("plugins.pretrain", "plugins.sft", "plugins.classify", "plugins.reward", "plugins.ppo", "plugins.dpo",
            "plugins.orpo", "plugins.kto", "plugins.grpo", "plugins.eval_perplexity", "plugins.eval_generate",
            "plugins.eval_reward", "plugins.eval_preference", "plugins.eval_classify", "plugins.eval_fewshot",
            "plugins.generate", "plugins.eval_judge", "plugins.synthesize", "plugins.export_hf", "plugins.export_gguf",
            "plugins.import_gguf")
ENTRY_POINT_GROUP = "lab.plugins"
KINDS = ("train", "eval", "data", "tool")


@dataclass(frozen=True)
class Plugin:
    id: str
    kind: str
    description: str
    accepts: tuple[str, ...]
    params: type[BaseModel]
    module: types.ModuleType
    origin: str  # "built-in", "entry point <dist>", or "LAB_EXTRA_PLUGINS"
    needs_model: bool | str = True  # True, False, or "optional"
    passthrough: bool = False
    model_kinds: tuple[str, ...] = ("full", "adapter")
    example: str = field(default="")
    distributed: bool = False  # runs data-parallel under torchrun when a job asks for processes > 1
    resumable: bool = True  # a retried or interrupted job resumes from its last checkpoint (else it starts over)
    dataset_optional: bool = False  # NEEDS_DATASET = "optional": it reads a dataset when given one

    @property
    def needs_dataset(self) -> bool:
        return bool(self.accepts)

    def run(self, ctx, params: BaseModel) -> None:
        self.module.run(ctx, params)

    def check(self, params: BaseModel) -> list[str]:
        check = getattr(self.module, "check", None)
        return list(check(params)) if check else []

    def check_inputs(self, params: BaseModel, model: dict | None, dataset: dict | None, settings) -> list[str]:
        problems = []
        if model is not None and model["kind"] not in self.model_kinds:
            problems.append(f"model {model['name']} is a {model['kind']} model; {self.id} starts from "
                            f"{' or '.join(self.model_kinds)} models")
        check = getattr(self.module, "check_inputs", None)
        return problems + (list(check(params, model, dataset, settings)) if check and not problems else [])


def advanced(widget: str | None = None, **kw) -> dict:
    """Field arguments for a parameter that forms fold away: `Field(default, **advanced(ge=0, description=...))`;
    `widget="slider"` asks for a slider."""
    return {"json_schema_extra": {"advanced": True, "widget": widget}, **kw}


class TrainParams(BaseModel):
    """Parameters every trainer plugin shares (subclass it: `class Params(TrainParams)`): its checkpoints."""

    save_steps: int = Field(0, **advanced(ge=0, description="Also checkpoint every this many steps; 0: by time only."))
    save_minutes: float = Field(10.0, **advanced(
        ge=0, le=10080, description="Checkpoint after this many minutes of training since the last checkpoint (and "
        "always when the job is stopped), so an interrupted or retried job resumes; 0: only every save_steps."))
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", **advanced(
        description="Recompute activations in the backward pass instead of keeping them: less memory, about a third "
        "more compute. auto: on only when they would take over a quarter of the free memory."))
    profile_steps: int = Field(0, **advanced(
        ge=0, le=10, description="Record this many training steps (after the first) with the torch profiler: the "
        "run's profile.txt lists the ops that took the time, profile.json.gz is a trace for Perfetto, and the metric "
        "profile/matmul_share is the part of the step time in matrix multiplications. 0: off."))


def _example(doc: str) -> str:
    return next((line.strip() for line in doc.splitlines() if line.strip().startswith("lab run")), "")


def _load(module_name: str, origin: str) -> Plugin:
    module: PluginModule = importlib.import_module(module_name)
    missing = [a for a in ("ID", "KIND", "ACCEPTS", "Params", "run") if not hasattr(module, a)]
    if missing:
        raise LabError(f"plugin module {module_name} lacks {', '.join(missing)}")
    if module.KIND not in KINDS:
        raise LabError(f"plugin {module.ID}: KIND must be one of {KINDS}, got {module.KIND!r}")
    if not (isinstance(module.Params, type) and issubclass(module.Params, BaseModel)):
        raise LabError(f"plugin {module.ID}: Params must be a pydantic model")
    doc = module.__doc__ or ""
    return Plugin(
        id=module.ID, kind=module.KIND, accepts=tuple(module.ACCEPTS), params=module.Params, module=module,
        description=getattr(module, "DESCRIPTION", None) or (doc.strip().splitlines() or [""])[0],
        origin=origin, needs_model=getattr(module, "NEEDS_MODEL", True),
        passthrough=getattr(module, "PASSTHROUGH", False), example=_example(doc),
        model_kinds=tuple(getattr(module, "MODEL_KINDS", ("full", "adapter"))),
        distributed=bool(getattr(module, "DISTRIBUTED", False)),
        resumable=bool(getattr(module, "RESUMABLE", True)),
        dataset_optional=getattr(module, "NEEDS_DATASET", True) == "optional",
    )


class PluginModule(typing.Protocol):
    """The contract a plugin module meets (checked when it is loaded; the optional names are in this module's
    docstring)."""

    ID: str
    KIND: str
    ACCEPTS: tuple[str, ...]
    Params: type[BaseModel]

    def run(self, ctx, params: BaseModel) -> None: ...


def discover(settings: Settings) -> tuple[dict[str, Plugin], list[str]]:
    """All plugins by id, and one line per plugin that failed to load (a broken plugin never breaks the lab).
    Found once per process for each set of extra plugin modules."""
    found, broken = _discover(tuple(settings.extra_plugins))
    return dict(found), list(broken)


@functools.lru_cache(maxsize=8)
def _discover(extra_plugins: tuple[str, ...]) -> tuple[dict[str, Plugin], list[str]]:
    sources = [(m, "built-in") for m in BUILTINS]
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        sources.append((ep.value.split(":")[0], f"entry point {ep.dist.name if ep.dist else ep.name}"))
    sources += [(m, "LAB_EXTRA_PLUGINS") for m in extra_plugins]
    found: dict[str, Plugin] = {}
    broken: list[str] = []
    for module_name, origin in sources:
        try:
            plugin = _load(module_name, origin)
        except Exception as exc:
            broken.append(f"{module_name} ({origin}): {exc}")
            continue
        if plugin.id in found:
            broken.append(f"{module_name} ({origin}): id {plugin.id!r} is already taken by {found[plugin.id].origin}")
            continue
        found[plugin.id] = plugin
    return found, broken


def get(settings: Settings, plugin_id: str) -> Plugin:
    found, _ = discover(settings)
    if plugin_id not in found:
        raise LabError(f"unknown plugin {plugin_id!r}", f"available: {', '.join(sorted(found)) or '(none)'}")
    return found[plugin_id]


def parse_sets(items: list[str]) -> dict[str, str]:
    """`key=value` strings from the command line, as a dict of strings; types come from the plugin's Params."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LabError(f"--set expects key=value, got {item!r}")
        if key in out:
            raise LabError(f"--set {key} is given twice")
        out[key] = value
    return out


def _wants_json(annotation: Any) -> bool:
    """True for dict/list fields, whose command-line value is JSON."""
    origin = typing.get_origin(annotation) or annotation
    if origin in (typing.Union, types.UnionType):
        return any(_wants_json(a) for a in typing.get_args(annotation))
    return origin in (dict, list, tuple)


def _from_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _problem(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(parameters)"
    if err["type"] == "extra_forbidden":
        return f"unknown parameter `{where}`"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got})" if isinstance(got, str) and got else f" (got {got!r})"
    return f"`{where}`: {err['msg']}{shown}"


MAX_INT = 2**53  # integers beyond this do not survive JSON (job.json, the API) unchanged
MAX_STEPS = 10**9
UNSUPPORTED = {"deepspeed": "DeepSpeed is not set up by the lab: it runs plugins in plain processes (torchrun for "
                            "processes > 1)", "fsdp": "FSDP is not set up by the lab"}


def _number_problems(values: dict, where: str = "") -> list[str]:
    """What pydantic's bounds miss: numbers that cannot be stored as checked (NaN, infinity, huge integers), seeds
    outside what numpy and torch take, step counts past any run, and settings the lab cannot honour."""
    problems = []
    for key, value in values.items():
        name = f"{where}{key}"
        if isinstance(value, dict):
            problems += _number_problems(value, f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"`{name}`: must be a finite number (got {value})")
        elif isinstance(value, int) and not isinstance(value, bool):
            if key == "seed" and not 0 <= value < 2**32:
                problems.append(f"`{name}`: a seed must be from 0 to {2**32 - 1} (got {value})")
            elif key == "max_steps" and value == 0:
                problems.append(f"`{name}`: 0 trains nothing: give a number of steps, or -1 to train for `epochs`")
            elif key.endswith("steps") and value > MAX_STEPS:
                problems.append(f"`{name}`: at most {MAX_STEPS:,} (got {value})")
            elif abs(value) > MAX_INT:
                problems.append(f"`{name}`: too large to store exactly (got {value})")
        if key in UNSUPPORTED and value not in (None, "", False, {}):
            problems.append(f"`{name}`: {UNSUPPORTED[key]}")
    return problems


def validate_params(plugin: Plugin, values: dict[str, Any]) -> BaseModel:
    """The plugin's Params from `values` (strings from `--set` or typed values from the UI and job.json)."""
    fields = plugin.params.model_fields
    typed: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in values.items():
        if key in fields:
            typed[key] = _from_text(value) if isinstance(value, str) and _wants_json(fields[key].annotation) else value
        elif plugin.passthrough:
            extra[key] = _from_text(value) if isinstance(value, str) else value
        else:
            typed[key] = value  # reported as unknown below
    if extra:
        typed["extra_args"] = {**(typed.get("extra_args") or {}), **extra}
    try:
        params = plugin.params.model_validate(typed)
    except pydantic.ValidationError as exc:
        problems = [_problem(e) for e in exc.errors()]
        raise ValidationError(f"invalid parameters for {plugin.id}:", problems,
                              hint=f"see `lab plugins show {plugin.id}` for every parameter") from None
    problems = _number_problems(params.model_dump()) or plugin.check(params)  # the plugin's own check may build
    # a trainer config from these values, which would fail on them with a less readable message
    if problems:
        raise ValidationError(f"invalid parameters for {plugin.id}:", problems,
                              hint=f"see `lab plugins show {plugin.id}` for every parameter")
    return params


def describe_params(plugin: Plugin) -> list[dict]:
    """One entry per parameter: name, type, default, bounds, description, and the form hints `advanced` (folded
    away), `widget` ("slider", "model" for the name of a registered model, "models" for several, comma-separated)
    and `model_kind` (which models a model widget offers, e.g. "reward" or "full|adapter"), which a field sets with
    json_schema_extra."""
    out = []
    for name, f in plugin.params.model_fields.items():
        bounds = {}
        for m in f.metadata:
            for attr in ("ge", "gt", "le", "lt"):
                if getattr(m, attr, None) is not None:
                    bounds[attr] = getattr(m, attr)
        annotation = f.annotation
        choices = list(typing.get_args(annotation)) if typing.get_origin(annotation) is typing.Literal else None
        type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        out.append({"name": name, "type": "choice" if choices else type_name, "choices": choices,
                    "default": f.get_default(call_default_factory=True), "bounds": bounds,
                    "description": f.description or "", "advanced": bool(extra.get("advanced")),
                    "widget": extra.get("widget"), "model_kind": extra.get("model_kind")})
    return out
