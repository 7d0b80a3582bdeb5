"""Merge LoRA fine-tunes of one base model into one adapter with peft's `add_weighted_adapter`: a weighted sum
(linear), TIES (keep each adapter's largest changes, elect a sign, average what agrees) or DARE (drop changes at
random and rescale the rest), plain or with TIES's sign election. The job's model is the first adapter, `adapters`
names the others; the output is registered as an adapter on the same base, its lineage naming every parent and
weight. `lab models merge` queues it.

    lab run merge --model sft-3 --set adapters=sft-5 --set method=ties --set weights=1,1
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, Field

from lab.params import model_field

ID = "merge"
KIND = "tool"
ACCEPTS = ()
RESUMABLE = False
MODEL_KINDS = ("adapter",)
DESCRIPTION = "Merge LoRA adapters of one base into one: linear, TIES or DARE (peft's add_weighted_adapter)."


class Params(BaseModel):
    adapters: str = model_field(description="The other adapters to merge with the job's model, comma-separated "
                                            "(fine-tunes of the same base).", kind="adapter", several=True)
    method: Literal["linear", "ties", "dare_linear", "dare_ties"] = Field(
        "linear", description="linear: a weighted sum; ties: trim to the largest changes, elect a sign, average "
                              "those that agree; dare_*: drop changes at random and rescale the rest.")
    weights: str = Field("", description="One weight per adapter, the job's model first, comma-separated "
                                         "[default: 1/n each for linear, 1 each otherwise].")
    density: float = Field(0.5, gt=0, le=1, description="ties and dare: the share of each adapter's changes kept.")
    seed: int = Field(0, description="Random seed (dare drops changes at random).")


def parents(params: Params, model: dict) -> list[str]:
    return [model["name"], *(n.strip() for n in params.adapters.split(",") if n.strip())]


def weights_of(params: Params, n: int) -> list[float]:
    if not params.weights.strip():
        return [1.0 / n if params.method == "linear" else 1.0] * n
    return [float(w) for w in params.weights.split(",")]


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    from lab import registry
    from lab.errors import LabError

    names = parents(params, model)
    problems = []
    if len(names) < 2 and not params.weights.strip():
        problems.append("`adapters`: name at least one adapter to merge with (or give a weight to scale one)")
    if len(set(names)) != len(names):
        problems.append(f"`adapters`: an adapter is named twice ({', '.join(names)})")
    try:
        weights = weights_of(params, len(names))
    except ValueError:
        problems.append(f"`weights`: {params.weights!r} is not a comma-separated list of numbers")
    else:
        if len(weights) != len(names):
            problems.append(f"`weights`: {len(weights)} weight(s) for {len(names)} adapters ({', '.join(names)})")
    bases = {}
    for name in names:
        try:
            bases[name] = registry.info(settings, name).get("base_model")
        except LabError:  # an unknown name is reported by the model field's own check
            continue
    if len(set(bases.values())) > 1:
        problems.append("adapters of different base models do not merge: "
                        + ", ".join(f"{n} on {b}" for n, b in bases.items()))
    return problems


def run(ctx, params: Params) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lab import modeling

    torch.manual_seed(params.seed)
    infos = [ctx.model, *ctx.models["adapters"]]
    weights = weights_of(params, len(infos))
    ctx.set_phase("loading")
    base = AutoModelForCausalLM.from_pretrained(ctx.model["base_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, infos[0]["path"], adapter_name="m0")
    for i, info in enumerate(infos[1:], start=1):
        model.load_adapter(info["path"], adapter_name=f"m{i}")
    ctx.set_phase("merging")
    names = [f"m{i}" for i in range(len(infos))]
    kwargs = {} if params.method == "linear" else {"density": params.density}
    model.add_weighted_adapter(names, weights, "merged", combination_type=params.method, **kwargs)
    for name in names:
        model.delete_adapter(name)
    model.set_adapter("merged")
    model.save_pretrained(str(ctx.output_dir), selected_adapters=["merged"])
    moved = ctx.output_dir / "merged"  # peft writes a non-default adapter into a folder of its name
    if moved.is_dir():
        for f in moved.iterdir():
            f.rename(ctx.output_dir / f.name)
        moved.rmdir()
    from pathlib import Path

    has_tokenizer = (Path(infos[0]["path"]) / "tokenizer_config.json").is_file()
    modeling.tokenizer(infos[0]["path"] if has_tokenizer else ctx.model["base_path"],
                       log=ctx.log).save_pretrained(str(ctx.output_dir))
    record = {"method": params.method, "density": None if params.method == "linear" else params.density,
              "parents": [{"model": info["name"], "weight": w} for info, w in zip(infos, weights, strict=True)],
              "base_model": ctx.model.get("base_model")}
    (ctx.output_dir / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    ctx.log("[lab] merged " + ", ".join(f"{p['model']} × {p['weight']:g}" for p in record["parents"])
            + f" ({params.method}" + ("" if params.method == "linear" else f", density {params.density:g}") + ")")
