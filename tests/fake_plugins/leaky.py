"""Test plugin: prints the secrets it was given (the lab must mask them in its log) and notes which it saw."""

import os

from pydantic import BaseModel, Field

ID = "leaky"
KIND = "train"
ACCEPTS = ()
NEEDS_MODEL = False


class Params(BaseModel):
    note: str = Field("", description="Any text (a test puts a secret here, as a careless user might).")
    fail: bool = Field(False, description="Fail with an error that quotes the key.")


def run(ctx, params: Params) -> None:
    seen = [k for k in ("WANDB_API_KEY", "HF_TOKEN") if os.environ.get(k)]
    print("my key is", os.environ.get("WANDB_API_KEY"), flush=True)
    if params.fail:
        raise ValueError(f"the hub refused token {os.environ.get('HF_TOKEN')}")
    (ctx.output_dir / "seen.txt").write_text(",".join(seen))
