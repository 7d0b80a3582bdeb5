"""llama.cpp's own code, fetched and built once: its HF→GGUF converter (`convert_hf_to_gguf.py` with the gguf-py it
was written against) and the llama library itself, driven through llama-cpp-python's bindings (quantization,
loading a GGUF file, tokenizing, generating).

The source is the `llama-cpp-python` source package on PyPI (pinned below): it vendors a llama.cpp revision and
the Python bindings written for exactly that revision, so one download gives a converter, a quantizer and a runtime
that agree. Only the `llama` shared library is compiled (cmake, about 6 minutes on 2 cores), on the first GGUF
export or by `make llama-cpp`, never by `make run`. It is built in a temporary folder and published with one rename:
an interrupted build leaves nothing that looks finished, and the next export starts it again.

Everything that loads the library runs in a child process (`python -m lab.llamacpp ...`), so a crash in C code
ends that process with a message, not the lab.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from lab.errors import LabError
from lab.settings import Settings

SOURCE_PACKAGE = "llama-cpp-python"
SOURCE_VERSION = "0.3.36"
KEEP = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")  # what the converter needs
STEP_RE = re.compile(r"^\[(\d+)/(\d+)\]")
FLOAT_TYPES = ("f32", "f16", "bf16")  # written by the converter itself
QUANT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0")  # written by llama.cpp's quantizer from f16


def home(settings: Settings) -> Path:
    """The folder holding this revision's tools (a setting; shared by every workspace on the machine)."""
    return settings.llama_cpp_dir / f"llama.cpp-{SOURCE_VERSION}"


def ready(settings: Settings) -> bool:
    root = home(settings)
    return (root / "python" / "llama_cpp" / "lib" / "libllama.so").is_file() and (root / "supported.txt").is_file()


def converter_env(settings: Settings) -> dict[str, str]:
    """The converter imports the gguf-py it ships with, not whatever `gguf` is installed (transformers' reader)."""
    root = home(settings)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root)]), "HF_HUB_OFFLINE": "1"}


def supported_architectures(settings: Settings) -> set[str]:
    """The HF architectures of text models llama.cpp's converter knows (its own list, saved at build time)."""
    return set(filter(None, (home(settings) / "supported.txt").read_text().split()))


def _run(cmd: list[str], log: Path, say: Callable[[str], None], what: str, env: dict | None = None) -> None:
    """Run a build step with its output in `log`, telling ninja's [n/m] progress every tenth."""
    shown = -1
    with open(log, "a") as fh, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True) as proc:
        for line in proc.stdout:
            fh.write(line)
            m = STEP_RE.match(line)
            if m and (percent := 100 * int(m[1]) // int(m[2])) // 10 != shown // 10:
                shown = percent
                say(f"building llama.cpp: {percent}% ({m[1]}/{m[2]} steps)")
        if proc.wait() != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise LabError(f"{what} failed (exit {proc.returncode}); the end of its output:\n{tail}",
                           f"the whole output is in {log}")


def _fetch_source(tmp: Path, log: Path, say: Callable[[str], None]) -> Path:
    say(f"downloading llama.cpp's source ({SOURCE_PACKAGE} {SOURCE_VERSION} from PyPI, about 75 MB)")
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
          f"{SOURCE_PACKAGE}=={SOURCE_VERSION}", "-d", str(tmp)], log, say, "downloading llama.cpp's source")
    archive = next(tmp.glob("*.tar.gz"), None)
    if archive is None:
        raise LabError(f"pip downloaded no source archive of {SOURCE_PACKAGE}", f"see {log}")
    top = archive.name.removesuffix(".tar.gz") + "/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(top) and m.name != top.rstrip("/")]
        for m in members:
            m.name = m.name[len(top):]
        tar.extractall(tmp / "src", members=members, filter="data")
    archive.unlink()
    return tmp / "src"


