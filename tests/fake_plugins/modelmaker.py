"""Test plugin: copies a model folder into its output (a run that yields a model), optionally waiting at the end
until a gate file appears, so a test can act at the moment between the job's end and its outcome."""

import shutil
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

ID = "modelmaker"
KIND = "train"
ACCEPTS = ()
NEEDS_MODEL = False


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(..., description="Model folder to copy into output/.")
    gate: str = Field("", description="Wait for this file to exist before returning.")


def run(ctx, params: Params) -> None:
    shutil.copytree(params.source, ctx.output_dir, dirs_exist_ok=True)
    if params.gate:
        print("waiting at the gate", flush=True)
        while not Path(params.gate).exists():
            time.sleep(0.05)
