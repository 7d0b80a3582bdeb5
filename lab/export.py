"""Export a model as a standalone Hugging Face folder (an adapter merged into its base) with a model card, and as
a .tar.gz archive to download, under workspace/exports/."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from sqlalchemy import select

from lab import registry
from lab.db import read_session
from lab.errors import LabError
from lab.settings import Settings
from lab.tables import Dataset, Job, Metric
from lab.workspace import check_name, staging


def exports_dir(settings: Settings) -> Path:
    return settings.workspace / "exports"


def _history(settings: Settings, chain: list[dict]) -> list[dict]:
    """Each run of the lineage with its parameters and dataset fingerprint."""
    out = []
    with read_session(settings) as s:
        for step in chain:
            if not step.get("job_id"):
                continue
            job = s.get(Job, step["job_id"])
            dataset = s.get(Dataset, job.dataset_id) if job and job.dataset_id else None
            out.append({"run": step["job_id"], "plugin": step.get("plugin"), "model": step["model"],
                        "dataset": dataset.name if dataset else None,
                        "dataset_fingerprint": dataset.fingerprint if dataset else None,
                        "params": job.params if job else {}, "uses": step.get("uses", {})})
    return out


def _evaluations(settings: Settings, model_id: int) -> list[dict]:
    with read_session(settings) as s:
        jobs = s.scalars(select(Job).where(Job.model_id == model_id, Job.status == "completed",
                                           Job.plugin.like("eval-%")).order_by(Job.id)).all()
        out = []
        for job in jobs:
            dataset = s.get(Dataset, job.dataset_id) if job.dataset_id else None
            scores = dict(s.execute(select(Metric.key, Metric.value).where(Metric.job_id == job.id,
                                                                             Metric.key.like("eval/%"))).all())
            out.append({"run": job.id, "plugin": job.plugin, "dataset": dataset.name if dataset else None,
                        "results": {k.removeprefix("eval/"): v for k, v in scores.items()}})
    return out


PIPELINES = {"full": "text-generation", "adapter": "text-generation", "classifier": "text-classification",
             "reward": "text-classification"}


def _hub_id(row: dict) -> str | None:
    """The hub id a registered model came from, when the registry knows it (the local cache, the starter)."""
    return row.get("hub_id") or (registry.STARTER_HUB_ID if row.get("source") == "starter" else None)


def _declared_license(path: str) -> str | None:
    """The license a model folder's own card declares in its metadata, if any."""
    from huggingface_hub import ModelCard

    readme = Path(path) / "README.md"
    try:
        return ModelCard.load(readme).data.license if readme.is_file() else None
    except Exception:  # a card that does not parse declares nothing we can use
        return None


def card_metadata(settings: Settings, name: str, *, merged: bool = True, gguf: bool = False) -> dict:
    """The card's YAML metadata, as the Hub reads it: base_model (the hub id where the lineage starts from a known
    one, else the registered name), library_name, pipeline_tag, tags (the lineage's methods), datasets (with their
    fingerprints under lab_datasets) and the base's license when it declares one."""
    info = registry.info(settings, name)
    chain = registry.lineage(settings, name)
    first = registry.info(settings, chain[0]["model"]) if chain else info
    while first["kind"] == "adapter" and first["base_model"]:  # an adapter trained elsewhere starts at its base
        first = registry.info(settings, first["base_model"])
    history = _history(settings, chain)
    methods = list(dict.fromkeys(h["plugin"] for h in history if h["plugin"]))
    used = {h["dataset"]: h["dataset_fingerprint"] for h in history if h["dataset"]}
    meta = {"base_model": _hub_id(first) or first["name"],
            "library_name": "gguf" if gguf else "transformers" if merged or info["kind"] != "adapter" else "peft",
            "pipeline_tag": PIPELINES.get(info["kind"], "text-generation"),
            "tags": ["llm-lab", *methods, *(["lora"] if info["kind"] == "adapter" else []),
                     *(["gguf"] if gguf else [])],
            "datasets": list(used), "lab_datasets": [{"name": n, "fingerprint": f} for n, f in used.items()]}
    if license_ := _declared_license(first["path"]):
        meta["license"] = license_
    return {k: v for k, v in meta.items() if v not in (None, [], "")}


