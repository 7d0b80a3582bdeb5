"""Merge fine-tunes of one base model into one model.

LoRA adapters merge with peft's `add_weighted_adapter` into a new adapter on the same base; full fine-tunes merge
with mergekit into a new full model (weights normalised to sum 1, mergekit's default). The methods: a weighted sum
(linear), TIES (keep each model's largest changes from the base, elect a sign, average what agrees) or DARE (drop
changes at random and rescale the rest), plain or with TIES's sign election. The job's model is the first parent,
`adapters` names the others; the output's lineage names every parent and weight. `lab models merge` queues it.

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
MODEL_KINDS = ("adapter", "full")
DESCRIPTION = ("Merge fine-tunes of one base into one: linear, TIES or DARE (peft's add_weighted_adapter for LoRA "
               "adapters, mergekit for full models).")


class Params(BaseModel):
    adapters: str = model_field(description="The other fine-tunes to merge with the job's model, comma-separated "
                                            "(LoRA adapters, or full models, of the same base).",
                                kind="full|adapter", several=True)
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
    infos = {}
    for name in names:
        try:
            infos[name] = registry.info(settings, name)
        except LabError:  # an unknown name is reported by the model field's own check
            continue
    kinds = {n: i["kind"] for n, i in infos.items()}
    if set(kinds.values()) - {"adapter", "full"}:
        problems.append("only language models merge: " + ", ".join(
            f"{n} is a {k}" for n, k in kinds.items() if k not in ("adapter", "full")))
    elif len(set(kinds.values())) > 1:
        problems.append("adapters and full models do not merge together: "
                        + ", ".join(f"{n} is {'an adapter' if k == 'adapter' else 'a full model'}"
                                    for n, k in kinds.items()))
    bases = {n: i.get("base_model") for n, i in infos.items()}
    if "adapter" not in kinds.values():  # a full model merges with its own fine-tunes (it is their base)
        bases = {n: b or (n if n in bases.values() else None) for n, b in bases.items()}
    if len(set(bases.values())) > 1:
        problems.append(f"{'adapters' if 'adapter' in kinds.values() else 'models'} of different base models do "
                        "not merge: " + ", ".join(f"{n} on {b or 'no recorded base'}" for n, b in bases.items()))
    full = [i for i in infos.values() if i["kind"] == "full"]
    if full and not problems:
        if params.method != "linear" and not any(i.get("base_model") for i in full):
            problems.append(f"{params.method} merges each model's changes from the base they were fine-tuned from, "
                            f"and {', '.join(i['name'] for i in full)} have none recorded: use method linear")
        shapes = {i["name"]: (i.get("architecture"), i.get("parameters")) for i in full}
        if len(set(shapes.values())) > 1:
            problems.append("models of different shapes do not merge: " + ", ".join(
                f"{n} ({a}, {p} parameters)" for n, (a, p) in shapes.items()))
    return problems


def _merge_full(ctx, params: Params, infos: list[dict], weights: list[float]) -> None:
    """Full models through mergekit: the base is the one the first parent was fine-tuned from."""
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    torch.manual_seed(params.seed)
    per_model = [{"model": info["path"], "parameters": {"weight": w, **(
        {} if params.method == "linear" else {"density": params.density})}} for info, w in zip(infos, weights,
                                                                                                strict=True)]
    config = {"merge_method": params.method, "models": per_model, "dtype": "float32"}
    if params.method != "linear":  # the base the fine-tunes started from (maybe itself a parent)
        config["base_model"] = next(i["base_path"] for i in infos if i.get("base_model"))
    run_merge(MergeConfiguration.model_validate(config), str(ctx.output_dir),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, random_seed=params.seed,
                                   write_model_card=False, quiet=True))


def run(ctx, params: Params) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lab import modeling

    torch.manual_seed(params.seed)
    infos = [ctx.model, *ctx.models["adapters"]]
    weights = weights_of(params, len(infos))
    if ctx.model["kind"] == "full":
        ctx.set_phase("merging")
        _merge_full(ctx, params, infos, weights)
        modeling.tokenizer(infos[0]["path"], log=ctx.log).save_pretrained(str(ctx.output_dir))
        _record(ctx, params, infos, weights)
        return
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
    _record(ctx, params, infos, weights)


def _record(ctx, params: Params, infos: list[dict], weights: list[float]) -> None:
    record = {"method": params.method, "density": None if params.method == "linear" else params.density,
              "parents": [{"model": info["name"], "weight": w} for info, w in zip(infos, weights, strict=True)],
              "base_model": ctx.model.get("base_model"), "kind": ctx.model["kind"],
              "weights_normalised": ctx.model["kind"] == "full"}
    (ctx.output_dir / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    ctx.log("[lab] merged " + ", ".join(f"{p['model']} × {p['weight']:g}" for p in record["parents"])
            + f" ({params.method}" + ("" if params.method == "linear" else f", density {params.density:g}") + ")")
