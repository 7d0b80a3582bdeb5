"""Test plugin: raises inside run()."""

from pydantic import BaseModel

ID = "failing"
KIND = "train"
ACCEPTS = ()
NEEDS_MODEL = False


class Params(BaseModel):
    pass


def run(ctx, params: Params) -> None:
    print("about to fail", flush=True)
    raise RuntimeError("boom from the plugin")
