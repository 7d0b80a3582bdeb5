"""Test plugin: finishes at once, writing one output file; appends its job id to `record` when given."""

from pydantic import BaseModel, ConfigDict, Field

ID = "instant"
KIND = "train"
ACCEPTS = ()
NEEDS_MODEL = False


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    record: str = Field("", description="File to which the job id is appended (to count runs).")
    steps: int = Field(3, ge=0, le=1000, description="Metric points to log.")
    tokens: int = Field(0, ge=0, description="Tokens each step counts (num_tokens), when above 0.")
    scores: bool = Field(False, description="Also log evaluation scores once and write a confusion matrix and "
                                            "200 examples' `correct` (all but every `steps`-th).")
    hold_mb: int = Field(0, ge=0, le=4096, description="Hold this many MiB in memory (every page touched) at first.")


def run(ctx, params: Params) -> None:
    import json

    held = bytearray(params.hold_mb * 2**20)
    for i in range(0, len(held), 4096):
        held[i] = 1  # touched: resident, not only reserved
    del held
    for step in range(1, params.steps + 1):
        ctx.log_metrics(step, {"loss": 1.0 / step, **({"num_tokens": params.tokens * step} if params.tokens else {})})
        ctx.set_progress(step, params.steps)
    if params.scores:
        ctx.log_metrics(params.steps, {"eval/accuracy": 0.75, "eval/macro_f1": 0.7})
        (ctx.run_dir / "eval").mkdir(exist_ok=True)
        (ctx.run_dir / "eval" / "confusion_matrix.json").write_text(json.dumps(
            {"labels": ["ham", "spam"], "matrix": [[5, 1], [2, 4]]}))
        (ctx.run_dir / "eval" / "examples.jsonl").write_text("".join(
            json.dumps({"row": i + 1, "correct": float(i % params.steps != 0)}) + "\n" for i in range(200)))
    (ctx.output_dir / "result.txt").write_text(f"job {ctx.job_id}\n")
    if params.record:
        with open(params.record, "a") as f:
            f.write(f"{ctx.job_id}\n")
