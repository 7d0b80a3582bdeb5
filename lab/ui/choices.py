"""The choices the pages share, in one place: experiments, datasets (by the formats a method accepts), models (with
the run that made them) and model names by kind. Tabs read them here and never import each other; what a tab shows
afresh when the page loads or a tab is opened it registers with `UI.on_refresh`."""

from __future__ import annotations

from collections.abc import Iterable

from lab import datasets as datasets_mod
from lab import experiments as experiments_mod
from lab import registry
from lab.ui.common import UI


def experiments(ui: UI, include_archived: bool = True) -> list[str]:
    return [e["name"] for e in experiments_mod.list_all(ui.settings) if include_archived or not e["archived"]]


def datasets(ui: UI, accepts: Iterable[str] | None = None) -> list[str]:
    """Dataset names, only those in a format of `accepts` when given."""
    wanted = None if accepts is None else set(accepts)
    return [d["name"] for d in datasets_mod.list_all(ui.settings) if wanted is None or d["format"] in wanted]


def origin(m: dict) -> str:
    """Where a registered model came from, in words."""
    on = f" on {m['base_model']}" if m["kind"] == "adapter" and m["base_model"] else ""
    if m["source"] == "run":
        return f"output of run {m['job_id']}{on}"
    if m["source"] == "hub":
        return f"HF cache {m['hub_id']} @ {(m['revision'] or '')[:12]}{on}"
    return {"starter": "starter (GGUF import)", "gguf": "imported GGUF", "local": "local folder",
            "tiny": "tiny random model"}.get(m["source"], m["source"]) + on


def models(ui: UI) -> list[tuple[str, str]]:
    """(label, name) pairs for dropdowns: run outputs say which run made them."""
    return [(f"{m['name']} · {origin(m)}" if m["source"] == "run" else m["name"], m["name"])
            for m in registry.list_all(ui.settings)]


def model_names(ui: UI, kinds: Iterable[str] | None = None) -> list[str]:
    """Registered model names, only those of `kinds` (full, adapter, classifier, reward) when given."""
    wanted = None if kinds is None else set(kinds)
    return [m["name"] for m in registry.list_all(ui.settings) if wanted is None or m["kind"] in wanted]
