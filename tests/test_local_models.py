"""Models the user already has, used offline: hub ids from a Hugging Face cache (a fake one, laid out as the hub
library lays it out: blobs, snapshot symlinks, refs), LM Studio's and Ollama's GGUF files, a PEFT adapter trained
elsewhere, and weights saved as pytorch_model.bin."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import write_jsonl

from jobs.worker import Worker
from lab import datasets, local_models, registry, runs
from lab.errors import LabError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root: Path, repo_id: str, model: Path, commit: str = COMMIT) -> Path:
    """`model`'s files in a hub cache under `root`, as the hub library stores a download."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in model.iterdir():
        if f.is_file() and f.name != "model.json":
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, repo / "blobs" / digest)
            os.symlink(f"../../blobs/{digest}", snapshot / f.name)
    return repo


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    fake_cache(tmp_path / "hf" / "hub", "acme/tiny-chat", tiny_model_dir)
    return tmp_path / "hf" / "hub"


def _job(s, plugin: str, model: str, dataset: str, **params) -> dict:
    job_id = runs.submit(s, plugin, model=model, dataset=dataset, params={k: str(v) for k, v in params.items()})
    Worker(s, say=lambda m: None).serve(once=True)
    job = runs.get_job(s, job_id)
    assert job["status"] == "completed", f"{job['error']}\n{job['log_tail']}"
    return job


def _demo(s, tmp_path) -> str:
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(6)]
    datasets.add(s, "demo", write_jsonl(tmp_path / "demo.jsonl", rows))
    return "demo"


def test_a_hub_id_from_the_local_cache_is_registered_with_its_revision_and_trains(ws, cache, tmp_path, jobs_worker):
    info = registry.add_folder(ws, "smol", "acme/tiny-chat")
    assert (info["source"], info["hub_id"], info["revision"]) == ("hub", "acme/tiny-chat", COMMIT)
    assert Path(info["path"]) == cache / "models--acme--tiny-chat" / "snapshots" / COMMIT
    assert info["parameters"] > 0 and info["architecture"] == "LlamaForCausalLM"
    # the cache's entry folder and a revision prefix name the same snapshot
    assert registry.add_folder(ws, "smol2", cache / "models--acme--tiny-chat")["revision"] == COMMIT
    assert registry.add_folder(ws, "smol3", "acme/tiny-chat@0123456")["path"] == info["path"]
    _job(ws, "sft", "smol", _demo(ws, tmp_path), max_steps=1, batch_size=2, eval_split=0)


def test_a_hub_id_not_in_the_cache_names_the_folder_searched(ws, cache, monkeypatch, tmp_path):
    with pytest.raises(LabError, match=f"acme/missing is not in the local Hugging Face cache \\({cache}\\)"):
        registry.add_folder(ws, "m", "acme/missing")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # the hub library's own override
    with pytest.raises(LabError, match=str(tmp_path / "elsewhere")):
        registry.add_folder(ws, "m", "acme/tiny-chat")
    with pytest.raises(LabError, match="has no revision 'fff'"):
        monkeypatch.delenv("HF_HUB_CACHE")
        registry.add_folder(ws, "m", "acme/tiny-chat@fff")
    assert registry.list_all(ws) == []


