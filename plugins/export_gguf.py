"""Export a model as one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile and a model card.

llama.cpp's own converter and quantizer write workspace/exports/NAME/ (an adapter is merged into its base first; the
first GGUF export on a machine builds llama.cpp, about 3 minutes). The Models page's Export and `lab models export
--format gguf` queue this job: it shows on the Jobs page with its phase and log, and a cancelled export publishes
nothing.

    lab run export-gguf --model smollm2-135m-instruct --set quant=q8_0
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, Field

from lab.gguf_export import QUANTS

ID = "export-gguf"
KIND = "tool"
ACCEPTS = ()
RESUMABLE = False
MODEL_KINDS = ("full", "adapter", "classifier", "reward")  # the check below says why a head cannot go to GGUF


class Params(BaseModel):
    quant: Literal[QUANTS] = Field("f16", description="The GGUF type: a float type, or a llama.cpp quantization.")
    export_name: str = Field("", description="Name of the export's folder [default: MODEL-QUANT].")


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    from lab import gguf_export
    from lab.errors import LabError

    try:
        gguf_export.check(settings, model["name"], params.quant)
        gguf_export.check_free(settings, params.export_name or f"{model['name']}-{params.quant}")
    except LabError as exc:
        return [str(exc)]
    return []


def run(ctx, params: Params) -> None:
    from lab.gguf_export import export_gguf

    say = ctx.narrator({"downloading": "building", "building": "building", "llama.cpp's converter": "building",
                        "merging": "merging", "converting": "converting", "quantizing": "quantizing"})
    ctx.set_phase("exporting")
    done = export_gguf(ctx.settings, ctx.model["name"], params.quant, params.export_name or None, say=say)
    (ctx.output_dir / "export.json").write_text(json.dumps(done, indent=2) + "\n")
