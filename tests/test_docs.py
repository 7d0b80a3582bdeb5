"""The docs stay true: every setting, built-in plugin and command is documented (README.md and docs/*.md), every
plugin shows its command, every link and picture exists, the README stays short, and its plugin runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import ROOT, wait_for_status

from lab import plugins, runs
from lab.cli import app
from lab.settings import SETTINGS_DOC

README = (ROOT / "README.md").read_text()
PAGES = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
DOCS = "\n".join([README, *PAGES.values()])


def test_every_setting_is_documented_on_the_settings_page():
    missing = [env for env, _, _ in SETTINGS_DOC.values() if f"`{env}`" not in PAGES["settings.md"]]
    assert missing == []


def test_every_builtin_plugin_is_on_the_plugins_page_and_shows_its_command(ws):
    found, _ = plugins.discover(ws)
    for plugin in found.values():
        if plugin.origin != "built-in":
            continue
        assert f"`{plugin.id}`" in PAGES["plugins.md"], plugin.id
        assert plugin.example.startswith(f"lab run {plugin.id} "), f"{plugin.id}'s docstring shows no command"


def test_every_command_is_on_the_command_line_page():
    import typer.main

    group = typer.main.get_command(app)
    names = []
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        names += [f"lab {name} {s}" for s in sub] if sub else [f"lab {name}"]
    missing = [n for n in names if n not in PAGES["cli.md"]]
    assert missing == []


def test_the_readme_is_short_and_shows_the_two_commands_and_the_fast_tier():
    assert len(README.splitlines()) <= 250
    assert "make run" in README and "make test" in README and "make test-fast" in README


def test_every_link_and_picture_in_the_docs_exists():
    for name, text in [("README.md", README), *((f"docs/{n}", t) for n, t in PAGES.items())]:
        base = ROOT if name == "README.md" else ROOT / "docs"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            assert (base / target).exists(), f"{name} links to {target}, which does not exist"
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", README))
    assert linked == set(PAGES), f"pages the README does not link: {set(PAGES) - linked}"


def test_the_modules_the_readme_names_exist():
    for path in set(re.findall(r"`((?:lab|jobs|plugins|bench)/[\w/]+\.py)`", DOCS)):
        assert (ROOT / path).is_file(), path
    for module, function in re.findall(r"`((?:lab|jobs)/[\w/]+\.py)`, `(\w+)`", README):
        found = re.search(rf"^(def|class) {function}\b", (ROOT / module).read_text(), re.M)
        assert found, f"{module} has no {function}"


def test_the_readmes_plugin_runs_as_the_readme_says(ws, jobs_worker, tmp_path, monkeypatch):
    from lab import datasets

    source = re.search(r"## A plugin.*?```python\n(.*?)```", README, re.S)[1]
    (tmp_path / "readme_plugin.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]]))
    monkeypatch.setenv("LAB_EXTRA_PLUGINS", "readme_plugin")
    from lab import settings

    s = settings.load()
    (tmp_path / "notes.txt").write_text("one two three four\n\nshort\n\nfive six seven\n")
    datasets.add(s, "notes", tmp_path / "notes.txt")
    example = plugins.get(s, "wordcount").example
    assert example == "lab run wordcount --dataset notes --set min_words=3"
    job = runs.submit(s, "wordcount", dataset="notes", params={"min_words": 3})
    jobs_worker(s).serve(until_empty=True)
    assert wait_for_status(s, job) == "completed", runs.get_job(s, job)
    run_dir = Path(runs.get_job(s, job)["run_dir"])
    if not run_dir.is_absolute():
        run_dir = s.workspace / run_dir
    assert (run_dir / "output" / "results.json").read_text() == '{"texts": 2}\n'  # two of three texts have 3 words
    assert runs.metrics(s, [job], ["eval/mean_words"])[job]["eval/mean_words"][0][1] == 3.5
