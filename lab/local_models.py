"""Models the user already has on this machine, found without a network: hub ids in the local Hugging Face cache
(`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub), and the GGUF files of LM Studio and Ollama.

    lab models add smol HuggingFaceTB/SmolLM2-135M-Instruct    # the cached snapshot, its revision pinned
    lab models scan                                            # what the cache, LM Studio and Ollama hold
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lab.errors import LabError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, by the same environment variables the hub library reads."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / \
        "huggingface"
    return Path(home).expanduser() / "hub"


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not Path(text).expanduser().exists()


def _snapshot(repo: Path, revision: str | None) -> tuple[Path, str]:
    """The snapshot folder of a cache entry `models--org--name` at `revision` (a branch, tag or commit; default
    the one `refs/main` points to, else the only snapshot)."""
    snapshots = repo / "snapshots"
    commits = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if not commits:
        raise LabError(f"{repo} holds no downloaded snapshot", "download the model again with the hub's tools")
    ref = repo / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text().strip()
    elif revision:
        matches = [c for c in commits if c.startswith(revision)]
        if len(matches) != 1:
            raise LabError(f"{repo.name} has no revision {revision!r} in the cache",
                           f"its snapshots are {', '.join(c[:12] for c in commits)}")
        commit = matches[0]
    elif len(commits) == 1:
        commit = commits[0]
    else:
        raise LabError(f"{repo.name} has {len(commits)} snapshots and no refs/main to choose one",
                       "name the revision: ORG/NAME@REVISION")
    if not (snapshots / commit).is_dir():
        raise LabError(f"{repo.name}'s {ref.name} points to {commit[:12]}, which is not in the cache")
    return snapshots / commit, commit


def is_cache_entry(path: Path) -> bool:
    return path.is_dir() and path.name.startswith("models--") and (path / "snapshots").is_dir()


def hub_id_of_entry(path: Path) -> str:
    return path.name.removeprefix("models--").replace("--", "/", 1)


def resolve_entry(path: Path, revision: str | None = None) -> tuple[Path, str, str]:
    """A cache entry folder (`models--org--name`) as its snapshot folder, commit and hub id."""
    snapshot, commit = _snapshot(path, revision)
    return snapshot, commit, hub_id_of_entry(path)


def resolve(hub_id: str) -> tuple[Path, str]:
    """The snapshot folder and commit of `ORG/NAME[@REVISION]` in the local cache; never the network."""
    name, _, revision = hub_id.partition("@")
    cache = hub_cache()
    repo = cache / ("models--" + name.replace("/", "--"))
    if not repo.is_dir():
        raise LabError(f"{name} is not in the local Hugging Face cache ({cache})",
                       "the lab works offline: download it where there is a network (huggingface-cli download "
                       f"{name}) and copy the cache, set HF_HOME or HF_HUB_CACHE to the cache that has it, or give "
                       "the model's folder")
    return _snapshot(repo, revision or None)


# --- scanning --------------------------------------------------------------------------------------------------


def _size(paths) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size  # follows the cache's symlinks to their blobs
        except OSError:
            pass
    return total


def _architecture(folder: Path) -> str:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "adapter" if (folder / "adapter_config.json").is_file() else ""
    return (cfg.get("architectures") or [cfg.get("model_type", "")])[0] if isinstance(cfg, dict) else ""


def gguf_architecture(file: Path) -> str:
    """general.architecture from a GGUF file's header (gguf, llama.cpp's own reader)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(file)).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field else ""
    except Exception:  # a file the reader cannot parse is still listed
        return ""


def _lm_studio_folders() -> list[Path]:
    if os.environ.get("LMSTUDIO_MODELS"):
        return [Path(os.environ["LMSTUDIO_MODELS"]).expanduser()]
    home = Path("~").expanduser()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def _ollama_folder() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def _ollama_models(folder: Path) -> list[dict]:
    """Ollama's models: each manifest names its weights blob, a GGUF file."""
    out = []
    manifests = folder / "manifests"
    for manifest in sorted(manifests.rglob("*")) if manifests.is_dir() else []:
        if not manifest.is_file():
            continue
        try:
            layers = json.loads(manifest.read_text()).get("layers", [])
        except (OSError, ValueError, AttributeError):
            continue
        for layer in layers:
            if isinstance(layer, dict) and layer.get("mediaType") == "application/vnd.ollama.image.model":
                blob = folder / "blobs" / str(layer.get("digest", "")).replace(":", "-")
                if blob.is_file():
                    parts = manifest.relative_to(manifests).parts
                    name = f"{parts[-2]}:{parts[-1]}" if len(parts) >= 2 else manifest.name
                    out.append({"where": "ollama", "id": name, "path": str(blob), "format": "gguf",
                                "size": blob.stat().st_size, "architecture": gguf_architecture(blob)})
    return out


def searched() -> list[str]:
    """Where `scan` looks, in words."""
    return [f"the Hugging Face cache {hub_cache()}", "LM Studio " + ", ".join(map(str, _lm_studio_folders())),
            f"Ollama {_ollama_folder()}"]


def scan() -> list[dict]:
    """Every model found: {where, id, path, format (hf or gguf), size in bytes, architecture, revision}."""
    out = []
    cache = hub_cache()
    for repo in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        try:
            snapshot, commit = _snapshot(repo, None)
        except LabError:
            continue
        files = [p for p in snapshot.rglob("*") if p.is_file()]
        ggufs = [p for p in files if p.suffix == ".gguf"]
        if (snapshot / "config.json").is_file() or (snapshot / "adapter_config.json").is_file():
            out.append({"where": "hf-cache", "id": hub_id_of_entry(repo), "path": str(snapshot), "format": "hf",
                        "size": _size(p for p in files if p.suffix != ".gguf"), "architecture": _architecture(
                            snapshot), "revision": commit})
        out += [{"where": "hf-cache", "id": f"{hub_id_of_entry(repo)}/{g.name}", "path": str(g), "format": "gguf",
                 "size": _size([g]), "architecture": gguf_architecture(g), "revision": commit} for g in ggufs]
    for folder in _lm_studio_folders():
        for g in sorted(folder.rglob("*.gguf")) if folder.is_dir() else []:
            out.append({"where": "lm-studio", "id": str(g.relative_to(folder)), "path": str(g), "format": "gguf",
                        "size": _size([g]), "architecture": gguf_architecture(g)})
    out += _ollama_models(_ollama_folder())
    return out
