"""OpenAI-compatible endpoints in the Playground: a model served by `lab models serve` (a real OpenAI-compatible
server) is added, chatted with through the openai client, and ranked against a model of the lab."""

from __future__ import annotations

import json
import stat

import pytest
from test_model_server import _start, _stop

from lab import endpoints, playground, registry
from lab.errors import LabError
from lab.pgserver import free_port


def test_an_endpoint_is_checked_kept_streamed_and_ranked(ws, tiny_model_dir, serves):
    registry.add_folder(ws, "tiny", str(tiny_model_dir))
    proc, base = _start(ws, "tiny", "--api-key", "k3y-for-tests")
    try:
        url = f"{base}/v1"
        refusals = {
            "nothing answers at": (f"http://127.0.0.1:{free_port()}/v1", "", "k3y-for-tests"),
            "refused the API key": (url, "", "wrong"),
            "does not serve 'gpt-4o'": (url, "gpt-4o", "k3y-for-tests"),
            "is not an http\\(s\\) address": ("file:///etc/passwd", "", ""),
            "not in the address": ("http://user:pw@127.0.0.1:1/v1", "", ""),
        }
        for says, (address, model, key) in refusals.items():
            with pytest.raises(LabError, match=says):
                endpoints.add(ws, "served", address, model, key)
        with pytest.raises(LabError, match="invalid endpoint name"):
            endpoints.add(ws, "../x", url, "", "k3y-for-tests")
        assert endpoints.list_all(ws) == [] and not (ws.workspace / "endpoints.json").exists()
        added = endpoints.add(ws, "served", url + "/", "", "k3y-for-tests")
        assert added == {"name": "served", "url": url, "model": "tiny", "api_key": True}
        assert endpoints.list_all(ws) == [added]  # the key is kept, never given back
        kept = ws.workspace / "endpoints.json"
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and json.loads(kept.read_text())["served"]["api_key"]
        with pytest.raises(LabError, match="exists"):
            endpoints.add(ws, "served", url, "", "k3y-for-tests")
        messages = [{"role": "user", "content": "Hello"}]
        growing = list(endpoints.stream(ws, "endpoint:served", messages, max_new_tokens=8, temperature=1.5, seed=1))
        assert len(growing) >= 2 and all(b.startswith(a) for a, b in zip(growing, growing[1:], strict=False))
        model, tokenizer = playground.cache().get(ws, "tiny")
        local = playground.answer(model, tokenizer, messages, max_new_tokens=16, temperature=1.5, seed=3)
        assert local.strip() and growing[-1].strip(), (local, growing)
        done = playground.record_ranking(ws, "prefs", "Hello", {"tiny": local, "endpoint:served": growing[-1]},
                                         "endpoint:served")
        assert done["added"] == 1
        from lab import datasets

        row = datasets.preview(ws, "prefs", 1)[0]
        assert (row["chosen"][0]["content"], row["chosen_model"], row["rejected_model"]) == (
            growing[-1], "endpoint:served", "tiny")
    finally:
        _stop(proc)
    with pytest.raises(LabError, match="does not answer"):
        list(endpoints.stream(ws, "endpoint:served", [{"role": "user", "content": "Hi"}]))
    endpoints.remove(ws, "served")
    assert endpoints.list_all(ws) == []
    with pytest.raises(LabError, match="no endpoint named"):
        endpoints.remove(ws, "served")
