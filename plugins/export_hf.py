"""Export a model as a standalone Hugging Face folder with a model card, and a .tar.gz of it to download.

An adapter is merged into its base, or with `adapter=true` kept as an adapter whose base is named so that it loads
elsewhere. The Models page's Export and `lab models export` queue this job; a cancelled export publishes nothing.

    lab run export-hf --model smollm2-135m-instruct
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

ID = "export-hf"
KIND = "tool"
ACCEPTS = ()
RESUMABLE = False
MODEL_KINDS = ("full", "adapter", "classifier", "reward")


class Params(BaseModel):
    export_name: str = Field("", description="Name of the export's folder and archive [default: the model's].")
    adapter: bool = Field(False, description="Export an adapter as an adapter (not merged into its base).")


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    from lab import export
    from lab.errors import LabError

    try:
        export.check(settings, model["name"], params.export_name or None, adapter=params.adapter)
    except LabError as exc:
        return [str(exc)]
    return []


def run(ctx, params: Params) -> None:
    from lab.export import export

    say = ctx.narrator({"merging": "merging", "copying": "exporting", "archiving": "archiving"})
    ctx.set_phase("exporting")
    done = export(ctx.settings, ctx.model["name"], params.export_name or None, adapter=params.adapter, say=say)
    (ctx.output_dir / "export.json").write_text(json.dumps(done, indent=2) + "\n")
