"""The libraries whose internals the lab uses: each internal still there in the installed version (a failure names
the library, its version and the tested range), pinned in pyproject.toml, and used only inside `internal(KEY)`;
unexpected errors name the library they came from."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from lab.dependencies import INTERNALS, DependencyChanged, describe, internal, version
from lab.dependencies import tested_range as range_of
from lab.diagnosis import diagnose

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("use", INTERNALS, ids=[u.key for u in INTERNALS])
def test_every_internal_the_lab_uses_is_there_in_the_installed_version(use):
    try:
        with internal(use.key):
            use.check()
    except DependencyChanged as exc:
        pytest.fail(str(exc))


def test_every_library_with_internals_is_pinned_below_its_next_minor_with_the_reason_beside_it():
    text = (ROOT / "pyproject.toml").read_text()
    for library in {u.library for u in INTERNALS}:
        line = next(line for line in text.splitlines() if re.match(rf'\s*"{library}[>=<]', line))
        upper = re.search(r"<(\d+)\.(\d+)\b", line)
        assert upper, f"{library} has no upper bound below a minor version: {line.strip()}"
        assert "#" in line, f"{library}'s pin says no reason: {line.strip()}"
        installed = tuple(int(p) for p in version(library).split(".")[:2])
        assert installed < (int(upper[1]), int(upper[2])), f"{library} {version(library)} is outside {line.strip()}"
    assert range_of("transformers") == ">=5.25,<5.26"


def test_internals_are_used_only_inside_internal_with_a_listed_key():
    keys = {u.key for u in INTERNALS}
    used = set()
    for path in [*ROOT.glob("lab/**/*.py"), *ROOT.glob("plugins/*.py")]:
        for key in re.findall(r'internal\("([^"]+)"\)', path.read_text()):
            assert key in keys, f"{path}: internal({key!r}) is not in lab.dependencies.INTERNALS"
            used.add(key)
    assert used == keys, f"listed but never used: {keys - used}"
    # the internal modules themselves are imported nowhere else
    for path in [*ROOT.glob("lab/**/*.py"), *ROOT.glob("plugins/*.py"), *ROOT.glob("jobs/*.py")]:
        if path.name == "dependencies.py":
            continue
        source = path.read_text()
        for module in ("transformers.cli", "gradio.http_server", "gradio.components.plot", "trl.experimental"):
            for m in re.finditer(rf"^\s*(from|import) {re.escape(module)}", source, re.M):
                before = source[:m.start()].splitlines()[-3:]
                assert any("internal(" in b for b in before), f"{path}: {m.group(0).strip()} outside internal()"


def test_a_moved_internal_names_the_library_its_version_and_the_tested_range():
    with pytest.raises(DependencyChanged) as err, internal("transformers-server"):
        raise TypeError("ModelManager.__init__() got an unexpected keyword argument 'device'")
    message = str(err.value)
    assert f"transformers {version('transformers')} changed its server" in message
    assert "this lab is tested with transformers>=5.25,<5.26" in message and "make install" in message
    # inside a job, that is a dependency failure with the same words, not "the plugin failed"
    failure = diagnose(err.value)
    assert failure.kind == "dependency" and f"transformers {version('transformers')}" in failure.reason
    # another package missing is not this library's internals moving
    with pytest.raises(ModuleNotFoundError), internal("transformers-server"):
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")


def test_an_unexpected_error_raised_in_a_library_names_it_and_its_version():
    from packaging.version import InvalidVersion, Version

    with pytest.raises(InvalidVersion) as err:
        Version("not a version")
    said = describe(err.value)
    assert said.startswith(f"unexpected InvalidVersion in packaging {version('packaging')}")
    assert "Invalid version" in said
    assert diagnose(err.value).reason.startswith("InvalidVersion in packaging ")
    # raised in the lab's own code: no library named
    try:
        raise ValueError("ours")
    except ValueError as own:
        assert describe(own) == "unexpected ValueError: ours"


def test_the_lock_file_pins_every_library_with_internals_inside_its_range():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {canonicalize_name(name): pinned for name, pinned in (
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#"))}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, [*project["dependencies"], *project["optional-dependencies"]["test"]]):
        name = canonicalize_name(requirement.name)
        if name == "torch":  # installed first by the Makefile (the CPU wheel, or TORCH=... on a GPU machine)
            assert name not in lock
            continue
        assert name in lock, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(lock[name]), f"constraints.txt has {name}=={lock[name]}"
