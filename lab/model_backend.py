"""The model behind `lab models serve`: transformers' own OpenAI-compatible server (what `transformers serve MODEL`
runs), in a child process that answers only on a Unix socket in a private folder. Only the lab's gate
(lab.model_server) reaches it; the gate is what listens on the user's port.

`python -m lab.model_backend SOCKET NAME FOLDER` serves the model in FOLDER under the id NAME. This is the one place
the lab uses transformers' server, through the class behind its command line (`transformers.cli.serve.Serve`, whose
arguments are the command's options) and its `run(socket=...)`: `lab.dependencies` names the range it is tested with.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

from lab.dependencies import internal

CACHE_TOKENS = 16384  # tokens the KV cache holds, all requests in flight together (e.g. 8 of 2,048)
CACHE_BLOCK = 256
STEP_TOKENS = 1024  # tokens one forward pass takes at most (a longer prompt is read in several)


def _exit_with_parent() -> None:
    """The gate started this process: when it dies, even by SIGKILL, this one gets SIGTERM (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def view(folder: Path, here: Path) -> Path:
    """`here`: the model's files, linked, with a generation config that samples. OpenAI's rule is that a request
    samples unless its temperature is 0; transformers' server turns sampling off for temperature 0 but never on, so a
    model whose generation config does not sample would ignore the temperature; and it takes a request's temperature,
    top_k and top_p only where the model's config names them."""
    from transformers import AutoConfig, GenerationConfig

    here.mkdir(parents=True)
    for entry in folder.iterdir():
        if entry.name != "generation_config.json":
            (here / entry.name).symlink_to(entry.resolve())
    if (folder / "generation_config.json").is_file():
        config = json.loads((folder / "generation_config.json").read_text())
    else:
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder)).to_diff_dict()
    config["do_sample"] = True
    # under continuous batching a request sets only the sampling settings the model's config names (temperature 0
    # is top_k 1): name all three, at generate()'s own defaults where the model has none
    for key, default in (("temperature", 1.0), ("top_k", 50), ("top_p", 1.0)):
        if config.get(key) is None:
            config[key] = default
    (here / "generation_config.json").write_text(json.dumps(config, indent=2))
    return here


def main(socket_path: str, name: str, folder: str) -> None:
    _exit_with_parent()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    view(Path(folder), Path.cwd() / name)  # the model's id is its lab name: no server path in any answer
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(socket_path)
    listening.listen(128)
    with internal("transformers-server"):
        from transformers.cli.serve import Serve

        class OnTheLabsSocket(Serve):
            def run(self, socket=None, engine_connection=None):  # noqa: A002 (Serve's own argument name)
                return super().run(socket=listening, engine_connection=engine_connection)

        # continuous batching: the requests in flight share each forward pass instead of waiting for each other in
        # turn (bench/serving.py). Its KV cache is sized here: left to itself it takes a share of the machine's
        # memory (14 GB for a 100 K-parameter model on a 24 GB machine)
        OnTheLabsSocket(force_model=name, device="auto" if torch.cuda.is_available() else "cpu", dtype="auto",
                        log_level="warning", continuous_batching=True, cb_block_size=CACHE_BLOCK,
                        cb_num_blocks=CACHE_TOKENS // CACHE_BLOCK, cb_max_batch_tokens=STEP_TOKENS)


if __name__ == "__main__":
    from lab.errors import LabError

    try:
        main(*sys.argv[1:4])
    except LabError as exc:  # the gate shows the end of this process's output
        sys.exit(f"error: {exc}")
