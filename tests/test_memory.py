"""The memory estimate by part (lab.memory): how each method lays out its worst step, what each part grows with,
the fits / tight / does-not-fit label and what it tells the user to change. Its constants are fitted and checked
against measured peaks in bench/memory.py, not here."""

from __future__ import annotations

import pytest
from conftest import lab_cli, write_jsonl

from lab import datasets, memory, preview, registry, runs, speed
from lab.errors import LabError
from lab.jobspec import JobSpec
from lab.ui import app
from lab.ui.tabs import train

CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000}


def test_each_method_lays_out_its_worst_step():
    assert memory.step_of("sft", {"batch_size": 4, "max_length": 128}, 500) == memory.Step(4, 128, flat=True)
    assert memory.step_of("sft", {"batch_size": 4, "max_length": 128, "batching": "padded"}, 90) == memory.Step(
        4, 90, flat=False)  # no row is longer than 90 tokens
    assert memory.step_of("sft", {"batch_size": 2, "max_length": 512, "packing": True}, 90) == memory.Step(
        2, 512, flat=True)  # packing fills every sequence
    assert memory.step_of("dpo", {"batch_size": 2, "max_length": 256}, 300) == memory.Step(4, 256, flat=False)
    assert memory.step_of("kto", {"batch_size": 2, "max_length": 256}, 300) == memory.Step(2, 256, flat=False)
    flat, padded = memory.Step(4, 128, flat=True), memory.Step(4, 128, flat=False)
    assert flat.tokens == padded.tokens and flat.attention_pairs == 4 * padded.attention_pairs


def test_each_part_grows_with_what_it_holds(monkeypatch):
    for name in ("ACTIVATION_COPIES", "ATTENTION_COPIES", "LOGIT_COPIES"):
        monkeypatch.setattr(memory, name, 1.0)
    step = memory.Step(2, 100, flat=False)
    lora = memory.parts(CONFIG, 10_000, 100, False, "sft", step)
    full = memory.parts(CONFIG, 10_000, 10_000, True, "sft", step)
    assert full["optimizer"] == 10_000 * 4 * memory.FULL_STATE and lora["optimizer"] == 100 * 4 * memory.LORA_STATE
    assert memory.parts(CONFIG, 10_000, 100, False, "reward", step)["logits"] == 0  # a score head
    double = memory.parts(CONFIG, 10_000, 100, False, "sft", memory.Step(2, 200, flat=False))
    assert double["activations"] == 2 * lora["activations"] and double["attention"] == 4 * lora["attention"]
    assert memory.parts(CONFIG, 10_000, 100, False, "sft", step, "bf16")["weights"] == lora["weights"] / 2


def test_the_label_and_what_to_change():
    assert [memory.verdict(n, 100) for n in (50, 79, 80, 100, 101)] == ["fits", "fits", "tight", "tight",
                                                                        "does not fit"]
    assert memory.verdict(50, None) == "unknown"
    step = memory.Step(4, 512, flat=True)
    advice = memory.remedies({"attention": 9, "optimizer": 5, "logits": 1}, "sft", True, step)
    assert advice[0].startswith("batching=padded") and any("use_lora" in a for a in advice)
    assert not any("use_lora" in a for a in memory.remedies({"optimizer": 5}, "sft", False, step))


@pytest.fixture
def page(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a " * 40, "completion": "b"}] * 4))
    return app.assemble(ws)[1].train


@pytest.mark.parametrize(("available", "label"), [(10**15, "**Fits**"), (10**3, "**Does not fit**"), (None,
                                                                                                    "**Memory**")])
def test_the_train_page_says_whether_the_run_fits_with_its_numbers(page, monkeypatch, available, label):
    monkeypatch.setattr(speed, "available_memory", lambda: available)
    monkeypatch.setattr(speed, "total_memory", lambda: available)
    spec = JobSpec.of({"plugin": "sft", "model": "tiny", "dataset": "facts", "params": {"batch_size": 8}})
    text = train.command_and_estimate(page, train.filled(spec, page.forms, [], None) | {"experiment": "default"})[
        "estimate"]
    assert text.startswith(label) and "weights" in text and "at the worst step (8 x" in text, text
    assert ("To need less" in text) == (label == "**Does not fit**")
    est = preview.estimate(page.ui.settings, "tiny", "facts", {"batch_size": 8, "max_length": 1024}, method="sft")
    assert sum(est["parts"].values()) == pytest.approx(est["memory_gb"] * 1e9, abs=1e6)


def test_a_launch_that_would_not_fit_is_refused_with_what_to_change(page, monkeypatch):
    s = page.ui.settings
    monkeypatch.setattr(speed, "total_memory", lambda: 300 * 10**6)  # less than the process alone
    spec = {"plugin": "sft", "model": "tiny", "dataset": "facts", "params": {"batch_size": 8}}
    with pytest.raises(LabError) as refused:
        runs.submit(s, spec)
    said = str(refused.value)
    assert "would need about" in said and "this machine's memory, 0.3 GB" in said, said
    assert "smaller batch_size" in said and "set memory_gb" in said and runs.list_jobs(s) == []
    out = train.launch(page, train.filled(JobSpec.of(spec), page.forms, [], None) | {"experiment": "default"})
    assert "Nothing was queued" in out["message"] and "would need about" in out["message"]
    assert runs.list_jobs(s) == []
    # what other jobs hold now is theirs only until they end: the launch compares with the whole machine
    monkeypatch.setattr(speed, "total_memory", lambda: 10**12)
    monkeypatch.setattr(speed, "available_memory", lambda: 300 * 10**6)
    assert runs.submit(s, spec)
    # a job that will run elsewhere says how much memory it will have there
    assert runs.submit(s, {**spec, "memory_gb": 64})
    # methods the estimate was not measured on are not refused
    assert runs.submit(s, {**spec, "plugin": "eval-perplexity", "params": {}})


def test_lab_run_refuses_a_run_bigger_than_the_memory_it_asks_for(page):
    done = lab_cli("run", "sft", "--model", "tiny", "--dataset", "facts", "--memory-gb", "0.1")
    assert done.returncode != 0 and "more than the 0.1 GB it asks for (memory_gb)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and runs.list_jobs(page.ui.settings) == []
