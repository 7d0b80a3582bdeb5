"""Test plugin: fails inside run(), in the way `how` names (a plain exception by default)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ID = "failing"
KIND = "train"
ACCEPTS = ()
NEEDS_MODEL = False


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    how: Literal["error", "torch_oom", "memory", "grow", "missing_module", "data"] = Field("error")


def run(ctx, params: Params) -> None:
    print("about to fail", flush=True)
    if params.how == "torch_oom":  # what torch says when an allocation does not fit: a RuntimeError
        import torch

        torch.empty(2**46, dtype=torch.uint8)  # 64 TiB
    if params.how == "memory":
        bytearray(2**46)
    if params.how == "grow":  # touch 64 MiB more every tenth of a second, up to 16 GiB: the kernel's limit comes first
        import time

        held = []
        for _ in range(256):
            held.append(b"\x01" * 2**26)
            time.sleep(0.1)
    if params.how == "missing_module":
        import lab_no_such_package  # noqa: F401
    if params.how == "data":
        from lab.errors import DataError

        raise DataError("every row lost its reply to max_length=8", "raise max_length")
    raise RuntimeError("boom from the plugin")
