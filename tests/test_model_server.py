"""`lab models serve`: transformers' OpenAI-compatible server behind the lab's gate, called with the official
`openai` client the way a user's tool would, and attacked the way a hostile page or script would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import lab_cli

from lab import registry
from lab.errors import LabError
from lab.model_server import servable
from lab.pgserver import free_port


def _start(ws, name: str, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "models", "serve", name, "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if (ws.workspace / "serving" / f"{name}.json").is_file():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                return proc, f"http://127.0.0.1:{port}"
            except urllib.error.HTTPError:
                return proc, f"http://127.0.0.1:{port}"
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


def _get(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_openai_client_lists_chats_streams_and_gets_404_for_another_model(ws, tiny_model_dir, tmp_path, serves):
    import openai

    registry.add_folder(ws, "tiny", str(tiny_model_dir))
    proc, base = _start(ws, "tiny")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == ["tiny"]
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                              max_tokens=8, temperature=0)
        assert chat.model == "tiny" and chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=8, stream=True))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        # several chunks, with text (a random tiny model's byte tokens may merge into fewer text pieces than tokens)
        assert len(chunks) >= 3 and pieces and "".join(pieces) and all(c.model == "tiny" for c in chunks)
        # temperature 0 is greedy (the same twice); above it samples, as OpenAI's API does
        def say(**kw):
            return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=8, **kw).choices[0].message.content
        assert say(temperature=0) == say(temperature=0)
        assert len({say(temperature=1.5, seed=s) for s in range(4)}) > 1
        done = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=5, temperature=0)
        assert done.choices[0].text
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert err.value.code == "model_not_found" and "gpt-4o" in str(err.value)
        # a server path or a hub id is not a model here: transformers' server would load it
        status, body = _get(f"{base}/v1/chat/completions", {"Content-Type": "application/json"},
                            json.dumps({"model": str(tiny_model_dir), "messages": []}).encode())
        assert status == 404 and body["error"]["code"] == "model_not_found"
        assert _get(f"{base}/v1/models/other")[0] == 404 and _get(f"{base}/v1/models/tiny")[1]["id"] == "tiny"
        # the server's own management routes stay shut; foreign Host and Origin are refused
        assert _get(f"{base}/load_model", {}, b'{"model": "x"}')[0] == 404
        assert _get(f"{base}/reset", {}, b"{}")[0] == 404
        assert _get(f"{base}/v1/models", {"Host": "evil.example"})[0] == 421
        assert _get(f"{base}/v1/models", {"Origin": "http://evil.example"})[0] == 403
        assert _get(f"{base}/v1/chat/completions", {}, b"not json")[0] == 400
        # no server path in what a client sees
        raw = json.dumps(chat.model_dump()) + json.dumps([c.model_dump() for c in chunks])
        assert str(tiny_model_dir) not in raw and str(ws.workspace) not in raw
    finally:
        out = _stop(proc)
    assert "serving tiny at http://127.0.0.1:" in out
    assert not (ws.workspace / "serving" / "tiny.json").exists()  # the record goes with the server


def test_an_api_key_is_needed_off_loopback_and_checked(ws, tiny_model_dir, serves):
    import openai

    registry.add_folder(ws, "tiny", str(tiny_model_dir))
    refused = lab_cli("models", "serve", "tiny", "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.returncode == 2 and "set an API key" in refused.stderr
    proc, base = _start(ws, "tiny", "--host", "0.0.0.0", "--api-key", "s3cret-key")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong").models.list()
        assert _get(f"{base}/v1/models")[0] == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret-key")
        assert [m.id for m in client.models.list()] == ["tiny"]
        assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4).choices[0].message.content
    finally:
        out = _stop(proc)
    assert "Authorization: Bearer" in out


def test_an_adapter_is_served_merged_and_a_classifier_is_refused(ws, tiny_model_dir, tmp_path, serves):
    import openai
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    registry.add_folder(ws, "tiny", str(tiny_model_dir))
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    registry.add_folder(ws, "tiny-lora", str(tmp_path / "lora"), base="tiny")
    proc, base = _start(ws, "tiny-lora")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        assert client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4).model == "tiny-lora"
    finally:
        _stop(proc)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    LlamaForSequenceClassification(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, pad_token_id=0,
                                               num_labels=2)).save_pretrained(tmp_path / "clf")
    for f in tiny_model_dir.glob("tokenizer*"):
        (tmp_path / "clf" / f.name).write_bytes(f.read_bytes())
    registry.add_folder(ws, "clf", str(tmp_path / "clf"))
    with pytest.raises(LabError, match="classifier model: it scores text"):
        servable(ws, "clf")
    assert os.environ.get("LAB_WORKSPACE") == str(ws.workspace)
