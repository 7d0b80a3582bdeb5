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
