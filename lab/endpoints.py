"""OpenAI-compatible endpoints the Playground can chat with beside the lab's own models: LM Studio's or Ollama's
local server, llama.cpp's `llama-server`, a model served with `lab models serve`, or a hosted API.

They are kept in `<workspace>/endpoints.json` (owner-only: it may hold API keys; a key is never shown again).
In the Playground an endpoint is the model `endpoint:NAME`; its answers stream through the official `openai`
client and are ranked like any other model's.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from lab.errors import LabError
from lab.settings import Settings
from lab.workspace import check_name

PREFIX = "endpoint:"
TIMEOUT_S = 20.0


def _file(settings: Settings) -> Path:
    return settings.workspace / "endpoints.json"


def _read(settings: Settings) -> dict[str, dict]:
    try:
        data = json.loads(_file(settings).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise LabError(f"{_file(settings)} cannot be read: {exc}", "fix or remove the file") from None
    return data if isinstance(data, dict) else {}


def _write(settings: Settings, data: dict[str, dict]) -> None:
    """One rename publishes the new list; the file is owner-only from its first byte."""
    settings.workspace.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".endpoints-", dir=settings.workspace)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, _file(settings))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_all(settings: Settings) -> list[dict]:
    """The endpoints, without their keys."""
    return [{"name": n, "url": e["url"], "model": e["model"], "api_key": bool(e.get("api_key"))}
            for n, e in sorted(_read(settings).items())]


def _client(url: str, api_key: str | None):
    import openai

    return openai.OpenAI(base_url=url, api_key=api_key or "none", timeout=TIMEOUT_S, max_retries=0)


def _check_url(url: str) -> str:
    url = (url or "").strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LabError(f"{url!r} is not an http(s) address", "e.g. http://127.0.0.1:1234/v1 (LM Studio) or "
                       "http://127.0.0.1:11434/v1 (Ollama)")
    if parts.username or parts.password:
        raise LabError("put the API key in its own field, not in the address")
    return url


def add(settings: Settings, name: str, url: str, model: str = "", api_key: str = "") -> dict:
    """Check that the endpoint answers and serves `model` (or serves exactly one model when none is given), then
    keep it. Nothing is kept when the check fails."""
    import openai

    name = check_name((name or "").strip(), "endpoint")
    url = _check_url(url)
    data = _read(settings)
    if name in data:
        raise LabError(f"an endpoint named {name!r} exists", "remove it first or pick another name")
    try:
        served = sorted(m.id for m in _client(url, api_key).models.list())
    except openai.AuthenticationError:
        raise LabError(f"{url} refused the API key (401)", "give the key the server expects") from None
    except openai.APIConnectionError:
        raise LabError(f"nothing answers at {url}", "start the server first, and check the address and port") \
            from None
    except openai.APIStatusError as exc:
        raise LabError(f"{url}/models answered {exc.status_code}: it is not an OpenAI-compatible endpoint",
                       "the address usually ends in /v1") from None
    model = (model or "").strip()
    if not model:
        if len(served) != 1:
            raise LabError(f"{url} serves {len(served)} models: name the one to use",
                           f"one of: {', '.join(served[:20]) or '(none)'}")
        model = served[0]
    elif served and model not in served:
        raise LabError(f"{url} does not serve {model!r}", f"it serves: {', '.join(served[:20])}")
    data[name] = {"url": url, "model": model, "api_key": api_key or ""}
    _write(settings, data)
    return {"name": name, "url": url, "model": model, "api_key": bool(api_key)}


def remove(settings: Settings, name: str) -> None:
    data = _read(settings)
    if name not in data:
        raise LabError(f"no endpoint named {name!r}")
    del data[name]
    _write(settings, data)


def stream(settings: Settings, name: str, messages: list[dict], *, max_new_tokens: int = 256,
           temperature: float = 0.7, top_p: float = 0.95, seed: int = 0) -> Iterator[str]:
    """Yield the endpoint's answer as it grows, like playground.stream_answer does for a local model."""
    import openai

    e = _read(settings).get(name.removeprefix(PREFIX))
    if e is None:
        raise LabError(f"no endpoint named {name.removeprefix(PREFIX)!r}")
    answer = ""
    try:
        chunks = _client(e["url"], e.get("api_key")).chat.completions.create(
            model=e["model"], messages=messages, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed, stream=True)
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                answer += chunk.choices[0].delta.content
                yield answer
    except openai.APIConnectionError:
        raise LabError(f"the endpoint {name} at {e['url']} does not answer", "is its server still running?") \
            from None
    except openai.APIStatusError as exc:
        raise LabError(f"the endpoint {name} answered {exc.status_code}: {str(exc.message)[:300]}") from None
    if not answer:
        yield ""