def model_card(settings: Settings, name: str, gguf: dict | None = None, adapter: bool = False) -> str:
    """The export's README.md: YAML metadata the Hub and huggingface_hub.ModelCard read, then the lineage, each
    run's data and parameters, and the evaluation results. `gguf` ({file, quant}) adds how to run the file."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = card_metadata(settings, name, merged=not adapter, gguf=gguf is not None)
    if adapter:
        meta["base_model"] = portable_base(settings, name)
    data = ModelCardData(**meta)
    text = _card_text(settings, name, adapter=adapter)
    if gguf:
        text += _gguf_text(gguf["file"], gguf["quant"])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}"))


def _gguf_text(file: str, quant: str) -> str:
    stem = file.removesuffix(".gguf")
    return "\n".join([
        "", "## Run it", "", f"`{file}` is a GGUF file ({quant.upper()}) converted with llama.cpp's own converter; "
        "the tokenizer and chat template are inside it.", "", "```sh",
        f"llama-cli -m {file} -cnv                 # llama.cpp, in a chat",
        f"llama-server -m {file} --port 8080       # llama.cpp's OpenAI-compatible server",
        f"ollama create {stem} -f Modelfile && ollama run {stem}",
        f"mkdir -p ~/.lmstudio/models/llm-lab && cp -r ../{stem} ~/.lmstudio/models/llm-lab/   # LM Studio",
        "```", ""])


def _card_text(settings: Settings, name: str, adapter: bool = False) -> str:
    info = registry.info(settings, name)
    chain = registry.lineage(settings, name)
    history = _history(settings, chain)
    evaluations = _evaluations(settings, info["id"])
    shape = info
    if info["kind"] == "adapter":
        base = registry.base_of(settings, registry.get(settings, name))
        shape = {"architecture": base.architecture, "parameters": base.parameters}
    merged = f" (a LoRA adapter of {info['parameters']:,} parameters, merged into its base)"
    lines = [f"# {name}", "", f"Trained and kept in LLM Lab. Architecture {shape['architecture']}, "
             f"{shape['parameters'] or 0:,} parameters" + (merged if shape is not info else "") + ".", "",
             "## Lineage", "", registry.lineage_text(chain), ""]
    if adapter:
        base = portable_base(settings, name)
        lines[2] = (f"A LoRA adapter ({info['parameters'] or 0:,} parameters) from LLM Lab, not merged. It "
                    f"needs its base model **{base}** (architecture {shape['architecture']}, "
                    f"{shape['parameters'] or 0:,} parameters):")
        lines[3:3] = ["", "```python", "from peft import AutoPeftModelForCausalLM", "",
                      "model = AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/folder\")  # loads the base "
                      "named in adapter_config.json", "```", ""]
    for h in history:
        lines += [f"### Run {h['run']}: {h['plugin']}", "",
                  f"- data: {h['dataset'] or '(none)'}" + (f" (fingerprint `{h['dataset_fingerprint'][:16]}`)"
                                                             if h["dataset_fingerprint"] else ""),
                  *(f"- {k}: {v}" for k, v in h["uses"].items()),
                  "- parameters:", "", "```json", json.dumps(h["params"], indent=2), "```", ""]
    lines += ["## Evaluation results", ""]
    if evaluations:
        for e in evaluations:
            scores = ", ".join(f"{k} {v:.4g}" for k, v in e["results"].items())
            lines.append(f"- run {e['run']} {e['plugin']} on {e['dataset']}: {scores}")
    else:
        lines.append("(no evaluation was run on this model in the lab)")
    return "\n".join(lines) + "\n"


def portable_base(settings: Settings, name: str) -> str:
    """What an adapter's `base_model_name_or_path` should say to load on another machine: the hub id its base
    came from where the lab knows it, else the base's registered name (the card says which base it needs)."""
    base = registry.base_of(settings, registry.get(settings, name))
    first = registry.info(settings, base.name)
    chain = registry.lineage(settings, base.name)
    if chain:
        first = registry.info(settings, chain[0]["model"])
    same = first["name"] == base.name  # a hub id stands for the base only if the base is that model, untrained
    return (_hub_id(first) if same else None) or base.name


