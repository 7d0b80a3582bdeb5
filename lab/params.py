"""The parameters trainer plugins share, as mixins in the style of TRL's configs: a plugin's Params lists its own
fields and the groups it takes, and sets its own default where it differs by declaring the field again.

    class Params(TrainParams, Lora, Optimiser, Split, Precision, Passthrough):
        model_config = ConfigDict(extra="forbid")
        beta: float = Field(0.1, gt=0, le=10, description="...")
        learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate (5e-5 LoRA, 5e-7 full).")

`RunContext.trainer_args` maps the groups' fields onto the trainer's configuration (`extra_args` last, so what the
user passes through wins), `RunContext.lora` builds the peft configuration, `RunContext.split` holds rows out and
`RunContext.save` writes the output. Forms list a plugin's own fields first, then the groups' (`ordered_fields`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


def advanced(widget: str | None = None, **kw) -> dict:
    """Field arguments for a parameter that forms fold away: `Field(default, **advanced(ge=0, description=...))`;
    `widget="slider"` asks for a slider."""
    return {"json_schema_extra": {"advanced": True, "widget": widget}, **kw}


def model_field(default: str = "", *, description: str, kind: str | None = None, several: bool = False,
                **kw) -> Any:
    """A field that names registered models (several: comma-separated): forms offer the registry's models of `kind`
    ("reward", "full|adapter"), and the runner resolves the names before the job starts (`ctx.models[field]`),
    recording each model in job.json. An empty value names none."""
    return Field(default, description=description,
                 json_schema_extra={"widget": "models" if several else "model", "model_kind": kind}, **kw)


class TrainParams(BaseModel):
    """Parameters every trainer plugin shares (subclass it: `class Params(TrainParams)`): its checkpoints."""

    save_steps: int = Field(0, **advanced(ge=0, description="Also checkpoint every this many steps; 0: by time only."))
    save_minutes: float = Field(10.0, **advanced(
        ge=0, le=10080, description="Checkpoint after this many minutes of training since the last checkpoint (and "
        "always when the job is stopped), so an interrupted or retried job resumes; 0: only every save_steps."))
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", **advanced(
        description="Recompute activations in the backward pass instead of keeping them: less memory, about a third "
        "more compute. auto: on only when they would take over a quarter of the free memory."))
    profile_steps: int = Field(0, **advanced(
        ge=0, le=10, description="Record this many training steps (after the first) with the torch profiler: the "
        "run's profile.txt lists the ops that took the time, profile.json.gz is a trace for Perfetto, and the metric "
        "profile/matmul_share is the part of the step time in matrix multiplications. 0: off."))


class Optimiser(BaseModel):
    """How long and how fast: the optimiser, its schedule, the batch and the logging."""

    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (try 2e-4 for LoRA, 2e-5 full).")
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 to use epochs.")
    batch_size: int = Field(4, ge=1, le=4096, description="Examples per device per step.")
    seed: int = Field(42, description="Random seed for shuffling, the split and initialisation.")
    grad_accum: int = Field(1, **advanced(ge=1, le=1024, description="Steps whose gradients are summed before an "
                                                                   "update."))
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", **advanced(description="Learning-rate schedule."))
    warmup_steps: int = Field(0, **advanced(ge=0, description="Steps of linear warm-up."))
    weight_decay: float = Field(0.0, **advanced(ge=0, le=1, description="AdamW weight decay."))
    logging_steps: int = Field(1, **advanced(ge=1, description="Record metrics every this many steps."))


class Lora(BaseModel):
    """A LoRA adapter (peft) instead of training every weight."""

    use_lora: bool = Field(True, description="Train a LoRA adapter (small, fast) instead of every weight.")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank: the adapter's capacity.")
    lora_alpha: int = Field(32, **advanced(ge=1, le=4096, description="LoRA scaling; commonly twice the rank."))
    lora_dropout: float = Field(0.0, **advanced("slider", ge=0, lt=1, description="Dropout inside the LoRA layers "
                                                "(its random masks cost about a sixth of a step on a CPU)."))
    lora_target: str = Field("all-linear", **advanced(description="Modules that get adapters, e.g. q_proj,v_proj."))


class Split(BaseModel):
    """Rows held out to measure the eval loss as training goes."""

    eval_split: float = Field(0.0, ge=0, lt=0.5, description="Fraction of rows held out to measure eval loss.",
                              json_schema_extra={"widget": "slider"})
    eval_steps: int = Field(50, **advanced(ge=1, description="Evaluate every this many steps (with eval_split)."))


class Precision(BaseModel):
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 mixed precision where the hardware has it and a probe shows no loss of "
        "quality; fp32 otherwise.")


class Passthrough(BaseModel):
    """Any further argument of the trainer's configuration, by name (the plugin's CONFIG names the class). It wins
    over the lab's own choice for that argument; an unknown name, or one the lab must set itself, is refused before
    the job is queued. On the command line an unknown `--set` name lands here."""

    extra_args: dict[str, Any] = Field(default_factory=dict, **advanced(
        description="Further arguments of the trainer's configuration by name, e.g. {\"max_grad_norm\": 0.5}."))


def ordered_fields(cls: type[BaseModel]) -> list[str]:
    """The fields in the order forms show them: the plugin's own first, then each group's in the order the class
    lists its groups (a field the plugin declares again keeps its group's place)."""
    seen: list[str] = []
    bases = [b for b in cls.__mro__ if isinstance(b, type) and issubclass(b, BaseModel) and b is not BaseModel]
    inherited = {n for b in bases[1:] for n in b.model_fields}
    own = cls.__dict__.get("__annotations__", {})
    seen += [n for n in own if n in cls.model_fields and n not in inherited]
    for base in bases[1:]:
        seen += [n for n in base.__dict__.get("__annotations__", {}) if n in cls.model_fields and n not in seen]
    return seen + [n for n in cls.model_fields if n not in seen]
