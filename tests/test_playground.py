"""The playground's engine: rankings become preference pairs, the model cache keeps to its budget, answers stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab import datasets, playground, registry, runs
from lab.errors import LabError


@pytest.fixture
def lab(ws, tiny_model_dir):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    return ws


def test_a_ranking_adds_exactly_one_pair_and_a_reward_job_trains_on_it(lab, jobs_worker):
    answers = {"tiny": "Paris is the capital.", "other": "I do not know."}
    done = playground.record_ranking(lab, "ranked", "What is the capital of France?", answers, "tiny")
    assert (done["added"], done["pairs"]) == (1, 1)
    info = datasets.info(lab, "ranked")
    assert info["format"] == "preference"
    (row,) = datasets.preview(lab, "ranked", 10)
    assert row["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert (row["chosen"], row["rejected"]) == ([{"role": "assistant", "content": "Paris is the capital."}],
                                                [{"role": "assistant", "content": "I do not know."}])
    assert (row["chosen_model"], row["rejected_model"]) == ("tiny", "other")

    before = info["fingerprint"]
    again = playground.record_ranking(lab, "ranked", "Say hi.", {"tiny": "hi", "other": "go away"}, "tiny")
    assert again["pairs"] == 2 and datasets.info(lab, "ranked")["fingerprint"] != before
    tie = playground.record_ranking(lab, "ranked", "Say hi.", {"tiny": "hi", "other": "hello"}, None)
    assert tie["added"] == 0 and datasets.info(lab, "ranked")["rows"] == 2
    log = (Path(info["path"]) / "rankings.jsonl").read_text().splitlines()
    assert [json.loads(x)["winner"] for x in log] == ["tiny", "tiny", None]

    job_id = runs.submit(lab, "reward", model="tiny", dataset="ranked",
                         params={"max_steps": "2", "eval_split": "0", "precision": "fp32"})
    jobs_worker(lab).serve(once=True)
    assert runs.get_job(lab, job_id)["status"] == "completed"


@pytest.mark.parametrize(("prompt", "answers", "winner", "message"), [
    ("", {"a": "x", "b": "y"}, "a", "no prompt"),
    ("q", {"a": "x"}, "a", "two or more answers"),
    ("q", {"a": "same", "b": "same"}, "a", "the answers are the same"),
    ("q", {"a": "x", "b": "y"}, "c", "c gave no answer"),
    ("q", {"a": "x", "b": "y"}, None, "a tie adds no pair"),
])
def test_rankings_that_cannot_be_pairs_are_refused_and_store_nothing(lab, prompt, answers, winner, message):
    with pytest.raises(LabError, match=message):
        playground.record_ranking(lab, "fresh", prompt, answers, winner)
    assert datasets.list_all(lab) == []


def test_the_playground_and_the_rank_page_store_pairs_in_one_shape(lab):
    """Both write through ranking.add_pairs, as ranking.pair_row shapes them: a conversational prompt (the system
    message first), one assistant message each; a dataset made before in plain text keeps its shape."""
    from lab import ranking

    playground.record_ranking(lab, "both", "Hi?", {"tiny": "Hello!", "other": "No."}, "tiny", system="Be kind.")
    (played,) = datasets.preview(lab, "both", 10)
    ranked = ranking.pair_row([{"role": "user", "content": "Hi?"}], "Hello!", "No.", "tiny", "other",
                              system="Be kind.", annotator="ann")
    assert {k: v for k, v in ranked.items() if k != "annotator"} == played
    assert played["prompt"][0] == {"role": "system", "content": "Be kind."}
    assert datasets.info(lab, "both")["source"] == "playground rankings"

    old = lab.workspace / "old.jsonl"
    old.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "No."}) + "\n")
    datasets.add(lab, "old", old, "preference")
    playground.record_ranking(lab, "old", "Bye?", {"tiny": "Bye!", "other": "What?"}, "tiny")
    rows = datasets.preview(lab, "old", 10)
    assert rows[1]["prompt"] == "Bye?" and rows[1]["chosen"] == "Bye!", "appended in the dataset's own shape"
    assert all(isinstance(r["prompt"], str) for r in rows)


def test_rows_the_lab_makes_are_checked_like_a_file_and_nothing_half_stored(lab):
    with pytest.raises(LabError, match="rejected"):
        datasets.add_rows(lab, "bad", [{"prompt": "q", "chosen": "a"}], "preference", source="test")
    assert datasets.list_all(lab) == [] and not (lab.workspace / "datasets" / "bad").exists()
    done = datasets.add_rows(lab, "good", [{"prompt": "q", "chosen": "a", "rejected": "b"}], "preference", "test")
    assert (done["rows"], done["format"], done["source"]) == (1, "preference", "test")
    with pytest.raises(LabError, match="already exists"):
        datasets.add_rows(lab, "good", [{"prompt": "q", "chosen": "a", "rejected": "b"}], "preference", "test")


def test_the_model_cache_keeps_to_its_budget_and_refuses_what_cannot_write(lab, tmp_path):
    cache = playground.ModelCache(budget_bytes=10 * 1024**3)
    model, tokenizer = cache.get(lab, "tiny")
    assert cache.get(lab, "tiny")[0] is model, "loaded once, then served from memory"
    assert cache.names() == ["tiny"]
    with pytest.raises(LabError, match="the playground may use"):
        playground.ModelCache(budget_bytes=1000).get(lab, "tiny")
    text = list(playground.stream_answer(model, tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=6,
                                         temperature=0))
    assert text and all(text[i + 1].startswith(text[i]) for i in range(len(text) - 1)), "the answer grows"
    pieces = playground.tokenize(lab, "tiny", "The capital of France")
    assert "".join(p for p, _ in pieces) == "The capital of France" and all(isinstance(i, int) for _, i in pieces)


def test_the_playground_loads_a_run_s_adapter_on_its_base(lab, tmp_path, jobs_worker):
    from conftest import write_jsonl

    datasets.add(lab, "qa", write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "hi", "completion": "hello"}] * 4))
    job_id = runs.submit(lab, "sft", model="tiny", dataset="qa", params={"max_steps": "1", "precision": "fp32"})
    jobs_worker(lab).serve(once=True)
    adapter = runs.get_job(lab, job_id)["output_model"]
    assert registry.info(lab, adapter)["kind"] == "adapter"
    model, tokenizer = playground.ModelCache(budget_bytes=10 * 1024**3).get(lab, adapter)
    first = playground.answer(model, tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=3,
                              temperature=0)
    again = playground.answer(model, tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=3,
                              temperature=0)
    assert isinstance(first, str) and first == again, "greedy answers of the loaded adapter repeat"
    assert len(tokenizer(first, add_special_tokens=False)["input_ids"]) <= 3
