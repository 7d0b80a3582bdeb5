"""Merging LoRA adapters of one base (the `merge` tool job, `lab models merge`): what the merge computes, its
lineage, and bad merges refused before anything is queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import lab_cli, write_jsonl

from lab import registry, runs
from lab.errors import LabError


def _adapter(base: Path, folder: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(folder)
    return folder


def _logits(settings, name: str):
    import torch

    from lab import modeling

    model = modeling.causal_lm(registry.info(settings, name), adapter="merge", log=lambda m: None).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 14, 3, 7]])).logits


@pytest.fixture
def adapters(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    for name, seed in (("a", 1), ("b", 2)):
        registry.add_folder(ws, name, _adapter(tiny_model_dir, tmp_path / name, seed), base="tiny")
    return ws


def test_an_adapter_merged_alone_at_weight_one_gives_the_same_logits(adapters, jobs_worker):
    import torch

    job_id = runs.submit_tool(adapters, "merge", model="a", params={"weights": "1"})
    jobs_worker(adapters).serve(once=True)
    job = runs.get_job(adapters, job_id)
    assert job["status"] == "completed", job
    merged = job["output_model"]
    info = registry.info(adapters, merged)
    assert (info["kind"], info["base_model"]) == ("adapter", "tiny")
    assert torch.allclose(_logits(adapters, merged), _logits(adapters, "a"), atol=1e-5)
    assert not torch.allclose(_logits(adapters, "a"), _logits(adapters, "tiny"), atol=1e-3), "the adapter matters"


def test_a_linear_merge_of_two_adapters_is_their_weighted_sum_and_its_lineage_names_both(adapters, jobs_worker):
    import torch

    done = lab_cli("models", "merge", "a", "b", "--method", "linear", "--weights", "0.5,0.5", check=True)
    (listed,) = [j for j in runs.list_jobs(adapters) if j["plugin"] == "merge"]
    job = runs.get_job(adapters, listed["id"])
    merged = job["output_model"]
    assert f"merged a × 0.5, b × 0.5 (linear) as model {merged}" in done.stdout
    result = json.loads((Path(job["run_dir"]) / "output" / "merge.json").read_text())
    assert result["parents"] == [{"model": "a", "weight": 0.5}, {"model": "b", "weight": 0.5}]
    assert "adapters b, method linear, weights 0.5,0.5" in job["lineage"]
    # peft's linear merge sums the adapters' A and B, each scaled by sqrt(weight): the two differ from either one
    ours = _logits(adapters, merged)
    assert not torch.allclose(ours, _logits(adapters, "a"), atol=1e-4)
    assert not torch.allclose(ours, _logits(adapters, "b"), atol=1e-4)


def test_a_ties_merge_runs_and_names_its_density(adapters, jobs_worker):
    job_id = runs.submit_tool(adapters, "merge", model="a", params={"adapters": "b", "method": "ties",
                                                                    "density": 0.3})
    jobs_worker(adapters).serve(once=True)
    job = runs.get_job(adapters, job_id)
    assert job["status"] == "completed", job
    assert runs.tool_result(adapters, job_id)["density"] == 0.3
    assert "merged a × 1, b × 1 (ties, density 0.3)" in (Path(job["run_dir"]) / "log.txt").read_text()


@pytest.mark.parametrize(("model", "params", "message"), [
    ("a", {}, "name at least one adapter to merge with"),
    ("a", {"adapters": "a"}, "named twice"),
    ("a", {"adapters": "b", "weights": "1"}, "1 weight(s) for 2 adapters"),
    ("a", {"adapters": "b", "weights": "1,<b>x</b>"}, "is not a comma-separated list of numbers"),
    ("a", {"adapters": "nope"}, "no model named 'nope'"),
    ("a", {"adapters": "tiny"}, "tiny is a full model"),
    ("tiny", {"adapters": "a"}, "full"),
    ("a", {"adapters": "b", "density": 0}, "density"),
    ("a", {"adapters": "c"}, "adapters of different base models do not merge"),
])
def test_a_bad_merge_is_refused_before_anything_is_queued(adapters, tmp_path, model, params, message):
    registry.create_tiny(adapters, "other", hidden=32, layers=1)
    registry.add_folder(adapters, "c", _adapter(registry.info(adapters, "other")["path"], tmp_path / "c", 3),
                        base="other")
    with pytest.raises(LabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runs.submit_tool(adapters, "merge", model=model, params=params)
    assert runs.list_jobs(adapters) == []


def _trained(base: Path, folder: Path, text: str) -> Path:
    """An adapter that has learned one sentence by heart (a few dozen steps on it alone)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    ids = AutoTokenizer.from_pretrained(base)(text, return_tensors="pt").input_ids
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(100):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


