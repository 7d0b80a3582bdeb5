"""Plugin discovery and parameter validation.

A plugin is a module with:
    ID: str                  unique id, used in `lab run ID`
    KIND: str                "train", "eval", "data" (its output is a dataset: generate, synthesize) or "tool" (an
                             export or an import: started from the Models page and `lab models`, not Train)
    ACCEPTS: tuple[str, ...] dataset formats it takes (see lab.formats); () when it needs no dataset
    Params: pydantic model   every parameter with default, bounds and description
    run(ctx, params)         does the work (lab.sdk.RunContext)
and optionally DESCRIPTION (else the docstring's first line), NEEDS_MODEL (True, False or "optional";
default True), NEEDS_DATASET ("optional" when a dataset in an accepted format may be left out), CONFIG (the trainer
configuration class `extra_args` go to, "trl.DPOConfig"), RESERVED (its configuration arguments the lab sets from the
plugin's own fields, besides the common RESERVED below), PASSTHROUGH (whether unknown `--set` names go to
`params.extra_args`; default: when Params has that field), RESUMABLE (False for a trainer that cannot resume from a
checkpoint: its jobs take no retries), MODEL_KINDS (the registry kinds it starts from; default full and
adapter), check(params) -> list of problems, and check_inputs(params, model, dataset, settings) -> list of
problems (model and dataset as registry dicts, or None), both run before queueing. The shared parameter groups and
`model_field` are in lab.params.

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
from typing import Any

import pydantic
from pydantic import BaseModel

from lab.errors import LabError, ValidationError
from lab.params import TrainParams, advanced, ordered_fields  # noqa: F401 (TrainParams, advanced: for plugins)
from lab.settings import Settings

BUILTINS = ("plugins.pretrain", "plugins.sft", "plugins.classify", "plugins.reward", "plugins.ppo", "plugins.dpo",
            "plugins.orpo", "plugins.kto", "plugins.grpo", "plugins.eval_perplexity", "plugins.eval_generate",
            "plugins.eval_reward", "plugins.eval_preference", "plugins.eval_classify", "plugins.eval_fewshot",
            "plugins.eval_harness", "plugins.generate", "plugins.eval_judge", "plugins.synthesize",
            "plugins.export_hf", "plugins.export_gguf", "plugins.import_gguf", "plugins.merge")
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
        return passed_through_problems(self, params) + (list(check(params)) if check else [])

    def config_class(self) -> type | None:
        """The trainer configuration class its `extra_args` go to (module attribute CONFIG, "package.Class")."""
        name = getattr(self.module, "CONFIG", None)
        if not name:
            return None
        import warnings

        from lab.dependencies import IMPORTS

        module_name, _, cls = name.rpartition(".")
        with IMPORTS, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. TRL's note that its experimental package may change
            return getattr(importlib.import_module(module_name), cls)

    def check_inputs(self, params: BaseModel, model: dict | None, dataset: dict | None, settings) -> list[str]:
        problems = []
        if model is not None and model["kind"] not in self.model_kinds:
            problems.append(f"model {model['name']} is a {model['kind']} model; {self.id} starts from "
                            f"{' or '.join(self.model_kinds)} models")
        problems += named_model_problems(self, params, settings)
        check = getattr(self.module, "check_inputs", None)
        return problems + (list(check(params, model, dataset, settings)) if check and not problems else [])


def model_names(plugin: Plugin, params: BaseModel) -> dict[str, list[str]]:
    """The registered models its parameters name (fields made with lab.params.model_field), by field."""
    out = {}
    for name, f in plugin.params.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("widget") in ("model", "models"):
            out[name] = [n.strip() for n in str(getattr(params, name) or "").split(",") if n.strip()]
    return out


def model_kinds_of(plugin: Plugin, field_name: str) -> tuple[str, ...]:
    extra = plugin.params.model_fields[field_name].json_schema_extra
    kind = extra.get("model_kind") if isinstance(extra, dict) else None
    return tuple(kind.split("|")) if kind else ()


def named_model_problems(plugin: Plugin, params: BaseModel, settings) -> list[str]:
    """Each model a parameter names must be registered, and of a kind the field takes."""
    from lab import registry

    problems = []
    for field_name, names in model_names(plugin, params).items():
        kinds = model_kinds_of(plugin, field_name)
        for name in names:
            try:
                info = registry.info(settings, name)
            except LabError:
                problems.append(f"`{field_name}`: no model named {name!r}")
                continue
            if kinds and info["kind"] not in kinds:
                wanted = (", not a reward model" if kinds == ("reward",) else
                          ": it scores text, it does not write any" if kinds == ("full", "adapter") else
                          f"; it takes {' or '.join(kinds)} models")
                problems.append(f"`{field_name}`: {name} is a {info['kind']} model{wanted}")
    return problems


# configuration arguments the lab sets itself for every trainer: passing them through would break the run's folder
# layout, its tracking or its device
RESERVED = frozenset({"output_dir", "report_to", "run_name", "logging_dir", "use_cpu", "disable_tqdm", "push_to_hub",
                      "hub_token", "hub_model_id", "project", "save_total_limit"})


def passed_through_problems(plugin: Plugin, params: BaseModel) -> list[str]:
    """Before queueing: every `extra_args` name must be an argument of the plugin's trainer configuration that the
    lab does not set itself (RESERVED, and the plugin's own RESERVED), and the configuration must accept the values."""
    extra = getattr(params, "extra_args", None)
    if not extra:
        return []
    config_cls = plugin.config_class()
    if config_cls is None:
        return [f"`extra_args`: {plugin.id} has no trainer configuration to pass arguments to"]
    import dataclasses
    import tempfile

    known = {f.name for f in dataclasses.fields(config_cls)}
    reserved = RESERVED | set(getattr(plugin.module, "RESERVED", ()))
    problems = [f"unknown parameter `{k}` (neither a {plugin.id} parameter nor a {config_cls.__name__} argument)"
                for k in extra if k not in known]
    problems += [f"`{k}` is set by the lab and cannot be passed through" for k in extra if k in reserved]
    if not problems:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                config_cls(output_dir=tmp, use_cpu=True, report_to=[], **extra)
        except (TypeError, ValueError) as exc:
            problems.append(f"{config_cls.__name__} refuses the extra arguments: {exc}")
    return problems


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
        passthrough=getattr(module, "PASSTHROUGH", "extra_args" in module.Params.model_fields),
        example=_example(doc),
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
    for name in ordered_fields(plugin.params):
        f = plugin.params.model_fields[name]
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
