"""SFT end to end on a tiny model: through the queue and a worker, to a loadable adapter, with its loss recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from jobs.worker import Worker
from lab import datasets, registry, runs

FACTS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Say hello", "input": "in French", "output": "bonjour"},
    {"instruction": "How many legs does a spider have?", "input": "", "output": "Eight."},
]


@pytest.fixture
def tiny(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", FACTS * 4))
    return ws


def _run(s, params: dict) -> dict:
    job_id = runs.submit(s, "sft", model="tiny", dataset="facts", params=params)
    Worker(s, say=lambda m: None).serve(once=True)
    job = runs.get_job(s, job_id)
    assert job["status"] == "completed", f"{job['error']}\n{job['log_tail']}"
    return job


def test_full_fine_tune_memorises_a_tiny_set(tiny, jobs_worker):
    job = _run(tiny, {"use_lora": "false", "max_steps": "40", "learning_rate": "3e-3", "batch_size": "4"})
    loss = [v for _, v, _ in runs.metrics(tiny, [job["id"]], ["loss"])[job["id"]]["loss"]]
    assert len(loss) == 40, "one loss point per step (logging_steps=1)"
    assert loss[-1] < 0.5 * loss[0], f"loss fell from {loss[0]:.2f} to only {loss[-1]:.2f}"
    keys = set(runs.metrics(tiny, [job["id"]])[job["id"]])
    assert {"loss", "learning_rate", "grad_norm", "num_tokens"} <= keys
    out = Path(job["run_dir"]) / "output"
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert registry.info(tiny, job["output_model"])["kind"] == "full"


def test_lora_adapter_loads_with_peft_and_is_registered_with_its_base(tiny, jobs_worker):
    job = _run(tiny, {"max_steps": "12", "learning_rate": "1e-2", "lora_r": "4", "eval_split": "0.25",
                      "eval_steps": "6", "merge": "true"})
    out = Path(job["run_dir"]) / "output"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(registry.info(tiny, "tiny")["path"])
    model = PeftModel.from_pretrained(base, out)
    assert model.peft_config["default"].r == 4
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.config.architectures == ["LlamaForCausalLM"]
    info = registry.info(tiny, job["output_model"])
    assert (info["kind"], info["base_model"], info["job_id"]) == ("adapter", "tiny", job["id"])
    assert "eval_loss" in runs.metrics(tiny, [job["id"]])[job["id"]]
    accuracy = [v for _, v, _ in runs.metrics(tiny, [job["id"]])[job["id"]]["mean_token_accuracy"]]
    assert accuracy[-1] > accuracy[0]
    record = json.loads((Path(job["run_dir"]) / "job.json").read_text())
    assert record["model"]["fingerprint"] == registry.info(tiny, "tiny")["fingerprint"]
    assert record["dataset"]["fingerprint"] == datasets.info(tiny, "facts")["fingerprint"]
    assert record["params"]["lora_r"] == 4 and record["seed"] == 42
    assert "--set lora_r=4" in record["command"]

    # the adapter is itself a starting point: training goes on from it, on the same base model
    job2 = runs.submit(tiny, "sft", model=job["output_model"], dataset="facts", params={"max_steps": "2"})
    jobs_worker(tiny).serve(once=True)
    second = runs.get_job(tiny, job2)
    assert second["status"] == "completed", second["log_tail"]
    assert registry.info(tiny, second["output_model"])["base_model"] == "tiny"


def test_chat_rows_learn_only_the_last_reply(tiny, tmp_path, jobs_worker):
    from transformers import AutoTokenizer

    from lab.formats import to_prompt_completion

    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Goodbye"}]}
    pair = to_prompt_completion("chat", row)
    assert pair["completion"] == [{"role": "assistant", "content": "Goodbye"}]
    assert [m["content"] for m in pair["prompt"]] == ["Be brief.", "Hi", "Hello", "Bye"]
    tok = AutoTokenizer.from_pretrained(registry.info(tiny, "tiny")["path"])
    prompt = tok.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(pair["prompt"] + pair["completion"], tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):].startswith("Goodbye")

    datasets.add(tiny, "chat", write_jsonl(tmp_path / "chat.jsonl", [row] * 4))
    job_id = runs.submit(tiny, "sft", model="tiny", dataset="chat", params={"max_steps": "2", "packing": "true"})
    jobs_worker(tiny).serve(once=True)
    assert runs.get_job(tiny, job_id)["status"] == "completed"
