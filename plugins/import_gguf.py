"""Import a GGUF file as a Hugging Face model folder in the workspace (dequantised to fp32) and register it.

The Models page's GGUF import and `lab models import-gguf NAME FILE` queue this job; the model is registered only
once its folder is complete, so a cancelled import leaves nothing. `file` is a path on the machine that runs the job.

    lab run import-gguf --set name=my-model --set file=/path/to/model.gguf
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

ID = "import-gguf"
KIND = "tool"
ACCEPTS = ()
RESUMABLE = False
NEEDS_MODEL = False


class Params(BaseModel):
    name: str = Field(..., description="The new model's name.")
    file: str = Field(..., description="Path of the .gguf file.")
    source: str = Field("gguf", description="What the registry says the model came from: gguf or starter.")


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    from lab import registry
    from lab.errors import LabError

    try:
        registry.check_import(settings, params.name, params.file)
    except LabError as exc:
        return [str(exc)]
    return []


def run(ctx, params: Params) -> None:
    from lab import registry

    ctx.set_phase("importing")
    ctx.log(f"importing {params.file} as {params.name} (dequantised to fp32)")
    info = registry.import_gguf(ctx.settings, params.name, params.file, source=params.source)
    ctx.log(f"imported model {info['name']} into {info['path']}")
    (ctx.output_dir / "import.json").write_text(json.dumps({"name": info["name"], "path": info["path"]}) + "\n")