def _loss(settings, name: str, text: str) -> float:
    import torch
    from transformers import AutoTokenizer

    from lab import modeling

    info = registry.info(settings, name)
    ids = AutoTokenizer.from_pretrained(info.get("base_path") or info["path"])(text, return_tensors="pt").input_ids
    model = modeling.causal_lm(info, adapter="merge", log=lambda m: None).eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_a_ties_merge_of_adapters_trained_on_different_data_keeps_what_each_learned(ws, tiny_model_dir, tmp_path,
                                                                                    jobs_worker):
    texts = {"facts": "the capital of france is paris and the capital of italy is rome.",
             "sums": "two plus two makes four and three plus three makes six."}
    registry.add_folder(ws, "tiny", tiny_model_dir)
    for name, text in texts.items():
        registry.add_folder(ws, name, _trained(tiny_model_dir, tmp_path / name, text), base="tiny")
    job_id = runs.submit_tool(ws, "merge", model="facts", params={"adapters": "sums", "method": "ties",
                                                                  "weights": "1,1", "density": 0.5})
    jobs_worker(ws).serve(once=True)
    merged = runs.get_job(ws, job_id)["output_model"]
    for text in texts.values():  # on each evaluation: between the two parents or better, and better than the base
        own, other = sorted(_loss(ws, name, text) for name in texts)
        ours = _loss(ws, merged, text)
        assert ours <= other and ours < _loss(ws, "tiny", text), (text, own, ours, other)


def problems_of(settings, model: str, params: dict) -> list[str]:
    from lab import plugins

    plugin = plugins.get(settings, "merge")
    return plugin.module.check_inputs(plugins.validate_params(plugin, params), registry.info(settings, model), None,
                                      settings)


@pytest.fixture
def full_finetunes(ws, tiny_model_dir, tmp_path, jobs_worker):
    """Two full fine-tunes of tiny (sft jobs without LoRA, on two different sentences): sft-1 and sft-2."""
    from lab import datasets

    registry.add_folder(ws, "tiny", tiny_model_dir)
    for i, text in enumerate(("the sky is blue and the grass is green.", "one two three four five six seven.")):
        rows = [{"prompt": "say it", "completion": text}] * 4
        datasets.add(ws, f"d{i}", write_jsonl(tmp_path / f"d{i}.jsonl", rows))
        runs.submit(ws, "sft", model="tiny", dataset=f"d{i}",
                    params={"use_lora": "false", "max_steps": "4", "learning_rate": "0.01", "precision": "fp32"})
    jobs_worker(ws).serve(until_empty=True)
    assert [j["status"] for j in runs.list_jobs(ws)] == ["completed"] * 2
    return ws


