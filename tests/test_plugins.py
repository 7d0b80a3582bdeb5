"""Plugin discovery and parameter validation (the same Params validate `--set`, the UI and job.json)."""

from __future__ import annotations

import pytest

from lab import plugins
from lab.errors import LabError, ValidationError
from lab.settings import load


def test_builtins_and_extra_plugins_are_found_the_same_way(ws):
    found, broken = plugins.discover(ws)
    assert found["sft"].origin == "built-in"
    assert found["sft"].accepts == ("chat", "alpaca", "prompt_completion")
    assert found["instant"].origin == "LAB_EXTRA_PLUGINS"
    assert broken == []


def test_a_broken_plugin_is_reported_not_fatal(ws, monkeypatch):
    monkeypatch.setenv("LAB_EXTRA_PLUGINS", "fake_plugins.instant,no_such_module,fake_plugins.instant")
    found, broken = plugins.discover(load())
    assert "instant" in found and "sft" in found
    assert any(line.startswith("no_such_module") for line in broken)
    assert any("already taken" in line for line in broken)


def test_unknown_plugin(ws):
    with pytest.raises(LabError, match="unknown plugin 'nope'"):
        plugins.get(ws, "nope")


def test_set_values_are_typed_by_params(ws):
    sft = plugins.get(ws, "sft")
    p = plugins.validate_params(sft, plugins.parse_sets(["learning_rate=1e-4", "max_steps=10", "use_lora=false",
                                                         "scheduler=cosine"]))
    assert (p.learning_rate, p.max_steps, p.use_lora, p.scheduler) == (1e-4, 10, False, "cosine")
    assert p.lora_r == 16  # default


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["learning_rate=-1"], "`learning_rate`: Input should be greater than 0 (got -1)"),
        (["max_steps=ten"], "`max_steps`: Input should be a valid integer"),
        (["lora_r=0"], "`lora_r`: Input should be greater than or equal to 1"),
        (["scheduler=sometimes"], "`scheduler`: Input should be 'linear', 'cosine'"),
        (["use_lora=perhaps"], "`use_lora`: Input should be a valid boolean"),
        (["eval_split=0.9"], "`eval_split`: Input should be less than 0.5"),
    ],
)
def test_bad_values_name_the_parameter(ws, sets, expected):
    with pytest.raises(ValidationError) as info:
        plugins.validate_params(plugins.get(ws, "sft"), plugins.parse_sets(sets))
    assert expected in str(info.value)


def test_unknown_parameter_is_an_error_for_plugins_without_passthrough(ws):
    with pytest.raises(ValidationError, match="unknown parameter `colour`"):
        plugins.validate_params(plugins.get(ws, "instant"), {"colour": "red"})


def test_sft_passes_real_sftconfig_arguments_through_and_refuses_others(ws):
    sft = plugins.get(ws, "sft")
    p = plugins.validate_params(sft, plugins.parse_sets(["adam_beta2=0.95", "max_grad_norm=0.5"]))
    assert p.extra_args == {"adam_beta2": 0.95, "max_grad_norm": 0.5}
    with pytest.raises(ValidationError, match="unknown parameter `adam_beta3`"):
        plugins.validate_params(sft, {"adam_beta3": "0.1"})
    with pytest.raises(ValidationError, match="`output_dir` is set by the lab"):
        plugins.validate_params(sft, {"output_dir": "/tmp/elsewhere"})
    with pytest.raises(ValidationError, match="SFTConfig refuses"):
        plugins.validate_params(sft, {"eval_strategy": "sometimes"})


@pytest.mark.parametrize("item", ["novalue", "=3", "a=1 a=2"])
def test_set_syntax_errors(item):
    with pytest.raises(LabError):
        plugins.parse_sets(item.split(" "))


def test_describe_params_gives_what_a_form_needs(ws):
    fields = {f["name"]: f for f in plugins.describe_params(plugins.get(ws, "sft"))}
    assert fields["learning_rate"]["bounds"] == {"gt": 0, "le": 1}
    assert fields["learning_rate"]["default"] == 2e-4 and fields["learning_rate"]["description"]
    assert fields["scheduler"]["choices"] == ["linear", "cosine", "constant", "constant_with_warmup"]
    assert fields["lora_dropout"]["advanced"] and not fields["lora_r"]["advanced"]
    assert all(f["description"] for f in fields.values()), "every parameter has help text"


def test_plugins_are_discovered_once_per_process(ws, monkeypatch):
    calls = []
    real = plugins.metadata.entry_points
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    plugins._discover.cache_clear()
    for _ in range(5):
        assert plugins.get(ws, "sft").id == "sft"
    assert len(calls) == 1
    monkeypatch.setenv("LAB_EXTRA_PLUGINS", "fake_plugins.instant")
    plugins.discover(load())  # another set of extra plugins: a second scan, once
    plugins.discover(load())
    assert len(calls) == 2


