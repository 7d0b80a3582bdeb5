"""The libraries whose internals the lab reaches into, the versions it is tested with, and the words for an error when
one of them moved.

Each internal is used inside `internal(KEY)`: an ImportError, AttributeError or TypeError
there (a class renamed, an argument gone) becomes a LabError that names the library, its installed version and the
range pyproject.toml pins it to, instead of "unexpected TypeError". `tests/test_dependencies.py` checks every
internal of INTERNALS against the installed versions, so an upgrade that moves one fails there first, loudly.
Any other unexpected error names the library its traceback ended in (`describe`).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError

# The web server runs handlers in threads. transformers and TRL resolve their names lazily, and two threads doing
# that at once see half-imported modules ("cannot import name 'PreTrainedTokenizerBase' from 'transformers'"): every
# import of them that a handler can reach happens under this lock (re-entrant: trl() imports transformers too).
IMPORTS = threading.RLock()

DISTRIBUTION = "llm-lab"
UPGRADE_HINT = ("reinstall the versions the lab is tested with (`make install`, which follows constraints.txt), "
                "or see the README's 'Upgrading a dependency'")

@dataclass(frozen=True)
class Internal:
    """An internal of `library` the lab uses (`what`, in `where`), and a check that it is still there as used."""

    key: str
    library: str
    what: str
    where: str
    check: Callable[[], None]


def _takes(function: Callable, *names: str) -> None:
    """Raise TypeError unless `function` takes arguments with these names."""
    import inspect

    missing = [n for n in names if n not in inspect.signature(function).parameters]
    if missing:
        raise TypeError(f"{function.__qualname__} no longer takes {', '.join(missing)}")


def _transformers_server() -> None:
    from transformers.cli.serve import Serve

    _takes(Serve.__init__, "force_model", "device", "dtype", "log_level", "continuous_batching", "cb_block_size",
           "cb_num_blocks", "cb_max_batch_tokens")
    _takes(Serve.run, "socket", "engine_connection")


def _trl_ppo() -> None:
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer  # noqa: F401

    _takes(PPOTrainer.__init__, "args", "processing_class", "model", "ref_model", "reward_model", "value_model",
           "train_dataset", "eval_dataset", "callbacks")
    _takes(ppo_trainer.truncate_response, "stop_token_id", "pad_token_id", "responses")
    _takes(ppo_trainer.print_rich_table, "df")


def _trl_orpo() -> None:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: F401

    _takes(ORPOTrainer.build_tokenized_answer, "prompt", "answer")
    _takes(ORPOTrainer.tokenize_row, "feature")


def _trl_preparation() -> None:
    import trl
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    _takes(trl.SFTTrainer._prepare_dataset, "dataset", "processing_class", "args", "packing", "formatting_func",
           "dataset_name")
    for trainer in (trl.DPOTrainer, trl.KTOTrainer, trl.RewardTrainer):
        _takes(trainer._prepare_dataset, "dataset", "processing_class", "args", "dataset_name")
    _takes(DataCollatorForPreference.__init__, "pad_token_id", "max_length")


def _gradio_server() -> None:
    import gradio as gr
    from gradio.http_server import Server

    _takes(Server.run_in_thread)
    with gr.Blocks() as blocks:
        pass
    if not hasattr(blocks, "has_launched"):
        raise AttributeError("Blocks has no has_launched")


def _gradio_upload_folder() -> None:
    from gradio.utils import get_upload_folder

    if not isinstance(get_upload_folder(), str):
        raise TypeError("get_upload_folder() no longer returns a path")


def _gradio_plot_data() -> None:
    from gradio.components.plot import PlotData

    if set(PlotData.model_fields) != {"type", "plot"}:
        raise TypeError(f"PlotData has the fields {sorted(PlotData.model_fields)}, not type and plot")


def _lm_eval() -> None:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _takes(TaskManager.__init__, "include_path", "include_defaults", "verbosity")
    for method in ("_model_call", "_model_generate"):
        if not callable(getattr(HFLM, method, None)):
            raise AttributeError(f"HFLM has no {method}")
    entry = TaskManager(include_path=[str(Path(__file__).parent / "demo" / "benchmarks")],
                        include_defaults=False, verbosity="ERROR").task_index["capitals"]
    if not (isinstance(entry.cfg, dict) and entry.yaml_path):
        raise AttributeError("TaskManager.task_index entries no longer carry cfg and yaml_path")


# The internals the lab uses; pyproject.toml pins each library below its next minor, with the reason beside it
INTERNALS = (
    Internal("transformers-server", "transformers",
             "its server (transformers.cli.serve.Serve, run on a socket of the lab's)", "lab/model_backend.py",
             _transformers_server),
    Internal("trl-ppo", "trl", "the experimental PPO trainer (trl.experimental.ppo) and the two functions of it the "
             "lab replaces (truncate_response, print_rich_table)", "plugins/ppo.py", _trl_ppo),
    Internal("trl-orpo", "trl", "the experimental ORPO trainer (trl.experimental.orpo) and its tokenization",
             "plugins/orpo.py, lab/modeling.py, lab/preview.py", _trl_orpo),
    Internal("trl-preparation", "trl", "the trainers' own data preparation (the SFT, DPO, KTO and Reward trainers' "
             "_prepare_dataset) and DataCollatorForPreference", "lab/preview.py", _trl_preparation),
    Internal("gradio-server", "gradio", "its HTTP server class (gradio.http_server.Server) and Blocks.has_launched",
             "lab/ui/app.py", _gradio_server),
    Internal("gradio-upload-folder", "gradio", "gradio.utils.get_upload_folder", "lab/ui/tabs/datasets.py",
             _gradio_upload_folder),
    Internal("gradio-plot-data", "gradio", "gradio.components.plot.PlotData", "lab/ui/charts.py", _gradio_plot_data),
    Internal("lm-eval-tasks", "lm-eval", "TaskManager's index (task_index entries' cfg and yaml_path) and the "
             "HFLM methods a job wraps to be cancellable (_model_call, _model_generate)", "plugins/eval_harness.py",
             _lm_eval),
)




class DependencyChanged(LabError):
    """A library the lab reaches into is installed at a version whose internals differ from the tested ones."""


def version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _requirements() -> list[str]:
    """The lab's requirements: pyproject.toml's in a checkout (an editable install's metadata can be older), else
    the installed distribution's."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        return tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    try:
        return importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return []


def tested_range(library: str) -> str:
    """The range pyproject.toml allows for `library`, e.g. '>=5.25,<5.26'."""
    requirements = _requirements()
    for requirement in requirements:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*([^;]*)", requirement)
        if m and _normal(m[1]) == _normal(library):
            parts = sorted((p.strip() for p in m[2].split(",") if p.strip()), key=lambda p: (not p.startswith(">"), p))
            return ",".join(parts) or "any version"
    return "the versions in pyproject.toml"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def changed(library: str, what: str, exc: BaseException) -> DependencyChanged:
    return DependencyChanged(
        f"{library} {version(library)} changed {what} ({type(exc).__name__}: {exc}); this lab is tested with "
        f"{library}{tested_range(library)}", UPGRADE_HINT)


@contextmanager
def internal(key: str) -> Iterator[None]:
    """Use the internal INTERNALS names `key`: where it moved, the error says which library, which version and
    what, instead of "unexpected TypeError"."""
    use = next(u for u in INTERNALS if u.key == key)
    try:
        yield
    except (ImportError, AttributeError, TypeError) as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name and not exc.name.startswith(use.library):
            raise  # another package missing: not this library's internals
        raise changed(use.library, use.what, exc) from exc


def library_of(exc: BaseException) -> str | None:
    """The installed library the exception's traceback ended in, if it ended in one (not the lab's own code)."""
    owners = importlib.metadata.packages_distributions()
    found = None
    tb = exc.__traceback__
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename)
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            parts = path.parts
            top = parts[max(i for i, p in enumerate(parts) if p in ("site-packages", "dist-packages")) + 1]
            names = owners.get(top.removesuffix(".py"))
            if names and _normal(names[0]) != DISTRIBUTION:
                found = names[0]
        else:
            found = None if _is_lab(path) else found
        tb = tb.tb_next
    return found


def _is_lab(path: Path) -> bool:
    root = Path(__file__).resolve().parent.parent
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def describe(exc: BaseException) -> str:
    """'unexpected TypeError in trl 1.12.0 (tested with trl>=1.12,<1.13): ...', or without the library where the
    error was raised in the lab's own code."""
    library = library_of(exc)
    where = f" in {library} {version(library)} (tested with {library}{tested_range(library)})" if library else ""
    return f"unexpected {type(exc).__name__}{where}: {exc}"


def check_all() -> list[DependencyChanged]:
    """Every internal in INTERNALS checked against the installed libraries: what moved, as errors."""
    moved = []
    for use in INTERNALS:
        try:
            with internal(use.key):
                use.check()
        except DependencyChanged as exc:
            moved.append(exc)
    return moved


if __name__ == "__main__":  # `python -m lab.dependencies`: the internals in use, checked against what is installed
    for use in INTERNALS:
        print(f"{use.library} {version(use.library)} (tested: {use.library}{tested_range(use.library)}): "
              f"{use.what} in {use.where}")
    problems = check_all()
    for problem in problems:
        print(f"error: {problem}")
    sys.exit(1 if problems else 0)
