"""The benchmarks' shared set-up: a fresh workspace with the first rows of the Alpaca file (or the lab's demo rows)
registered as dataset `rows`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "sft" / "alpaca_train.jsonl"
DEMO = ROOT / "lab" / "demo" / "instructions.jsonl"


def fresh() -> str:
    """Point the lab at a new workspace (SQLite, W&B off); returns its folder."""
    tmp = tempfile.mkdtemp(prefix="lab-bench-")
    os.environ.update({"LAB_WORKSPACE": tmp, "LAB_WANDB": "off"})
    os.environ.pop("LAB_DATABASE_URL", None)
    return tmp


def fresh_with_rows(rows: int):
    """Point the lab at a new workspace (SQLite, W&B off) and add the first `rows` rows as dataset `rows`; returns
    the settings, the workspace folder and the data file the rows came from."""
    tmp = fresh()
    from lab import datasets, settings

    s = settings.load()
    data = ALPACA if ALPACA.exists() else DEMO
    subset = Path(tmp) / "rows.jsonl"
    with open(data) as f:
        subset.write_text("".join(f.readlines()[:rows]))
    datasets.add(s, "rows", subset)
    return s, Path(tmp), data
