"""The README stays true: every setting, built-in plugin and command is documented; every plugin shows its command."""

from __future__ import annotations

from conftest import ROOT

from lab import plugins
from lab.cli import app
from lab.settings import SETTINGS_DOC

README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [env for env, _, _ in SETTINGS_DOC.values() if f"`{env}`" not in README]
    assert missing == []


def test_every_builtin_plugin_is_in_the_readme_and_shows_its_command(ws):
    found, _ = plugins.discover(ws)
    for plugin in found.values():
        if plugin.origin != "built-in":
            continue
        assert f"`{plugin.id}`" in README
        assert plugin.example.startswith(f"lab run {plugin.id} "), f"{plugin.id}'s docstring shows no command"


def test_every_command_is_in_the_readme():
    import typer.main

    group = typer.main.get_command(app)
    names = []
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        names += [f"lab {name} {s}" for s in sub] if sub else [f"lab {name}"]
    missing = [n for n in names if n not in README]
    assert missing == []


def test_the_two_setup_commands_are_in_the_readme():
    assert "make run" in README and "make test" in README
