"""Test plugin: returns normally but writes no output."""

from pydantic import BaseModel

ID = "silent"
KIND = "train"
ACCEPTS = ()
NEEDS_MODEL = False


class Params(BaseModel):
    pass


def run(ctx, params: Params) -> None:
    print("doing nothing", flush=True)
