"""Speed without side effects: a padding-free batch trains exactly like the padded one (no row attends to another
on this machine's attention), and every run says how much of its work was padding."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from jobs.worker import Worker
from lab import datasets, registry, runs

ROWS = [{"prompt": "Say " + " ".join(["red"] * n), "completion": " ".join(["blue"] * (n % 5 + 1))}
        for n in (1, 9, 3, 14, 2, 7, 11, 4)] * 8  # 64 rows: length grouping works on mega-batches of 4 batches


def test_a_padding_free_batch_gives_the_padded_batchs_loss_and_gradients(tiny_model_dir):
    """TRL's collator both ways, the model run as TRL's SFTTrainer runs it (no cache): the rows of a flattened
    batch must not see each other, or the loss would differ."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = []
    for n in (5, 17, 9, 12):  # the prompt's half of each row is not trained (-100)
        ids = torch.randint(5, 200, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    results = []
    for padding_free in (False, True):
        collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)
        batch = collate(rows)
        assert ("attention_mask" in batch) != padding_free and ("position_ids" in batch) == padding_free
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results.append((loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (padded_loss, padded_grad), (flat_loss, flat_grad) = results
    assert flat_loss == pytest.approx(padded_loss, rel=1e-5)
    assert torch.allclose(flat_grad, padded_grad, atol=1e-6)
    # and with a cache (as generation runs it) the rows would see each other: the check above can fail
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    with torch.no_grad():
        leaky = model(**batch, use_cache=True).loss.item()
    assert leaky != pytest.approx(padded_loss, rel=1e-3)


@pytest.fixture
def uneven(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "uneven", write_jsonl(tmp_path / "uneven.jsonl", ROWS))
    return ws


def _sft_job(s, **params) -> dict:
    """A completed SFT run of the tiny model on the uneven rows (fp32, batch 4, and `params`)."""
    chosen = {"batch_size": 4, "precision": "fp32", **params}
    job_id = runs.submit(s, "sft", model="tiny", dataset="uneven", params={k: str(v) for k, v in chosen.items()})
    Worker(s, say=lambda m: None).serve(once=True)
    job = runs.get_job(s, job_id)
    assert job["status"] == "completed", job["log_tail"]
    return job


def _sft(s, batching: str) -> dict:
    job_id = _sft_job(s, max_steps=4, batching=batching, seed=3)["id"]
    return runs.metrics(s, [job_id], ["loss", "padding_share", "num_tokens"])[job_id]


def test_every_sft_run_logs_its_padding_share_and_padding_free_trains_the_same_rows(uneven, jobs_worker):
    padded, flat, grouped = (_sft(uneven, b) for b in ("padded", "padding_free", "by_length"))
    assert all(0 < v < 1 for _, v, _ in padded["padding_share"]), padded["padding_share"]
    assert [v for _, v, _ in flat["padding_share"]] == [0.0] * 4
    assert max(v for _, v, _ in grouped["padding_share"]) < max(v for _, v, _ in padded["padding_share"])
    # the same rows in each step, whatever their layout: the same tokens and the same losses
    assert [v for _, v, _ in flat["num_tokens"]] == [v for _, v, _ in padded["num_tokens"]]
    # before any update the loss is the same to float precision; after it, Adam turns the float-order differences of
    # tiny gradients into visible ones (0.2 % by the 4th step on an AVX2 CPU, varying from run to run)
    assert flat["loss"][0][1] == pytest.approx(padded["loss"][0][1], rel=1e-5)
    for (_, a, _), (_, b, _) in zip(flat["loss"], padded["loss"], strict=True):
        assert a == pytest.approx(b, rel=1e-2), (flat["loss"], padded["loss"])


def test_reward_scores_in_length_sorted_batches_are_each_texts_own_score_in_the_callers_order(tiny_model_dir,
                                                                                              tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lab import evaluation

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    score = evaluation.reward_scorer(str(tmp_path / "rm"))
    prompts = [[{"role": "user", "content": "Say " + " ".join(["red"] * n)}] for n in (9, 1, 14, 3, 1, 7, 2, 11, 5)]
    answers = [" ".join(["blue"] * (n % 4 + 1)) for n in range(len(prompts))]
    together = score(prompts, answers)
    alone = [score([p], [a])[0] for p, a in zip(prompts, answers, strict=True)]
    assert together == pytest.approx(alone, abs=1e-4), "padding changes no score, and each lands in its place"
    assert len(set(round(v, 4) for v in alone)) > 1, "the texts score differently: the order is checked"


def test_without_bf16_instructions_auto_takes_fp32_and_bf16_is_refused(monkeypatch):
    from lab import speed
    from lab.errors import LabError

    monkeypatch.setattr(speed, "bf16_supported", lambda: False)
    said = []
    assert speed.choose_bf16("auto", None, None, said.append) is False  # no probe is run: there is nothing to test
    assert said == ["[lab] precision fp32 (no bf16 matrix instructions here)"]
    with pytest.raises(LabError, match="no bf16 matrix instructions"):
        speed.choose_bf16("bf16", None, None, said.append)
    assert speed.choose_bf16("fp32", None, None, said.append) is False


def test_a_run_asked_to_profile_records_its_steps_and_says_how_much_was_matrix_multiplication(uneven, jobs_worker):
    import gzip
    import json

    job = _sft_job(uneven, max_steps=5, profile_steps=2)
    found = runs.metrics(uneven, [job["id"]], ["profile/step_s", "profile/matmul_share"])[job["id"]]
    [(step, share, _)] = found["profile/matmul_share"]
    assert step == 3, "steps 2 and 3 profiled: the first warms up"
    assert 0 < share < 1 and 0 < found["profile/step_s"][0][1] < 60
    run_dir = Path(job["run_dir"])
    text = (run_dir / "profile.txt").read_text()
    assert text.startswith("2 training step(s) profiled (steps 2-3)") and "aten::mm" in text, text[:500]
    assert f"{100 * share:.1f} % of it in matrix multiplications" in text
    with gzip.open(run_dir / "profile.json.gz", "rt") as trace:
        assert "traceEvents" in json.load(trace)
    assert not list(run_dir.glob(".*")), "published by one rename, nothing left behind"
    log = (run_dir / "log.txt").read_text()
    assert "[lab] profiled 2 step(s)" in log and "profiler_st" not in log, "no lines of the profiler's own"
    assert re.search(r"\[lab\] gradient checkpointing off \(auto: about \d+ MB of activations for 4 x 1024 tokens, "
                     r"[\d.]+ GB free, under a quarter of it\)", log), log


def test_matmul_time_counts_each_multiplication_once_even_inside_another():
    from types import SimpleNamespace

    from lab.speed import matmul_seconds

    def event(name, us, parent=None):
        return SimpleNamespace(name=name, cpu_time_total=us, device_time_total=us / 2, cpu_parent=parent)

    step = event("ProfilerStep", 100)
    linear = event("aten::linear", 30, step)
    outer = event("aten::addmm", 25, linear)
    inner = event("aten::mm", 20, event("aten::something", 21, outer))  # inside the addmm: already counted
    alone = event("aten::bmm", 7, step)
    events = [step, linear, outer, inner.cpu_parent, inner, alone, event("aten::add", 9, step)]
    assert matmul_seconds(events) == pytest.approx(32e-6)
    assert matmul_seconds(events, on_gpu=True) == pytest.approx(16e-6), "on a GPU: the kernels' time"
    x = torch.randn(64, 64, requires_grad=True)
    with torch.profiler.profile() as profile:  # and on real events: a part of the time, never more than all
        (torch.nn.Linear(64, 64)(x) @ x).sum().backward()
    real = profile.events()
    assert 0 < matmul_seconds(real) <= sum(e.cpu_time_total for e in real if e.cpu_parent is None) / 1e6


def test_gradient_checkpointing_is_on_only_where_the_activations_need_the_memory(ws, tiny_model_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from lab import speed
    from lab.sdk import RunContext
    from plugins import sft

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    c = model.config
    need = speed.activation_bytes(c.hidden_size, c.num_hidden_layers, c.vocab_size, 4, 256, c.num_attention_heads,
                                  "sft", sft.Params(batch_size=4, max_length=256).model_dump())
    ctx = RunContext(settings=ws, job_id=1, plugin="sft", experiment="default", run_dir=tmp_path)

    def checkpointing(free, **chosen) -> bool:
        monkeypatch.setattr(speed, "available_memory", lambda: free)
        params = sft.Params(batch_size=4, max_length=256, **chosen)
        with warnings.catch_warnings():  # the lab sets transformers' new name: no deprecation warning in the log
            warnings.simplefilter("error", FutureWarning)
            return ctx.trainer_args(SFTConfig, params, model=model).gradient_checkpointing

    assert checkpointing(8 * need) is False, "TRL's default is on; a quarter of the free memory is enough here"
    assert "[lab] gradient checkpointing off (auto:" in capsys.readouterr().out
    assert checkpointing(3 * need) is True, "over a quarter of the free memory"
    assert checkpointing(3 * need, gradient_checkpointing="off") is False
    assert checkpointing(100 * need, gradient_checkpointing="on") is True
    assert "[lab] gradient checkpointing on (asked for)" in capsys.readouterr().out
    assert checkpointing(None) is True, "free memory unknown: the safe side"
    monkeypatch.setattr(speed, "available_memory", lambda: 8 * need)
    assert speed.choose_checkpointing("auto", model, 4, 256, print, processes=4) is True, "four processes share it"
    assert "[lab] gradient checkpointing on (auto: about " in capsys.readouterr().out
    assert ctx.trainer_args(SFTConfig, sft.Params()).gradient_checkpointing is True, "no model given: TRL decides"
    for name in ("gradient_checkpointing", "activation_checkpointing"):  # an extra argument of the same meaning wins
        assert ctx.trainer_args(SFTConfig, sft.Params(), model=model, **{name: True}).gradient_checkpointing is True
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        sft.Params(gradient_checkpointing="sometimes")


def test_without_checkpointing_sft_takes_the_loss_over_whole_logits_and_it_is_the_same_loss(uneven, jobs_worker):
    found = {}
    for choice in ("on", "off"):
        job = _sft_job(uneven, max_steps=2, seed=3, gradient_checkpointing=choice)
        log = (Path(job["run_dir"]) / "log.txt").read_text()
        found[choice] = ("TRL's nll" in log, runs.metrics(uneven, [job["id"]], ["loss"])[job["id"]]["loss"][0][1])
    assert found["off"][0] and not found["on"][0], "chunked (TRL's default) only where memory is saved"
    assert found["off"][1] == pytest.approx(found["on"][1], rel=1e-5), "the same loss either way"
