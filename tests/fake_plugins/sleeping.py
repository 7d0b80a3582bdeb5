"""Test plugin: (takes memory if asked, then) sleeps without ever checking for cancellation; writes its pid to
pid.txt in the run folder, and what it was given (CUDA_VISIBLE_DEVICES, start and end times) to resources.json."""

import json
import os
import subprocess
import sys
import time

from pydantic import BaseModel, Field

ID = "sleeping"
KIND = "train"
ACCEPTS = ()
NEEDS_MODEL = False


class Params(BaseModel):
    seconds: float = Field(60, gt=0)
    child: bool = Field(False, description="Also start a grandchild process that sleeps (to test tree kills).")
    hog_mb: int = Field(0, ge=0, description="First take this much memory, 100 MB at a time (to test memory limits).")


def run(ctx, params: Params) -> None:
    (ctx.run_dir / "pid.txt").write_text(str(os.getpid()))
    started = time.time()
    if params.child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (ctx.run_dir / "child_pid.txt").write_text(str(child.pid))
    held = []
    while len(held) * 100 < params.hog_mb:
        held.append(b"\1" * (100 << 20))  # written, so resident
        time.sleep(0.05)
    print("sleeping", flush=True)
    deadline = time.monotonic() + params.seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    (ctx.run_dir / "resources.json").write_text(json.dumps(
        {"devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": started, "end": time.time()}))
    (ctx.output_dir / "done.txt").write_text("slept\n")
