"""Evaluation plugins on tiny models with known answers, and their results in one tidy shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_stages import preference_rows, run_job, series, spam_rows

from lab import datasets, registry, runs
from lab.evaluation import text_scores

FACTS = [{"prompt": "Say hello in French.", "completion": "bonjour"},
         {"prompt": "What is the capital of France?", "completion": "Paris"}]


@pytest.fixture
def lab(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", FACTS))
    datasets.add(ws, "facts-train", write_jsonl(tmp_path / "facts-train.jsonl", FACTS * 8))
    datasets.add(ws, "pairs", write_jsonl(tmp_path / "pairs.jsonl", preference_rows(80)))
    datasets.add(ws, "spam", write_jsonl(tmp_path / "spam.jsonl", spam_rows(120)))
    return ws


def results(job: dict) -> dict:
    return json.loads((Path(job["run_dir"]) / "output" / "results.json").read_text())["results"]


def test_text_scores_of_a_constant_answer():
    summary, per = text_scores(["the cat", "the cat"], ["the cat sat", "the cat"])
    assert per[0]["rouge1"] == pytest.approx(0.8)  # precision 1, recall 2/3
    assert per[1]["rouge1"] == 1.0 and per[1]["exact_match"] == 1.0
    assert summary["exact_match"] == 0.5 and summary["contains"] == 0.5
    assert summary["rouge1"] == pytest.approx(0.9) and 0 < summary["chrf"] <= 100


def test_a_memorising_model_answers_its_training_prompts_exactly(lab, jobs_worker):
    # whole conversations learned (not only the replies), so the perplexity of the conversations falls too
    sft = run_job(lab, "sft", "tiny", "facts-train", use_lora=False, learning_rate=1e-2, max_steps=40,
                  batch_size=4, completion_only=False, precision="fp32")
    job = run_job(lab, "eval-generate", sft["output_model"], "facts", max_new_tokens=8)
    found = results(job)
    assert found["exact_match"] == 1.0 and found["rouge1"] == 1.0, found
    assert series(lab, job, "eval/exact_match") == [1.0], "the same figures are in the metrics table"
    examples = [json.loads(line) for line in (Path(job["run_dir"]) / "eval" / "examples.jsonl").open()]
    assert [e["answer"] for e in examples] == ["bonjour", "Paris"]
    assert job["output_model"] is None, "an evaluation registers no model"

    before = results(run_job(lab, "eval-perplexity", "tiny", "facts"))
    after = results(run_job(lab, "eval-perplexity", sft["output_model"], "facts"))
    assert after["perplexity"] < before["perplexity"] / 2


def test_reward_model_scores_preference_pairs_and_answers(lab, jobs_worker):
    reward = run_job(lab, "reward", "tiny", "pairs", use_lora=False, learning_rate=1e-3, max_steps=25, eval_split=0,
                     precision="fp32")
    accuracy = results(run_job(lab, "eval-preference", reward["output_model"], "pairs"))
    assert accuracy["accuracy"] >= 0.9 and accuracy["mean_margin"] > 0
    versus = results(run_job(lab, "eval-reward", "tiny", "facts", reward_model=reward["output_model"],
                             compare_to="tiny", max_new_tokens=4))
    assert versus["win_rate"] == 0.5, "a model against itself (greedy) ties every prompt"
    assert versus["mean_reward"] == pytest.approx(versus["other_mean_reward"])


def test_classifier_and_few_shot_scores(lab, jobs_worker):
    classifier = run_job(lab, "classify", "tiny", "spam", use_lora=False, learning_rate=3e-3, max_steps=25,
                         eval_split=0, precision="fp32")
    scored = results(run_job(lab, "eval-classify", classifier["output_model"], "spam"))
    assert scored["accuracy"] > scored["majority_baseline"] and scored["rows"] == 120
    few = results(run_job(lab, "eval-fewshot", "tiny", "spam", shots="0,1", limit=10, pool=5))
    assert set(few) == {"accuracy_0shot", "accuracy_1shot", "majority_baseline"}
    assert all(0 <= v <= 1 for v in few.values())
    with pytest.raises(Exception, match="starts from classifier models"):
        runs.submit(lab, "eval-classify", model="tiny", dataset="spam")


def test_export_merges_the_adapter_and_writes_a_model_card(lab, jobs_worker):
    import tarfile

    from transformers import AutoModelForCausalLM

    from lab.export import export

    sft = run_job(lab, "sft", "tiny", "facts-train", max_steps=2, precision="fp32")
    run_job(lab, "eval-generate", sft["output_model"], "facts", max_new_tokens=2)
    done = export(lab, sft["output_model"])
    folder = Path(done["folder"])
    assert AutoModelForCausalLM.from_pretrained(folder).config.architectures == ["LlamaForCausalLM"]
    assert not (folder / "adapter_config.json").exists(), "a standalone model, the adapter merged in"
    card = (folder / "README.md").read_text()
    assert f"tiny → sft #{sft['id']}" in card and "facts-train" in card and '"max_steps": 2' in card
    assert "eval-generate on facts: rouge1" in card
    from huggingface_hub import ModelCard

    meta = ModelCard.load(folder / "README.md").data  # read by the Hub's own library
    assert (meta.base_model, meta.library_name, meta.pipeline_tag) == ("tiny", "transformers", "text-generation")
    assert "sft" in meta.tags and meta.datasets == ["facts-train"]
    assert meta.lab_datasets[0]["fingerprint"] == datasets.info(lab, "facts-train")["fingerprint"]
    with tarfile.open(done["archive"]) as tar:
        assert f"{sft['output_model']}/README.md" in tar.getnames()
    with pytest.raises(Exception, match="already exists"):
        export(lab, sft["output_model"])