def merge_into(settings: Settings, info: dict, folder: Path) -> Path:
    """An adapter merged into its base, saved with its tokenizer as a plain HF folder at `folder` (the export, the
    GGUF converter and the model server all read one)."""
    from lab import modeling

    base = registry.base_of(settings, registry.get(settings, info["name"]))
    model = modeling.causal_lm({**info, "base_path": base.path}, adapter="merge", log=lambda m: None)
    model.save_pretrained(folder)
    modeling.tokenizer(info["path"], log=lambda m: None).save_pretrained(folder)
    return folder


def generating_architecture(settings: Settings, info: dict) -> str:
    """The architecture that would generate text for a model (an adapter's is its base's); '' for a scoring head,
    and the architecture itself when it does not generate (a masked LM), for the caller's refusal to name."""
    if info["kind"] in ("classifier", "reward"):
        return ""
    arch = info["architecture"] if info["kind"] != "adapter" else \
        registry.base_of(settings, registry.get(settings, info["name"])).architecture
    return arch or ""


def generates(arch: str) -> bool:
    return arch.endswith(("ForCausalLM", "LMHeadModel"))


def check(settings: Settings, name: str, export_name: str | None = None, adapter: bool = False) -> dict:
    """What `export` will export (the model's registry entry), or a clear refusal before any work."""
    export_name = check_name(export_name or name, "export")
    info = registry.info(settings, name)
    if adapter and info["kind"] != "adapter":
        raise LabError(f"{name} is a {info['kind']} model, not an adapter", "leave out --adapter to export it")
    if (exports_dir(settings) / export_name).exists():  # the folder is published last: a finished export
        raise LabError(f"an export named {export_name!r} already exists in {exports_dir(settings)}",
                       "pick another name")
    return info


def export(settings: Settings, name: str, export_name: str | None = None, adapter: bool = False,
           say=lambda message: None) -> dict:
    """Write workspace/exports/<export_name>/ (the model, its tokenizer, README.md) and <export_name>.tar.gz. An
    adapter is merged into its base, or with `adapter` exported as an adapter whose base is named portably.
    say(line) hears each step."""
    info = check(settings, name, export_name, adapter)
    export_name = export_name or name
    final = exports_dir(settings) / export_name
    archive = final.with_name(f"{export_name}.tar.gz")
    with staging(final, "export") as tmp:  # an archive left without its folder by a killed export is overwritten
        if info["kind"] == "adapter" and not adapter:
            say(f"merging the adapter {name} into its base")
            merge_into(settings, info, tmp)
        else:
            say(f"copying {name}'s files")
            for item in Path(info["path"]).iterdir():
                if item.name in ("model.json", "README.md", "training_args.bin") or item.is_dir():
                    continue
                shutil.copy2(item, tmp / item.name)
        if adapter:
            cfg = json.loads((tmp / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = portable_base(settings, name)
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(settings, name, adapter=adapter))
        partial = tmp / ".archive.partial"  # inside the build folder: removed with it if interrupted
        say(f"archiving {export_name}.tar.gz")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(tmp, arcname=export_name, filter=lambda m: None if m.name.endswith("/.archive.partial") else m)
        partial.replace(archive)  # the archive appears whole or not at all; the folder follows it
    return {"name": export_name, "folder": str(final), "archive": str(archive),
            "bytes": archive.stat().st_size}
