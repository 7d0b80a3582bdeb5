"""GGUF export, checked with code the lab did not write: llama.cpp loads each file (through llama-cpp-python's
bindings to the library built by lab.llamacpp) and its greedy answer is compared token for token with the Hugging
Face model's; transformers reads the file back with gguf_file=.

The first test of a machine builds llama.cpp (about 3 minutes); later runs find it in LAB_LLAMA_CPP_DIR.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import llamacpp, registry, runs
from lab.errors import LabError
from lab.gguf_export import export_gguf
from tests.conftest import lab_cli

pytestmark = pytest.mark.llamacpp
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def toolchain():
    from lab import settings

    return llamacpp.ensure(settings.load(), say=lambda m: None)


@pytest.fixture(scope="session")
def starter_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (one llama.cpp's converter knows), saved as an HF tokenizer folder."""
    from transformers import AutoTokenizer

    file = registry.starter_file()
    folder = tmp_path_factory.mktemp("starter-tokenizer")
    AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, starter_tokenizer_dir) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer; weights drawn wide enough that greedy choices are clear-cut."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(starter_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.2)
    folder = tmp_path_factory.mktemp("tiny-llama") / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def hf_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # an explicit mask: the pad token (<|im_end|>) is in the prompt and must not be masked out
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0][len(ids):].tolist()


def chat_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(folder).apply_chat_template(PROMPT, add_generation_prompt=True,
                                                                          return_dict=False))


def test_f16_export_answers_like_the_hf_model_token_for_token(ws, toolchain, tiny_llama, jobs_worker):
    registry.add_folder(ws, "tiny", str(tiny_llama))
    done = lab_cli("models", "export", "tiny", "--format", "gguf", check=True)
    folder = ws.workspace / "exports" / "tiny-f16"
    file = folder / "tiny-f16.gguf"
    assert f"exported tiny to {file}" in done.stdout and "chat template embedded" in done.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "README.md", "tiny-f16.gguf"]
    ids = chat_ids(tiny_llama)
    ours = llamacpp.call(ws, "greedy", path=str(file), tokens=ids, n=24)["tokens"]
    assert len(ours) == 24 and ours == hf_greedy(tiny_llama, ids, 24)
    # llama.cpp tokenizes the chat text exactly as the HF tokenizer does (tokenizer and specials embedded)
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(tiny_llama).apply_chat_template(PROMPT, add_generation_prompt=True,
                                                                         tokenize=False)
    assert llamacpp.call(ws, "tokenize", path=str(file), text=text)["tokens"] == ids
    meta = llamacpp.call(ws, "describe", path=str(file))
    assert meta["architecture"] == "llama" and meta["chat_template"] and meta["file_type"] == "1"  # MOSTLY_F16
    # transformers reads the file back, with the same weights (to f16 precision)
    import torch
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file.name, dtype=torch.float32)
    orig = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    w0 = orig.model.layers[0].mlp.down_proj.weight
    assert torch.allclose(back.model.layers[0].mlp.down_proj.weight, w0, atol=1e-3)
    # Ollama's Modelfile: the file, ChatML in Ollama's template language, the stop string; the card's metadata
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-f16.gguf\n") and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "gguf" and "gguf" in card.data.tags and card.data.base_model == "tiny"
    assert "ollama create tiny-f16 -f Modelfile" in card.text


def test_q8_0_export_loads_and_answers(ws, toolchain, tiny_llama):
    registry.add_folder(ws, "tiny", str(tiny_llama))
    done = export_gguf(ws, "tiny", "q8_0", say=lambda m: None)
    f16 = export_gguf(ws, "tiny", "f16", say=lambda m: None)
    assert done["llama_cpp"]["file_type"] == "7"  # MOSTLY_Q8_0
    assert done["bytes"] < 0.7 * f16["bytes"]  # quantized for real, not a renamed f16 file
    ids = chat_ids(tiny_llama)
    answer = llamacpp.call(ws, "greedy", path=done["file"], tokens=ids, n=16)["tokens"]
    reference = hf_greedy(tiny_llama, ids, 16)
    assert len(answer) == 16
    assert answer[:4] == reference[:4]  # 8-bit weights keep a clear-cut greedy choice
    assert not list((ws.workspace / "exports").glob("*/.f16.gguf"))  # the intermediate file is gone


def test_a_gguf_file_is_imported_by_a_job_and_keeps_its_weights(ws, toolchain, tiny_llama, jobs_worker):
    """`lab models import-gguf` queues an import-gguf job (the command runs a worker for it): the file is
    dequantised into a registered HF folder whose weights are the original's, and the job says what it made."""
    import torch
    from transformers import AutoModelForCausalLM

    registry.add_folder(ws, "tiny", str(tiny_llama))
    done = export_gguf(ws, "tiny", "f32", say=lambda m: None)
    imported = lab_cli("models", "import-gguf", "back", done["file"], check=True)
    (job,) = [j for j in runs.list_jobs(ws) if j["plugin"] == "import-gguf"]
    assert job["status"] == "completed" and job["experiment"] == runs.TOOLS_EXPERIMENT
    info = registry.info(ws, "back")
    assert f"imported model back into {info['path']}" in imported.stdout and info["source"] == "gguf"
    assert runs.tool_result(ws, job["id"]) == {"name": "back", "path": info["path"], "output_model": None}
    orig = AutoModelForCausalLM.from_pretrained(tiny_llama)
    back = AutoModelForCausalLM.from_pretrained(info["path"])
    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert torch.allclose(back.state_dict()[name], orig.state_dict()[name], atol=1e-5), name
    again = lab_cli("models", "import-gguf", "back", done["file"])
    assert again.returncode == 2 and "already exists" in again.stderr
    assert len(runs.list_jobs(ws)) == 1, "a refused import queues nothing"


