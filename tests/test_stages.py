"""Every training stage on a tiny model and toy data written here: each completes, writes an output of the right
kind, and shows the behaviour it exists for (above chance, above the baseline, a growing margin, a falling loss)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from jobs.worker import Worker
from lab import datasets, registry, runs

GOOD = ["Sure, here is a clear and helpful answer.", "Happy to help: the answer is below.",
        "Here is a polite, correct reply."]
BAD = ["No.", "Go away.", "I refuse to answer that."]
QUESTIONS = ["How do I boil an egg?", "What is the capital of France?", "Can you help me with my homework?",
             "Tell me a joke.", "How tall is Everest?", "What time is it in Tokyo?"]
SPAM = ["win a free prize now", "claim your cash reward", "free entry to win money", "urgent cash offer claim"]
HAM = ["see you at dinner", "are we meeting tomorrow", "thanks for the notes", "the bus is late again"]


def preference_rows(n: int = 120) -> list[dict]:
    r = random.Random(1)
    return [{"prompt": r.choice(QUESTIONS), "chosen": r.choice(GOOD), "rejected": r.choice(BAD)} for _ in range(n)]


def spam_rows(n: int = 200) -> list[dict]:
    r = random.Random(0)
    rows = []
    for _ in range(n):
        spam = r.random() < 0.3
        text = f"{r.choice(SPAM if spam else HAM)} {r.randint(0, 99)}"
        rows.append({"text": text, "label": "spam" if spam else "ham"})
    return rows


@pytest.fixture
def lab(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "pairs", write_jsonl(tmp_path / "pairs.jsonl", preference_rows()))
    datasets.add(ws, "spam", write_jsonl(tmp_path / "spam.jsonl", spam_rows()))
    return ws


def run_job(s, plugin: str, model: str | None, dataset: str | None, **params) -> dict:
    job_id = runs.submit(s, plugin, model=model, dataset=dataset, params={k: str(v) for k, v in params.items()})
    Worker(s, say=lambda m: None).serve(once=True)
    job = runs.get_job(s, job_id)
    assert job["status"] == "completed", f"{job['error']}\n{job['log_tail']}"
    return job


def series(s, job: dict, key: str) -> list[float]:
    return [v for _, v, _ in runs.metrics(s, [job["id"]], [key])[job["id"]][key]]


def test_classification_beats_the_majority_class(lab, jobs_worker):
    job = run_job(lab, "classify", "tiny", "spam", use_lora=False, learning_rate=3e-3, max_steps=30,
                  eval_steps=30, precision="fp32")
    accuracy, = series(lab, job, "final/accuracy")
    baseline, = series(lab, job, "final/majority_baseline")
    assert accuracy > baseline + 0.1, f"accuracy {accuracy:.3f} against the majority class {baseline:.3f}"
    assert series(lab, job, "final/macro_f1")[0] > 0.6
    assert {"eval_accuracy", "eval_macro_f1", "eval_precision/spam", "eval_recall/ham", "tokens_per_s"} <= set(
        runs.metrics(lab, [job["id"]])[job["id"]])
    confusion = json.loads((Path(job["run_dir"]) / "eval" / "confusion_matrix.json").read_text())
    assert confusion["labels"] == ["ham", "spam"] and sum(map(sum, confusion["matrix"])) == 20
    model = registry.info(lab, job["output_model"])
    assert model["kind"] == "classifier"
    config = json.loads((Path(model["path"]) / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"}


def test_reward_model_ranks_held_out_pairs_well_above_chance(lab, jobs_worker):
    job = run_job(lab, "reward", "tiny", "pairs", use_lora=False, learning_rate=1e-3, max_steps=30, eval_steps=30,
                  precision="fp32")
    assert series(lab, job, "eval_accuracy")[-1] >= 0.9, "chance is 0.5"
    assert series(lab, job, "eval_margin")[-1] > 0.5
    assert registry.info(lab, job["output_model"])["kind"] == "reward"


def test_dpo_raises_the_chosen_minus_rejected_margin(lab, jobs_worker):
    job = run_job(lab, "dpo", "tiny", "pairs", learning_rate=5e-3, max_steps=15, precision="fp32")
    margins = series(lab, job, "rewards/margins")
    assert margins[0] == pytest.approx(0, abs=1e-6) and margins[-1] > 0.5
    assert series(lab, job, "rewards/accuracies")[-1] > 0.8
    model = registry.info(lab, job["output_model"])
    assert model["kind"] == "full" and model["base_model"] == "tiny"


def test_hh_transcripts_are_split_into_prompt_and_replies(ws, tmp_path):
    from lab.formats import to_preference_pair

    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Fine, thanks.",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Leave me alone."}
    pair = to_preference_pair(row)
    assert pair["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "how are you?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "Fine, thanks."}]
    datasets.add(ws, "hh", write_jsonl(tmp_path / "hh.jsonl", [row]))
    preview = datasets.converted_rows(ws, "hh", "preference")
    assert preview[0]["prompt"].endswith("how are you?\n\nAssistant:") and preview[0]["rejected"] == "Leave me alone."
    assert datasets.list_all(ws)[-1]["name"] == "hh", "a preview stores nothing"
    info = datasets.convert(ws, "hh", "hh-split", "preference")
    assert (info["format"], info["columns"]) == ("preference", ["chosen", "prompt", "rejected"])


CORPUS = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
          "of outrageous fortune, or to take arms against a sea of troubles and by opposing end them.\n\n")


def test_pretraining_from_scratch_lowers_the_loss_and_can_go_on(lab, tmp_path, jobs_worker):
    (tmp_path / "corpus.txt").write_text(CORPUS * 60)
    datasets.add(lab, "corpus", tmp_path / "corpus.txt")
    job = run_job(lab, "pretrain", None, "corpus", size="tiny", vocab_size=400, block_size=64, max_steps=40,
                  learning_rate=3e-3, batch_size=8, logging_steps=2, eval_split=0, precision="fp32")
    loss = series(lab, job, "loss")
    assert loss[-1] < 0.6 * loss[0], f"loss went from {loss[0]:.2f} to only {loss[-1]:.2f}"
    assert series(lab, job, "perplexity")[-1] == pytest.approx(2.718281828 ** loss[-1], rel=1e-3)
    assert series(lab, job, "tokens_per_s")[-1] > 0 and 0 < series(lab, job, "mfu")[-1] < 1
    model = registry.info(lab, job["output_model"])
    assert model["architecture"] == "LlamaForCausalLM" and model["base_model"] is None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model["path"])
    assert len(tok) <= 400 and tok.chat_template, "a new BPE vocabulary, ready for SFT's chat template"

    # continued pretraining of that output, and a masked-LM encoder from scratch
    again = run_job(lab, "pretrain", job["output_model"], "corpus", block_size=64, max_steps=3, precision="fp32")
    assert registry.info(lab, again["output_model"])["base_model"] == job["output_model"]
    masked = run_job(lab, "pretrain", None, "corpus", objective="masked", size="tiny", vocab_size=400,
                     block_size=64, max_steps=3, eval_split=0, precision="fp32")
    assert registry.info(lab, masked["output_model"])["architecture"] == "BertForMaskedLM"
    with pytest.raises(Exception, match="cannot generate text"):
        runs.submit(lab, "dpo", model=masked["output_model"], dataset="pairs")


def test_chain_sft_then_reward_then_ppo_records_its_lineage(lab, tmp_path, jobs_worker):
    facts = [{"instruction": q, "input": "", "output": g} for q, g in zip(QUESTIONS, GOOD * 2, strict=True)]
    datasets.add(lab, "facts", write_jsonl(tmp_path / "facts.jsonl", facts * 3))
    sft = run_job(lab, "sft", "tiny", "facts", max_steps=3, precision="fp32")
    reward = run_job(lab, "reward", sft["output_model"], "pairs", max_steps=5, eval_split=0, precision="fp32")
    ppo = run_job(lab, "ppo", sft["output_model"], "facts", reward_model=reward["output_model"], total_episodes=8,
                  response_length=8, precision="fp32")
    chain = registry.lineage(lab, ppo["output_model"])
    assert [(s.get("plugin"), s["model"]) for s in chain] == [
        (None, "tiny"), ("sft", sft["output_model"]), ("ppo", ppo["output_model"])]
    assert chain[-1]["uses"] == {"reward_model": reward["output_model"]}
    used = json.loads((Path(ppo["run_dir"]) / "job.json").read_text())["models"]["reward_model"]
    found = registry.info(lab, reward["output_model"])
    assert (used["name"], used["path"], used["fingerprint"]) == (found["name"], found["path"], found["fingerprint"])
    assert ppo["lineage"] == f"tiny → sft #{sft['id']} → ppo #{ppo['id']} (reward model {reward['output_model']})"
    assert registry.lineage_text(registry.lineage(lab, reward["output_model"])) == (
        f"tiny → sft #{sft['id']} → reward #{reward['id']}")
    keys = set(runs.metrics(lab, [ppo["id"]])[ppo["id"]])
    assert {"objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg",
            "response_length", "tokens_per_s"} <= keys
    assert 0 < series(lab, ppo, "response_length")[-1] <= 8
    samples = [json.loads(line) for line in (Path(ppo["run_dir"]) / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "answer", "score"} <= set(samples[0])
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(registry.info(lab, ppo["output_model"])["path"])
    assert policy.config.architectures == ["LlamaForCausalLM"]
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    assert policy.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_ppo_and_grpo_refuse_a_missing_or_wrong_reward_model(lab):
    with pytest.raises(Exception, match="`reward_model` is required"):
        runs.submit(lab, "ppo", model="tiny", dataset="pairs")
    with pytest.raises(Exception, match="tiny is a full model, not a reward model"):
        runs.submit(lab, "ppo", model="tiny", dataset="pairs", params={"reward_model": "tiny"})
    with pytest.raises(Exception, match="no reward"):
        runs.submit(lab, "grpo", model="tiny", dataset="pairs")
    assert runs.list_jobs(lab) == []


def test_grpo_with_rule_rewards_keeps_samples(lab, tmp_path, jobs_worker):
    rows = [{"prompt": q, "completion": "yes"} for q in QUESTIONS] * 2
    datasets.add(lab, "qa", write_jsonl(tmp_path / "qa.jsonl", rows))
    job = run_job(lab, "grpo", "tiny", "qa", length_target=4, format_regex=r"\w", exact_match=True, max_steps=3,
                  max_completion_length=8, precision="fp32")
    points = runs.metrics(lab, [job["id"]])[job["id"]]
    assert all(v is not None and math.isfinite(v) for key in points for _, v, _ in points[key]), "nothing diverged"
    assert len(points["reward"]) == 3 and all(0 <= v <= 3 for _, v, _ in points["reward"]), "three rules, 0..1 each"
    keys = set(points)
    assert {"reward", "rewards/length/mean", "rewards/format_match/mean", "rewards/exact/mean",
            "completions/mean_length"} <= keys
    samples = (Path(job["run_dir"]) / "samples.jsonl").read_text().splitlines()
    assert {json.loads(s)["reward"] for s in samples} == {"length", "format_match", "exact"}
    assert registry.info(lab, job["output_model"])["kind"] == "full"


@pytest.mark.parametrize(("plugin", "keys"), [
    ("orpo", {"rewards/margins", "log_odds_ratio", "nll_loss", "tokens_per_s"}),
    ("kto", {"rewards/chosen", "rewards/rejected", "kl", "tokens_per_s"}),
])
def test_orpo_and_kto_tune_on_preference_pairs(lab, plugin, keys, jobs_worker):
    job = run_job(lab, plugin, "tiny", "pairs", max_steps=8, learning_rate=5e-3, precision="fp32")
    assert keys <= set(runs.metrics(lab, [job["id"]])[job["id"]])
    loss = series(lab, job, "loss")
    assert len(loss) == 8 and all(v is not None and math.isfinite(v) for v in loss), loss
    assert sum(loss[-3:]) < sum(loss[:3]), f"the loss falls: {loss}"
    if plugin == "kto":  # desirable answers end up above undesirable ones
        assert series(lab, job, "rewards/chosen")[-1] > series(lab, job, "rewards/rejected")[-1]
    assert registry.info(lab, job["output_model"])["kind"] == "full"