def _list_architectures(out: Path) -> list[str]:
    listed = subprocess.run([sys.executable, str(out / "convert_hf_to_gguf.py"), "--print-supported-models"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": f"{out / 'gguf-py'}{os.pathsep}{out}"})
    names, section = [], None
    for line in (listed.stdout + listed.stderr).splitlines():
        if line.strip().endswith("models:"):
            section = line.strip().split()[0]
        elif section == "TEXT" and line.strip().startswith("- "):
            names.append(line.strip()[2:].strip())
    if listed.returncode != 0 or not names:
        raise LabError("llama.cpp's converter did not list the architectures it supports",
                       (listed.stderr or listed.stdout)[-500:])
    return names


def ensure(settings: Settings, say: Callable[[str], None] = print) -> Path:
    """The tools' folder, built first when missing. One build at a time per machine: a second caller waits for the
    first and then finds the tools ready."""
    root = home(settings)
    if ready(settings):
        return root
    for exe in ("cmake", "c++"):
        if shutil.which(exe) is None:
            raise LabError(f"building llama.cpp needs {exe}, which is not installed",
                           "install cmake and a C++ compiler (Debian: apt-get install cmake g++)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another command is building llama.cpp right now; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(settings):
            return root
        log = root.parent / f"{root.name}-build.log"
        log.write_text("")
        say(f"llama.cpp's converter and library are not built yet: building them once into {root} "
            f"(about 6 minutes on 2 cores; output in {log})")
        with tempfile.TemporaryDirectory(prefix=".build-", dir=root.parent) as tmp_name:
            tmp = Path(tmp_name)
            src = _fetch_source(tmp, log, say)
            cpp, build = src / "vendor" / "llama.cpp", tmp / "build"
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(["cmake", "-S", str(cpp), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                  "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                  "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                  "-DLLAMA_BUILD_COMMON=OFF", "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
                  "-DCMAKE_INSTALL_RPATH=$ORIGIN"], log, say, "configuring llama.cpp (cmake)")
            _run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama"],
                 log, say, "building llama.cpp")
            out = tmp / "out"
            out.mkdir()
            for item in KEEP:
                (shutil.copytree if (cpp / item).is_dir() else shutil.copy2)(cpp / item, out / item)
            # the bindings find the library in their own lib/ folder, as in the package's wheel
            shutil.copytree(src / "llama_cpp", out / "python" / "llama_cpp", ignore=shutil.ignore_patterns("server"))
            lib = out / "python" / "llama_cpp" / "lib"
            lib.mkdir(exist_ok=True)
            for so in (build / "bin").glob("*.so*"):
                shutil.copy2(so, lib / so.name, follow_symlinks=True)
            (out / "supported.txt").write_text("\n".join(sorted(set(_list_architectures(out)))) + "\n")
            if root.exists():  # a folder without all its parts (left by hand): replaced
                shutil.rmtree(root)
            out.rename(root)
        say(f"llama.cpp is ready in {root}")
    return root


def call(settings: Settings, command: str, timeout: float = 3600, **args) -> dict:
    """Run one of this module's commands in a child process that loads the llama library; its JSON answer."""
    lib = home(settings) / "python" / "llama_cpp" / "lib"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(home(settings) / "python"),
                                                                     os.environ.get("PYTHONPATH")])),
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(lib), os.environ.get("LD_LIBRARY_PATH")]))}
    done = subprocess.run([sys.executable, "-m", "lab.llamacpp", command, json.dumps(args)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    try:
        answer = json.loads(last)
    except ValueError:
        answer = None
    if done.returncode != 0 or not isinstance(answer, dict) or "error" in answer:
        why = answer.get("error") if isinstance(answer, dict) else done.stderr.strip()[-600:]
        why = why or f"exit {done.returncode}"
        raise LabError(f"llama.cpp {command} failed: {why}")
    return answer


# --- the child process's side ----------------------------------------------------------------------------------


def _quantize(src: str, out: str, quant: str) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = os.cpu_count() or 2
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), params)
    if rc != 0:
        return {"error": f"llama_model_quantize returned {rc}"}
    return {"file": out, "bytes": os.path.getsize(out)}


def _describe(path: str) -> dict:
    """Load the file's vocabulary and metadata with llama.cpp (cheap): what a runtime will read from it."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    meta = dict(llm.metadata)
    return {"architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
            "vocab": llm.n_vocab(), "chat_template": bool(meta.get("tokenizer.chat_template")),
            "file_type": meta.get("general.file_type")}


def _greedy(path: str, tokens: list[int] | None = None, text: str | None = None, n: int = 16,
            n_ctx: int = 512) -> dict:
    """llama.cpp's greedy continuation of `tokens` (or of `text`, tokenized by llama.cpp from the file)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, verbose=False, seed=0)
    prompt = tokens if tokens is not None else llm.tokenize(text.encode(), add_bos=True, special=True)
    out = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if llm.token_eos() == tok:
            break
        out.append(int(tok))
        if len(out) >= n:
            break
    return {"prompt": [int(t) for t in prompt], "tokens": out,
            "text": llm.detokenize(out).decode("utf-8", errors="replace")}


def _tokenize(path: str, text: str) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    return {"tokens": llm.tokenize(text.encode(), add_bos=False, special=True)}


COMMANDS = {"quantize": _quantize, "describe": _describe, "greedy": _greedy, "tokenize": _tokenize}

if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:  # `make llama-cpp`
        from lab.settings import load

        try:
            ensure(load(), say=lambda m: print(m, flush=True))
        except LabError as exc:
            sys.exit(f"error: {exc}")
        sys.exit(0)
    try:
        print(json.dumps(COMMANDS[sys.argv[1]](**json.loads(sys.argv[2]))))
    except Exception as exc:  # the parent turns this into a LabError with the reason
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
