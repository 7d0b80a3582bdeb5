"""Test plugin: prints the secrets it was given (the lab must mask them in its log) and notes which it saw."""

import os

from pydantic import BaseModel

ID = "leaky"
KIND = "train"
ACCEPTS = ()
NEEDS_MODEL = False


class Params(BaseModel):
    pass


def run(ctx, params: Params) -> None:
    seen = [k for k in ("WANDB_API_KEY", "HF_TOKEN") if os.environ.get(k)]
    print("my key is", os.environ.get("WANDB_API_KEY"), flush=True)
    (ctx.output_dir / "seen.txt").write_text(",".join(seen))
