"""Standard benchmarks through EleutherAI's lm-evaluation-harness (the `lm_eval` library), offline.

    lab run eval-harness --model sft-7 --set tasks=capitals --set limit=20
    lab run eval-harness --model sft-7 --set tasks=arc_easy,hellaswag --set num_fewshot=5

A task is one of the harness's own (arc_easy, hellaswag, mmlu, ...: their data must already be in this machine's
Hugging Face datasets cache; the job never downloads), one in `task_dir` (harness task YAML files; a relative
`data_files` path or `dataset_path` folder is read from the YAML's folder), or the lab's own `capitals` (a
four-choice demo, 30 questions). Each task's figures and their standard errors go to `eval/<task>/<metric>` and
`eval/<task>/<metric>_stderr` (the Compare leaderboard shows them), each example's scores to eval/examples.jsonl
(so Compare can say whether a difference between two models is real), and the harness's own results (without
the examples) to output/harness.json.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lab import evaluation, modeling
from lab.dependencies import internal
from lab.errors import DataError
from lab.significance import is_number

ID = "eval-harness"
KIND = "eval"
ACCEPTS = ()
DESCRIPTION = "Standard benchmarks (lm-evaluation-harness tasks) from local data, per task with standard errors."

OWN_TASKS = Path(__file__).resolve().parent.parent / "lab" / "demo" / "benchmarks"
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: str = Field("capitals", description="Harness tasks or groups, comma-separated: the lab's capitals, ones "
                                               "in task_dir, or the harness's own whose data this machine has.")
    task_dir: str = Field("", description="A folder of harness task YAML files (and their data). Empty: the "
                                          "workspace's benchmarks folder.")
    limit: int = Field(0, ge=0, le=1_000_000, description="Examples per task at most (0: all).")
    num_fewshot: int = Field(-1, ge=-1, le=64, description="In-context examples per question (-1: the task's "
                                                           "own setting).")
    batch_size: int = Field(8, ge=1, le=512, description="Requests scored at once.")
    seed: int = Field(0, description="Random seed (few-shot draws, sampling).")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: str) -> str:
        names = [t.strip() for t in value.split(",") if t.strip()]
        if not names:
            raise ValueError("name at least one task, e.g. capitals or arc_easy")
        bad = [t for t in names if not TASK_NAME.match(t) or len(t) > 200]
        if bad:
            raise ValueError(f"{bad[0][:60]!r} is not a task name (letters, digits, _ . -)")
        return ",".join(dict.fromkeys(names))


def task_dirs(params: Params, settings) -> list[Path]:
    """Where local task files are looked for: the lab's own, then `task_dir` (or the workspace's benchmarks)."""
    mine = Path(params.task_dir).expanduser() if params.task_dir else Path(settings.workspace) / "benchmarks"
    return [OWN_TASKS] + ([mine] if mine.is_dir() else [])


def _local_index(folders: list[Path]):
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with modeling.IMPORTS:  # the web server checks a launch in a handler thread: lm_eval imports transformers
        from lm_eval.tasks import TaskManager
    return TaskManager(include_path=[str(f) for f in folders], include_defaults=False, verbosity="ERROR")


def _missing(entry) -> list[str]:
    """The files a local task's `data_files` name that are not on this machine (a relative path is read from the
    YAML's own folder)."""
    folder = Path(entry.yaml_path).parent
    files = (entry.cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    paths = [folder / Path(f).expanduser() for f in ([files] if isinstance(files, str) else files or [])]
    return [str(p) for p in paths if not any(ch in str(p) for ch in "*?[") and not p.exists()]


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    problems = modeling.not_causal(model)
    if params.task_dir and not Path(params.task_dir).expanduser().is_dir():
        return problems + [f"`task_dir`: {params.task_dir} is not a folder on this machine"]
    with internal("lm-eval-tasks"):
        index = _local_index(task_dirs(params, settings)).task_index
        for name in params.tasks.split(","):
            entry = index.get(name)
            if entry is not None and entry.yaml_path is not None:
                for path in _missing(entry):
                    problems.append(f"task {name} needs {path}, which is not on this machine (its YAML file "
                                    f"{entry.yaml_path} names it)")
    return problems


def summary_of(results: dict) -> dict[str, float]:
    """{task/metric: value, task/metric_stderr: its standard error} from the harness's results (a filter other
    than `none` is kept in the name: task/exact_match/strict-match and task/exact_match/strict-match_stderr)."""
    out = {}
    for task, figures in results.items():
        for key, value in figures.items():
            if "," not in key or not is_number(value):
                continue
            metric, filt = key.split(",", 1)
            base = metric.removesuffix("_stderr")
            name = f"{task}/{base}" + ("" if filt == "none" else f"/{filt}") + ("_stderr" if base != metric else "")
            out[name] = float(value)
    return out


def examples_of(samples: dict) -> list[dict]:
    """One row per scored example: its task, doc_id, target, what the model chose, and each metric's value under
    `task/metric` (the names of the summary, so Compare pairs each score with the same example of another run)."""
    rows = []
    for task in sorted(samples):
        for s in sorted(samples[task], key=lambda s: s["doc_id"]):
            row = {"task": task, "doc_id": s["doc_id"], "target": str(s.get("target"))}
            resps = s.get("filtered_resps") or []
            if resps and all(isinstance(r, (list, tuple)) and r and is_number(r[0]) for r in resps):
                row["chosen"] = max(range(len(resps)), key=lambda i: resps[i][0])  # a multiple-choice answer
            elif resps and isinstance(resps[0], str):
                row["answer"] = resps[0]
            suffix = "" if s.get("filter", "none") == "none" else f"/{s['filter']}"
            for metric in s.get("metrics", []):
                if is_number(s.get(metric)):
                    row[f"{task}/{metric}{suffix}"] = float(s[metric])
            rows.append(row)
    return rows


def _load(manager, name: str):
    """A task or group by name, its data read from this machine only; DataError naming what is missing."""
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        raise DataError(f"no harness task named {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""),
                        "name a task in task_dir or the workspace's benchmarks folder, or one of the harness's "
                        "(`python -m lm_eval ls tasks` lists them)")
    entry = manager.task_index.get(name)
    here = os.getcwd()
    try:
        if entry is not None and entry.yaml_path is not None:
            os.chdir(Path(entry.yaml_path).parent)  # a task file's relative data paths are read from its folder
        built = manager.load([name])
    except (ConnectionError, OSError) as exc:
        missing = _missing(entry) if entry is not None and entry.yaml_path is not None else []
        if missing:
            raise DataError(f"task {name} needs {missing[0]}, which is not on this machine",
                            f"put the file there or change the data_files of {entry.yaml_path}") from exc
        cfg = entry.cfg if entry is not None else {}
        what = cfg.get("dataset_path") or "its data"
        what += f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else ""
        raise DataError(f"task {name} reads {what}, which is not on this machine ({str(exc)[:200]})",
                        "the lab never downloads at run time: copy the dataset into this machine's Hugging Face "
                        "datasets cache (load it once where there is a network), or write a task YAML in "
                        "task_dir whose data_files name local files") from exc
    finally:
        os.chdir(here)
    if name in built["groups"]:
        return [built["groups"][name]]  # a group keeps its own aggregate figures
    return [built["tasks"][name]] if name in built["tasks"] else list(built["tasks"].values())  # a tag: its tasks


def run(ctx, params: Params) -> None:
    import logging

    import torch

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with modeling.IMPORTS:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

    ctx.set_phase("reading the task list")
    folders = task_dirs(params, ctx.settings)
    names = params.tasks.split(",")
    with internal("lm-eval-tasks"):
        manager = TaskManager(include_path=[str(f) for f in folders], verbosity="ERROR")
        ctx.set_phase("loading the tasks' data")
        tasks = [_load(manager, name) for name in names]
    ctx.check_cancelled()

    ctx.set_phase("scoring")
    model = modeling.causal_lm(ctx.model, adapter="merge", log=ctx.log).eval()
    tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)

    class Watched(HFLM):  # cancel between batches
        def _model_call(self, *args, **kwargs):
            ctx.check_cancelled()
            return super()._model_call(*args, **kwargs)

        def _model_generate(self, *args, **kwargs):
            ctx.check_cancelled()
            return super()._model_generate(*args, **kwargs)

    with internal("lm-eval-tasks"):
        lm = Watched(pretrained=model, tokenizer=tokenizer, batch_size=params.batch_size)
    loaded = [t for found in tasks for t in found]
    with torch.no_grad():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=loaded, task_manager=manager, limit=params.limit or None,
            num_fewshot=None if params.num_fewshot < 0 else params.num_fewshot, log_samples=True,
            random_seed=params.seed, numpy_random_seed=params.seed, torch_random_seed=params.seed,
            fewshot_random_seed=params.seed, bootstrap_iters=1000)
    summary = summary_of(out["results"])
    if not summary:
        raise DataError(f"the harness returned no figures for {params.tasks}", "check the tasks' metric_list")
    kept = {k: out.get(k) for k in ("results", "versions", "n-shot", "n-samples", "higher_is_better",
                                    "lm_eval_version")}
    kept["tasks"], kept["limit"] = names, params.limit or None
    (Path(ctx.output_dir) / "harness.json").write_text(json.dumps(kept, indent=2, default=str) + "\n")
    for task, n in (out.get("n-samples") or {}).items():
        ctx.log(f"[lab] {task}: {n['effective']} of {n['original']} examples, {out['n-shot'].get(task, 0)}-shot")
    evaluation.record(ctx, summary, examples_of(out.get("samples") or {}))