def test_full_fine_tunes_merge_with_mergekit_into_a_model_that_exports(full_finetunes, jobs_worker):
    import torch
    from transformers import AutoModelForCausalLM

    ws = full_finetunes
    a, b = registry.info(ws, "sft-1"), registry.info(ws, "sft-2")
    assert (a["kind"], a["base_model"]) == ("full", "tiny")
    alone = runs.submit_tool(ws, "merge", model="sft-1", params={"method": "ties", "weights": "1", "density": 1})
    halves = runs.submit_tool(ws, "merge", model="sft-1", params={"adapters": "sft-2", "weights": "0.5,0.5"})
    ties = runs.submit_tool(ws, "merge", model="sft-1", params={"adapters": "sft-2", "method": "ties"})
    jobs_worker(ws).serve(until_empty=True)
    for job_id in (alone, halves, ties):
        job = runs.get_job(ws, job_id)
        assert job["status"] == "completed", f"{job['error']}\n{job['log_tail']}"
        assert registry.info(ws, job["output_model"])["kind"] == "full"

    def weights(path):
        return AutoModelForCausalLM.from_pretrained(path).state_dict()

    base, wa, wb = weights(registry.info(ws, "tiny")["path"]), weights(a["path"]), weights(b["path"])
    out = {j: weights(registry.info(ws, runs.get_job(ws, j)["output_model"])["path"]) for j in (alone, halves, ties)}
    for key in wa:
        # TIES of one model with every change kept is that model; a linear merge at 0.5 each is the average
        assert torch.allclose(out[alone][key], wa[key], atol=1e-6), key
        assert torch.allclose(out[halves][key], (wa[key] + wb[key]) / 2, atol=1e-6), key
    changed = [k for k in wa if not torch.equal(wa[k], base[k])]
    assert changed, "the fine-tunes moved the weights"
    assert any(not torch.allclose(out[ties][k], out[halves][k], atol=1e-6) for k in changed), "TIES is not linear"
    result = runs.tool_result(ws, ties)
    assert (result["kind"], result["method"], result["density"]) == ("full", "ties", 0.5)
    assert "adapters sft-2, method ties" in runs.get_job(ws, ties)["lineage"]

    registry.create_tiny(ws, "other")
    with pytest.raises(LabError, match="models of different base models do not merge: sft-1 on tiny, other on no"):
        runs.submit_tool(ws, "merge", model="sft-1", params={"adapters": "other", "method": "ties"})
    assert problems_of(ws, "sft-1", {"adapters": "tiny", "method": "ties"}) == [], "a fine-tune merges with its base"

    # a merged model is a model like any other: it exports
    merged = runs.get_job(ws, halves)["output_model"]
    export = runs.submit_tool(ws, "export-hf", model=merged)
    jobs_worker(ws).serve(once=True)
    assert runs.get_job(ws, export)["status"] == "completed", runs.get_job(ws, export)["error"]
    exported = Path(runs.tool_result(ws, export)["folder"])
    assert torch.allclose(weights(exported)["lm_head.weight"], out[halves]["lm_head.weight"])


@pytest.mark.parametrize(("params", "message"), [
    ({"adapters": "other"}, "models of different shapes do not merge"),
    ({"adapters": "tiny2", "method": "ties"}, "tiny, tiny2 have none recorded: use method linear"),
    ({"adapters": "a"}, "adapters and full models do not merge together"),
])
def test_full_models_that_cannot_merge_are_refused(adapters, tmp_path, params, message):
    import shutil

    registry.create_tiny(adapters, "other", hidden=32, layers=1)
    registry.add_folder(adapters, "tiny2", shutil.copytree(registry.info(adapters, "tiny")["path"], tmp_path / "t2"))
    with pytest.raises(LabError, match=message):
        runs.submit_tool(adapters, "merge", model="tiny", params=params)
    assert runs.list_jobs(adapters) == []


def test_a_merged_adapter_is_served_like_any_model(adapters, jobs_worker, serves):
    import openai
    from test_model_server import _start, _stop

    job_id = runs.submit_tool(adapters, "merge", model="a", params={"adapters": "b", "method": "dare_ties"})
    jobs_worker(adapters).serve(once=True)
    merged = runs.get_job(adapters, job_id)["output_model"]
    proc, base = _start(adapters, merged)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        answer = client.chat.completions.create(model=merged, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4)
        assert answer.model == merged and answer.choices[0].message.content is not None
    finally:
        _stop(proc)