def _gguf(path: Path, arch: str = "llama") -> Path:
    import numpy as np
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_scan_finds_the_cache_lm_studio_and_ollama(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("LMSTUDIO_MODELS", str(tmp_path / "lms"))
    _gguf(tmp_path / "lms" / "acme" / "tiny-GGUF" / "tiny.Q8_0.gguf")
    ollama = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    blob = _gguf(ollama / "blobs" / "sha256-abc", arch="qwen2")
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": "sha256:abc"}]}))
    found = {(f["where"], f["id"]): f for f in local_models.scan()}
    hf = found[("hf-cache", "acme/tiny-chat")]
    assert (hf["format"], hf["architecture"], hf["revision"]) == ("hf", "LlamaForCausalLM", COMMIT)
    assert hf["size"] > 0
    lms = found[("lm-studio", "acme/tiny-GGUF/tiny.Q8_0.gguf")]
    assert (lms["format"], lms["architecture"]) == ("gguf", "llama")
    assert found[("ollama", "tiny:latest")]["path"] == str(blob)
    assert found[("ollama", "tiny:latest")]["architecture"] == "qwen2"


def _adapter(base: Path, folder: Path, names: str) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": names}))
    return folder


def test_an_adapter_trained_elsewhere_trains_evaluates_and_exports(ws, cache, tmp_path, tiny_model_dir, jobs_worker):
    adapter = _adapter(tiny_model_dir, tmp_path / "my-lora", "acme/tiny-chat")
    (cache / "models--acme--tiny-chat" / "snapshots" / COMMIT / "README.md").write_text(
        "---\nlicense: apache-2.0\n---\n# tiny chat\n")  # the base declares its license in its card
    info = registry.add_folder(ws, "mine", adapter)
    # its base, a cached hub id the registry did not hold, is registered first
    base = registry.info(ws, info["base_model"])
    assert (info["kind"], base["hub_id"], base["revision"]) == ("adapter", "acme/tiny-chat", COMMIT)
    assert (Path(info["path"]) / "tokenizer.json").is_file()  # the base's tokenizer travels with the copy
    demo = _demo(ws, tmp_path)
    trained = _job(ws, "sft", "mine", demo, max_steps=1, batch_size=2, eval_split=0)
    assert registry.info(ws, trained["output_model"])["base_model"] == base["name"]
    _job(ws, "eval-perplexity", "mine", demo, limit=3)
    from lab.export import export

    exported = Path(export(ws, "mine")["folder"])
    assert (exported / "config.json").is_file() and not (exported / "adapter_config.json").exists()
    from huggingface_hub import ModelCard

    meta = ModelCard.load(exported / "README.md").data
    assert (meta.base_model, meta.license, meta.library_name) == ("acme/tiny-chat", "apache-2.0", "transformers")
    # --base names a registered model; an adapter naming a base that is nowhere is refused, nothing registered
    assert registry.add_folder(ws, "mine2", adapter, base=base["name"])["base_model"] == base["name"]
    lost = _adapter(tiny_model_dir, tmp_path / "lost", "acme/gone")
    before = registry.list_all(ws)
    with pytest.raises(LabError, match="the adapter's base 'acme/gone' is nowhere"):
        registry.add_folder(ws, "lost", lost)
    with pytest.raises(LabError, match="is an adapter: an adapter's base is a full model"):
        registry.add_folder(ws, "lost", lost, base="mine")
    assert registry.list_all(ws) == before


def test_pytorch_model_bin_weights_are_counted(ws, tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_model_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    info = registry.add_folder(ws, "bin", folder)
    assert info["parameters"] == sum(t.numel() for t in state.values()) > 0


def test_an_adapter_exported_as_an_adapter_names_a_base_that_loads_elsewhere(ws, cache, tmp_path, tiny_model_dir,
                                                                             jobs_worker):
    from conftest import lab_cli

    registry.add_folder(ws, "mine", _adapter(tiny_model_dir, tmp_path / "my-lora", "acme/tiny-chat"))
    trained = _job(ws, "sft", "mine", _demo(ws, tmp_path), max_steps=1, batch_size=2, eval_split=0)
    # the run's output carries the lab's card too (not the trainer's template naming a path on this machine)
    from huggingface_hub import ModelCard

    own = ModelCard.load(Path(registry.info(ws, trained["output_model"])["path"]) / "README.md")
    assert (own.data.base_model, own.data.library_name) == ("acme/tiny-chat", "peft")
    assert "sft" in own.data.tags and "demo" in own.data.datasets and str(tmp_path) not in str(own.data)
    assert f"### Run {trained['id']}: sft" in own.text
    done = lab_cli("models", "export", trained["output_model"], "--adapter", "--as", "travels", check=True)
    folder = ws.workspace / "exports" / "travels"
    assert str(folder) in done.stdout
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/tiny-chat"  # a hub id, not a path on this machine
    assert str(tmp_path) not in (folder / "adapter_config.json").read_text()

    card = ModelCard.load(folder / "README.md")
    assert (card.data.base_model, card.data.library_name) == ("acme/tiny-chat", "peft")
    assert "needs its base model **acme/tiny-chat**" in card.text
    # elsewhere: a fresh process finds the base by its hub id (in its HF cache, offline) and applies the adapter
    import subprocess
    import sys

    code = ("import torch; from peft import AutoPeftModelForCausalLM; "
            f"m = AutoPeftModelForCausalLM.from_pretrained({str(folder)!r}); "
            "print(m.peft_config['default'].base_model_name_or_path, m(torch.tensor([[1, 2, 3]])).logits.shape[-1])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert loaded.stdout.split() == ["acme/tiny-chat", "384"], loaded.stderr[-2000:]
    # a full model is not an adapter; an adapter whose base the lab trained is named by its registered name
    refused = lab_cli("models", "export", "mine", "--adapter", "--format", "gguf")
    assert refused.returncode == 2 and "--adapter" in refused.stderr
    base = registry.info(ws, "mine")["base_model"]
    refused = lab_cli("models", "export", base, "--adapter")
    assert refused.returncode == 2 and "not an adapter" in refused.stderr
