"""A plugin that does nothing but write its output: what the queue benchmarks run."""

from pydantic import BaseModel

ID = "noop"
KIND = "train"
ACCEPTS = ()
NEEDS_MODEL = False


class Params(BaseModel):
    pass


def run(ctx, params: Params) -> None:
    (ctx.output_dir / "done.txt").write_text("ok\n")
