"""The import directions of the house: the UI and CLI call services, services call the database; the database layer
knows no service; services never reach up into the UI or CLI, nor into the engine (jobs: workers, executors, the
runner), which uses them; plugins use the SDK (lab.sdk, lab services) and never import the UI, the CLI or the
engine; and no module imports itself through others (no import cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI = ("lab.ui", "lab.cli")
DATABASE = ("lab.db", "lab.tables", "lab.migrate", "lab.migrations")


def modules(folder: str) -> dict[str, Path]:
    found = {}
    for path in (ROOT / folder).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def offenders(sources: dict[str, Path], forbidden) -> list[str]:
    return sorted(f"{name} imports {target}" for name, path in sources.items() for target in imports(path)
                  if within(target, forbidden))


def test_services_never_import_the_ui_or_the_cli():
    services = {n: p for n, p in {**modules("lab"), **modules("jobs")}.items() if not within(n, UI)}
    assert offenders(services, UI) == []


def test_the_database_layer_imports_no_service():
    layer = {n: p for n, p in modules("lab").items() if within(n, DATABASE)}
    allowed = (*DATABASE, "lab.settings", "lab.errors")
    services = [n for n in {*modules("lab"), *modules("jobs")} if not within(n, allowed) and n not in ("lab", "jobs")]
    assert offenders(layer, services + ["jobs"]) == []


def test_plugins_never_import_the_ui_the_cli_or_the_engine():
    assert offenders(modules("plugins"), (*UI, "jobs", "lab.jobstore")) == []


def test_services_never_import_the_engine():
    """The engine (jobs/) runs what services queue; services, the job store included, know nothing of it. Only
    the UI and the CLI start workers."""
    services = {n: p for n, p in modules("lab").items() if not within(n, UI)}
    assert offenders(services, ("jobs",)) == []


def test_pages_never_import_each_other():
    """A tab is its layout and its handlers; what pages share (choices, uploads, refresh) is in lab.ui.choices and
    lab.ui.common, and only lab.ui.app assembles the tabs."""
    tabs = {n: p for n, p in modules("lab").items() if within(n, ("lab.ui.tabs",)) and n != "lab.ui.tabs"}
    assert tabs and [f"{n} imports {t}" for n, p in tabs.items() for t in imports(p)
                     if within(t, ("lab.ui.tabs",)) and not within(t, (n,))] == []


def graph(names: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of `names` it imports (an imported name resolves to its module)."""
    edges = {}
    for name, path in names.items():
        edges[name] = set()
        for target in imports(path):
            while target and target not in names:
                target = target.rpartition(".")[0]
            if target and target != name and target not in ("lab", "jobs", "plugins"):
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: each strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others():
    """Counting imports inside functions too: a cycle there is a design knot even when Python tolerates it."""
    assert cycles(graph({**modules("lab"), **modules("jobs"), **modules("plugins")})) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_checks_see_an_import_inside_a_function(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from lab.ui import app\n")
    assert within("lab.ui.app", UI) and "lab.ui" in imports(sample)
