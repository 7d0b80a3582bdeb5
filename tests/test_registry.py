"""The model registry: local folders, GGUF checks, tiny models; a bad folder registers nothing."""

from __future__ import annotations

import shutil

import pytest

from lab import registry
from lab.errors import LabError


def test_tiny_model_is_created_and_described(ws):
    info = registry.create_tiny(ws, "t", hidden=32, layers=1)
    assert (info["kind"], info["source"], info["architecture"]) == ("full", "tiny", "LlamaForCausalLM")
    assert 10_000 < info["parameters"] < 100_000
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(info["path"])
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]


def test_local_folder_is_registered_in_place(ws, tiny_model_dir):
    info = registry.add_folder(ws, "mine", tiny_model_dir)
    assert info["path"] == str(tiny_model_dir) and info["source"] == "local"
    assert len(info["fingerprint"]) == 64


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("config.json", "config.json is missing"),
        ("model.safetensors", "has no model weights"),
        ("tokenizer.json+tokenizer_config.json", "has no tokenizer"),
    ],
)
def test_incomplete_folders_are_refused(ws, tiny_model_dir, tmp_path, broken, message):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    for name in broken.split("+"):
        (copy / name).unlink()
    with pytest.raises(LabError, match=message):
        registry.add_folder(ws, "m", copy)
    assert registry.list_all(ws) == []


def test_a_file_that_is_not_gguf_is_refused(ws, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf at all")
    with pytest.raises(LabError, match="not a GGUF file"):
        registry.import_gguf(ws, "g", fake)
    assert registry.list_all(ws) == [] and not (ws.workspace / "models" / "g").exists()


def test_duplicate_and_unsafe_names(ws, tiny_model_dir):
    registry.add_folder(ws, "m", tiny_model_dir)
    with pytest.raises(LabError, match="already exists"):
        registry.add_folder(ws, "m", tiny_model_dir)
    with pytest.raises(LabError, match="invalid model name"):
        registry.create_tiny(ws, "../m")
