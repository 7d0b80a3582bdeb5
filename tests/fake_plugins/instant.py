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


def run(ctx, params: Params) -> None:
    for step in range(1, params.steps + 1):
        ctx.log_metrics(step, {"loss": 1.0 / step})
        ctx.set_progress(step, params.steps)
    (ctx.output_dir / "result.txt").write_text(f"job {ctx.job_id}\n")
    if params.record:
        with open(params.record, "a") as f:
            f.write(f"{ctx.job_id}\n")