def test_an_adapter_is_merged_into_its_base_before_conversion(ws, toolchain, tiny_llama, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    registry.add_folder(ws, "tiny", str(tiny_llama))
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    registry.add_folder(ws, "tiny-lora", str(tmp_path / "adapter"), base="tiny")
    done = export_gguf(ws, "tiny-lora", "f16", say=lambda m: None)
    merged = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged)
    ids = chat_ids(tiny_llama)
    ours = llamacpp.call(ws, "greedy", path=done["file"], tokens=ids, n=16)["tokens"]
    assert ours == hf_greedy(merged, ids, 16) != hf_greedy(tiny_llama, ids, 16)


def _opt(folder: Path) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             word_embed_proj_dim=16, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def test_models_llama_cpp_cannot_run_are_refused_before_any_work(ws, toolchain, tiny_model_dir, tmp_path, jobs_worker):
    import shutil

    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForSequenceClassification

    tok_files = [f for f in tiny_model_dir.iterdir() if f.name.startswith(("tokenizer", "special"))]

    def folder(name, model):
        path = tmp_path / name
        model.save_pretrained(path)
        for f in tok_files:
            shutil.copy(f, path / f.name)
        return path

    cfg = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      pad_token_id=0)
    registry.add_folder(ws, "clf", str(folder("clf", LlamaForSequenceClassification(cfg))))
    registry.add_folder(ws, "mlm", str(folder("mlm", BertForMaskedLM(BertConfig(
        vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)))))
    opt = _opt(tmp_path / "opt")
    for f in tok_files:
        shutil.copy(f, opt / f.name)
    registry.add_folder(ws, "opt", str(opt))
    registry.add_folder(ws, "tiny", str(tiny_model_dir))
    cases = {"clf": "classifier model", "mlm": "masked language model", "opt": "does not know the architecture "
             "OPTForCausalLM"}
    for name, says in cases.items():
        started = time.monotonic()
        with pytest.raises(LabError) as err:
            export_gguf(ws, name, "f16", say=lambda m: None)
        assert says in str(err.value) and "--format hf" in (err.value.hint or "")
        assert time.monotonic() - started < 5
    with pytest.raises(LabError, match="unknown quantization 'q3_x'"):
        export_gguf(ws, "tiny", "q3_x")
    bad = lab_cli("models", "export", "clf", "--format", "gguf")
    assert bad.returncode == 2 and "classifier model" in bad.stderr and "Traceback" not in bad.stderr
    exports = ws.workspace / "exports"
    assert not [p for p in exports.glob("*") if p.name != ".staging"]  # nothing was written


def test_an_export_killed_mid_conversion_is_repaired_by_the_next_one(ws, toolchain, tiny_llama, jobs_worker):
    registry.add_folder(ws, "tiny", str(tiny_llama))
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "models", "export", "tiny", "--format", "gguf",
                             "--quant", "q8_0"], start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=os.environ)
    building = ws.workspace / "exports" / ".staging" / "tiny-q8_0"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(building.glob("*.gguf")):
        time.sleep(0.05)
    assert list(building.glob("*.gguf")), "the conversion never started writing"
    os.killpg(proc.pid, signal.SIGKILL)  # the export and its converter die mid-write
    proc.wait()
    assert not (ws.workspace / "exports" / "tiny-q8_0").exists()  # nothing looks finished
    done = lab_cli("models", "export", "tiny", "--format", "gguf", "--quant", "q8_0", check=True)
    assert "Q8_0" in done.stdout
    assert not building.exists()
    again = lab_cli("models", "export", "tiny", "--format", "gguf", "--quant", "q8_0")
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_the_starter_model_exports_and_answers_in_llama_cpp(ws, toolchain):
    info = registry.ensure_starter(ws)
    f16 = export_gguf(ws, info["name"], "f16", say=lambda m: None)
    q8 = export_gguf(ws, info["name"], "q8_0", say=lambda m: None)
    ids = chat_ids(Path(info["path"]))
    ours = llamacpp.call(ws, "greedy", path=f16["file"], tokens=ids, n=24)
    reference = hf_greedy(Path(info["path"]), ids, 24)
    assert ours["tokens"] == reference[:len(ours["tokens"])] and "Paris" in ours["text"]
    assert len(ours["tokens"]) >= 5  # it answered, then stopped at its end-of-turn token
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert "Paris" in llamacpp.call(ws, "greedy", path=q8["file"], text=text, n=24)["text"]
    assert json.loads(json.dumps(q8["llama_cpp"]))["vocab"] == 49152
