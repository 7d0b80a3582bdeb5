"""Export a causal LM of the lab as one GGUF file for llama.cpp, Ollama and LM Studio, with llama.cpp's own converter
and quantizer (see lab.llama_cpp), an Ollama Modelfile and a model card beside it.

    workspace/exports/<name>/<name>.gguf     the model, its tokenizer and chat template inside
    workspace/exports/<name>/Modelfile       `ollama create <name> -f Modelfile`
    workspace/exports/<name>/README.md       the card (Hub metadata, lineage, data, evaluation results)

The folder is laid out as LM Studio expects one model to be (copy it to ~/.lmstudio/models/llm-lab/<name>/).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from lab import llamacpp, registry
from lab.errors import LabError
from lab.export import exports_dir, generates, generating_architecture, merge_into, model_card
from lab.settings import Settings
from lab.workspace import check_name, staging

QUANTS = (*llamacpp.FLOAT_TYPES, *llamacpp.QUANT_TYPES)
CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')
LLAMA3 = ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
          '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
          '<|start_header_id|>assistant<|end_header_id|>\n\n')
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def check(settings: Settings, name: str, quant: str) -> dict:
    """What will be converted, or a clear refusal before any work: a classifier or reward head, a masked LM, an
    unknown quantization."""
    if quant not in QUANTS:
        raise LabError(f"unknown quantization {quant!r}", f"choose one of {', '.join(QUANTS)}")
    info = registry.info(settings, name)
    if info["kind"] in ("classifier", "reward"):
        raise LabError(f"{name} is a {info['kind']} model (a sequence-classification head): llama.cpp runs language "
                       "models that generate text, so it cannot be exported as GGUF",
                       "export it as a Hugging Face folder instead (--format hf)")
    arch = generating_architecture(settings, info)
    if not generates(arch):
        what = "a masked language model" if "MaskedLM" in arch else f"a {arch} model"
        raise LabError(f"{name} is {what}, not a causal language model: llama.cpp cannot generate text with it",
                       "export it as a Hugging Face folder instead (--format hf)")
    return {**info, "architecture": arch}


def _stops(folder: Path) -> list[str]:
    """The end-of-turn and end-of-text strings a chat runtime must stop at."""
    cfg = _json(folder / "tokenizer_config.json")
    template = str(cfg.get("chat_template") or "")
    stops = []
    for key in ("eos_token",):
        tok = cfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok:
            stops.append(tok)
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if marker in template and marker not in stops:
            stops.append(marker)
    return stops


def modelfile(folder: Path, file_name: str) -> str:
    """An Ollama Modelfile: the GGUF, the chat template in Ollama's template language where the model's is a known
    family (ChatML, Llama 3; otherwise Ollama reads the template embedded in the file), stop strings and the
    model's own sampling defaults (generation_config.json)."""
    template = str(_json(folder / "tokenizer_config.json").get("chat_template") or "")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    lines = [f"FROM ./{file_name}", ""]
    known = CHATML if "<|im_start|>" in template else LLAMA3 if "<|start_header_id|>" in template else None
    if known:
        lines += [f'TEMPLATE """{known}"""', ""]
    else:
        lines += ["# no TEMPLATE: Ollama uses the chat template embedded in the GGUF file", ""]
    lines += [f'PARAMETER stop "{s}"' for s in _stops(folder)]
    gen = _json(folder / "generation_config.json")
    lines += [f"PARAMETER {ollama} {gen[hf]}" for hf, ollama in SAMPLING.items()
              if isinstance(gen.get(hf), int | float) and not isinstance(gen.get(hf), bool)]
    return "\n".join(lines) + "\n"


def _convert(settings: Settings, src: Path, out: Path, outtype: str, model_name: str, log: Path) -> None:
    cmd = [sys.executable, str(llamacpp.home(settings) / "convert_hf_to_gguf.py"), str(src), "--outfile", str(out),
           "--outtype", outtype, "--model-name", model_name]
    with open(log, "a") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=llamacpp.converter_env(settings))
    if done.returncode != 0 or not out.is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-12:])
        raise LabError(f"llama.cpp's converter failed on {model_name} (exit {done.returncode}):\n{tail}")


def _hf_folder(settings: Settings, info: dict, tmp: Path, say: Callable[[str], None]) -> Path:
    """The folder the converter reads: the model's own, or an adapter merged into its base."""
    if info["kind"] != "adapter":
        return Path(info["path"])
    say(f"merging the adapter {info['name']} into its base")
    return merge_into(settings, info, tmp / ".merged")


def check_free(settings: Settings, export_name: str) -> str:
    """The export's name, refused when it is not a safe name or an export of that name exists."""
    export_name = check_name(export_name, "export")
    if (exports_dir(settings) / export_name).exists():
        raise LabError(f"an export named {export_name!r} already exists in {exports_dir(settings)}",
                       "pick another name with --as")
    return export_name


def export_gguf(settings: Settings, name: str, quant: str = "f16", export_name: str | None = None,
                say: Callable[[str], None] = print) -> dict:
    """Write workspace/exports/<export_name>/ with the GGUF file, its Modelfile and card; build llama.cpp first if
    this machine has not yet."""
    quant = (quant or "f16").lower()
    info = check(settings, name, quant)
    export_name = check_free(settings, export_name or f"{name}-{quant}")
    final = exports_dir(settings) / export_name
    llamacpp.ensure(settings, say)
    if info["architecture"] not in llamacpp.supported_architectures(settings):
        raise LabError(f"llama.cpp's converter does not know the architecture {info['architecture']} of {name}",
                       "export it as a Hugging Face folder instead (--format hf)")
    file_name = f"{export_name}.gguf"
    with staging(final, "export") as tmp:
        log = tmp / ".convert.log"
        src = _hf_folder(settings, info, tmp, say)
        outtype = quant if quant in llamacpp.FLOAT_TYPES else "f16"
        say(f"converting {name} to GGUF ({outtype}) with llama.cpp's converter")
        _convert(settings, src, tmp / (file_name if outtype == quant else ".f16.gguf"), outtype, export_name, log)
        if quant not in llamacpp.FLOAT_TYPES:
            say(f"quantizing to {quant.upper()} with llama.cpp's quantizer")
            llamacpp.call(settings, "quantize", src=str(tmp / ".f16.gguf"), out=str(tmp / file_name), quant=quant)
            (tmp / ".f16.gguf").unlink()
        loaded = llamacpp.call(settings, "describe", path=str(tmp / file_name))  # llama.cpp reads it back
        (tmp / "Modelfile").write_text(modelfile(src, file_name))
        (tmp / "README.md").write_text(model_card(settings, name, gguf={"file": file_name, "quant": quant}))
        shutil.rmtree(tmp / ".merged", ignore_errors=True)
        log.unlink()
    size = (final / file_name).stat().st_size
    say(f"exported {name} to {final / file_name} ({size / 2**20:.1f} MiB, {quant.upper()})")
    return {"name": export_name, "folder": str(final), "file": str(final / file_name),
            "modelfile": str(final / "Modelfile"), "quant": quant, "bytes": size, "llama_cpp": loaded}