TRAINERS = ("pretrain", "sft", "classify", "reward", "ppo", "dpo", "orpo", "kto", "grpo")
OWN = {"grpo": {"num_generations": 4}}  # arguments the plugin itself gives its configuration
REQUIRED = {"ppo": {"reward_model": "r"}, "grpo": {"length_target": 3}}  # checked for presence before queueing


@pytest.mark.parametrize("plugin_id", TRAINERS)
def test_every_trainer_takes_the_shared_fields_and_passes_further_arguments_through(ws, tmp_path, plugin_id):
    """The shared groups reach each trainer's own configuration class, and `extra_args` wins over the lab's
    choices; an unknown or reserved name is refused before queueing."""
    from lab.sdk import RunContext

    plugin = plugins.get(ws, plugin_id)
    fields = plugin.params.model_fields
    assert {"learning_rate", "seed", "batch_size", "precision", "extra_args"} <= set(fields)
    shared = {"learning_rate": 3e-4, "seed": 7, "extra_args": {"max_grad_norm": 0.25}, **REQUIRED.get(plugin_id, {})}
    if "weight_decay" in fields:
        shared |= {"weight_decay": 0.03, "grad_accum": 2, "warmup_steps": 3, "scheduler": "constant"}
    if plugin_id == "grpo":
        shared["batch_size"] = 4
    params = plugins.validate_params(plugin, {**shared, "logging_steps": 3} if "logging_steps" in fields else shared)
    ctx = RunContext(settings=ws, job_id=1, plugin=plugin_id, experiment="default", run_dir=tmp_path)
    config = ctx.trainer_args(plugin.config_class(), params, **OWN.get(plugin_id, {}))
    assert (config.learning_rate, config.seed, config.max_grad_norm) == (3e-4, 7, 0.25)
    if "weight_decay" in fields:
        assert (config.weight_decay, config.gradient_accumulation_steps, config.warmup_steps) == (0.03, 2, 3)
        assert getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type) == "constant"
    theirs = plugins.validate_params(plugin, {**shared, "extra_args": {"learning_rate": 1e-3}})
    assert ctx.trainer_args(plugin.config_class(), theirs, **OWN.get(plugin_id, {})).learning_rate == 1e-3
    assert plugin.passthrough  # an unknown --set name goes to extra_args, and is checked there
    with pytest.raises(ValidationError, match="unknown parameter `adam_beta3`"):
        plugins.validate_params(plugin, {"adam_beta3": "0.1", **REQUIRED.get(plugin_id, {})})
    with pytest.raises(ValidationError, match="`output_dir` is set by the lab"):
        plugins.validate_params(plugin, {"extra_args": {"output_dir": "/tmp/x"}, **REQUIRED.get(plugin_id, {})})


@pytest.mark.parametrize("plugin_id", ["sft", "classify", "reward", "dpo", "orpo", "kto", "grpo"])
def test_every_lora_trainer_builds_its_adapter_from_the_same_fields(ws, tmp_path, plugin_id):
    from lab.sdk import RunContext

    plugin = plugins.get(ws, plugin_id)
    params = plugins.validate_params(plugin, {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                              "lora_target": "q_proj,v_proj",
                                              **({"length_target": 3} if plugin_id == "grpo" else {})})
    ctx = RunContext(settings=ws, job_id=1, plugin=plugin_id, experiment="default", run_dir=tmp_path)
    config = ctx.lora(params)
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules)) == (
        4, 8, 0.1, {"q_proj", "v_proj"})
    off = plugins.validate_params(plugin, {"use_lora": False, **({"length_target": 3} if plugin_id == "grpo" else {})})
    assert ctx.lora(off) is None


def test_a_form_lists_the_methods_own_fields_before_the_shared_ones(ws):
    names = [f["name"] for f in plugins.describe_params(plugins.get(ws, "dpo")) if not f["advanced"]]
    assert names[:3] == ["loss_type", "beta", "max_length"]
    assert names.index("learning_rate") < names.index("use_lora") < names.index("eval_split")


def test_a_named_model_must_be_registered_and_of_the_fields_kind(ws, tiny_model_dir):
    from lab import registry

    registry.add_folder(ws, "tiny", tiny_model_dir)
    gen = plugins.get(ws, "generate")
    params = plugins.validate_params(gen, {"also_models": "ghost"})
    assert plugins.named_model_problems(gen, params, ws) == ["`also_models`: no model named 'ghost'"]
    judge = plugins.get(ws, "eval-judge")
    params = plugins.validate_params(judge, {"judge": "tiny", "against": "tiny"})
    assert plugins.named_model_problems(judge, params, ws) == []
    assert plugins.model_names(judge, params) == {"judge": ["tiny"], "against": ["tiny"]}
