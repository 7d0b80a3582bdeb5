"""The web lab: gr.Blocks assembled from one module per tab, plus the named API endpoints. It holds no state:
every view is read from the database and the workspace, so reloads, extra tabs and restarts lose nothing."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from lab import compare, experiments
from lab.dependencies import internal
from lab.settings import Settings
from lab.ui import api, choices
from lab.ui.common import UI
from lab.ui.tabs import compare as compare_tab
from lab.ui.tabs import datasets as datasets_tab
from lab.ui.tabs import experiments as experiments_tab
from lab.ui.tabs import jobs as jobs_tab
from lab.ui.tabs import models as models_tab
from lab.ui.tabs import playground as playground_tab
from lab.ui.tabs import rank as rank_tab
from lab.ui.tabs import run as run_tab
from lab.ui.tabs import train as train_tab

REFRESH_S = 2.0

CSS = """
.gradio-container {max-width: 1400px !important}
#lab-title h2 {margin: 0}
.badge {color: white; padding: 2px 10px; border-radius: 10px; font-size: 0.85em; font-weight: 600}
.run-head {font-size: 1.05em; margin-bottom: 6px}
.run-timing {color: var(--body-text-color-subdued); font-size: 0.9em; margin-top: 4px}
.progress {background: var(--neutral-200); border-radius: 6px; height: 10px; overflow: hidden}
.progress-bar {background: #2563eb; height: 10px; transition: width 0.5s}
.error-box {border: 1px solid #dc2626; background: #fef2f2; color: #7f1d1d; padding: 10px 14px;
            border-radius: 8px; margin: 6px 0}
.next-step {margin-top: 6px}
.error-box pre {white-space: pre-wrap; font-size: 0.8em; max-height: 260px; overflow: auto; margin: 8px 0 0}
.ok-box {border: 1px solid #059669; background: #ecfdf5; color: #064e3b; padding: 10px 14px; border-radius: 8px}
.tok-sample {font-family: var(--font-mono); font-size: 0.85em; line-height: 1.9; white-space: pre-wrap;
             border: 1px solid var(--border-color-primary); padding: 10px; border-radius: 8px}
.tok-train {background: #bbf7d0; color: #14532d; border-radius: 3px; padding: 1px 1px;
            box-shadow: inset 0 0 0 1px #86efac}
.tok-cut {background: #fee2e2; color: #991b1b; text-decoration: line-through; border-radius: 3px}
.tok-mask {background: #f3f4f6; color: #6b7280; border-radius: 3px; padding: 1px 1px}
.tok-legend {margin-bottom: 6px; font-size: 0.9em}
.tok-piece {border-radius: 3px; padding: 1px 0}
.tok-piece:nth-child(odd) {background: #dbeafe}
.tok-piece:nth-child(even) {background: #fef3c7}
.tok-ids {font-family: var(--font-mono); font-size: 0.8em; color: var(--body-text-color-subdued); margin-top: 6px}
"""


def build(settings: Settings) -> gr.Blocks:
    return assemble(settings)[0]


def assemble(settings: Settings) -> tuple[gr.Blocks, UI]:
    """The page and its UI (the components and pages by name, for tests that call handlers without a browser)."""
    ui = UI(settings)
    with gr.Blocks(title="LLM Lab") as demo:
        with gr.Row(equal_height=True):
            gr.Markdown("## LLM Lab · train, align and compare language models", elem_id="lab-title")
            ui["experiment"] = gr.Dropdown(label="Current experiment", choices=["default"], value="default",
                                           allow_custom_value=False, scale=0, min_width=240,
                                           elem_id="current-experiment")
        remembered = gr.BrowserState("default", storage_key="lab-current-experiment")
        timer = gr.Timer(REFRESH_S)
        with gr.Tabs() as tabs:
            ui["tabs"] = tabs
            with gr.Tab("Run", id="run", render=False) as run_tab_block:
                run_tab.build(ui)  # built first: Train and Jobs send the user to it
            with gr.Tab("Compare", id="compare", render=False) as compare_tab_block:
                compare_tab.build(ui)  # likewise: a sweep launched on Train opens here
            with gr.Tab("Experiments", id="experiments"):
                experiments_tab.build(ui)
            with gr.Tab("Datasets", id="datasets"):
                datasets_tab.build(ui)
            with gr.Tab("Models", id="models"):
                models_tab.build(ui)
            with gr.Tab("Train", id="train"):
                ui.train = train_tab.build(ui)
            with gr.Tab("Jobs", id="jobs"):
                jobs_tab.build(ui)
            run_tab_block.render()
            compare_tab_block.render()
            with gr.Tab("Playground", id="playground"):
                playground_tab.build(ui)
            with gr.Tab("Rank", id="rank"):
                rank_tab.build(ui)
        api.register(ui)

        def current_experiment(v: dict) -> dict:
            names = choices.experiments(ui, include_archived=False)
            saved = v[remembered]
            return {ui["experiment"]: gr.update(choices=names, value=saved if saved in names else "default")}

        ui.on_refresh(current_experiment, [ui["experiment"]], inputs=[remembered])
        # every tab's refresh (UI.on_refresh) in one event: its inputs and outputs are the union of theirs
        refresh_inputs = list(dict.fromkeys(c for _, inputs, _ in ui.refreshers for c in inputs))
        refresh_outputs = list(dict.fromkeys(c for _, _, outputs in ui.refreshers for c in outputs))

        def refresh(*values) -> dict:
            """Every list and table read afresh from the database."""
            if "default" not in choices.experiments(ui):
                experiments.get_or_create(settings, "default")
            given = dict(zip(refresh_inputs, values, strict=True))
            out: dict = {}
            for fn, _, outputs in ui.refreshers:
                updates = fn(given)
                assert set(updates) <= set(outputs), f"{fn.__qualname__} updates components it did not register"
                out.update(updates)
            return out

        def on_load(request: gr.Request, *values):
            """The page opens with everything filled; `?job=N` in the address opens that run, `?group=NAME`
            the comparison of a sweep's runs."""
            job = (request.query_params.get("job") or "") if request else ""
            group = (request.query_params.get("group") or "") if request else ""
            opened = {ui["run_job"]: int(job), ui["tabs"]: gr.update(selected="run")} if job.isdigit() else {}
            if group:
                found, kind = compare.group_runs(settings, group)
                options = [(compare.label(j), str(j["id"])) for j in found]
                opened = {ui["tabs"]: gr.update(selected="compare"),
                          ui["compare_group"]: gr.update(choices=["all", group], value=group),
                          ui["compare_kind"]: kind or "all",
                          ui["compare_runs"]: gr.update(choices=options, value=[v for _, v in options])}
            return {**refresh(*values), **opened}

        ui["compare_after"](demo.load(on_load, refresh_inputs, [*refresh_outputs, ui["run_job"], ui["tabs"],
                                                                ui["compare_group"], ui["compare_kind"],
                                                                ui["compare_runs"]]))
        tabs.select(refresh, refresh_inputs, refresh_outputs, show_progress="hidden")
        tick_inputs = list(dict.fromkeys(c for _, inputs, _ in ui.tickers for c in inputs))
        tick_outputs = list(dict.fromkeys(c for _, _, outputs in ui.tickers for c in outputs))

        def tick(*values) -> dict:
            """What the Jobs table and the Run view follow live, in one event."""
            given = dict(zip(tick_inputs, values, strict=True))
            return {c: u for fn, _, _ in ui.tickers for c, u in fn(given).items()}

        timer.tick(tick, tick_inputs, tick_outputs, show_progress="hidden")
        filters_fn, filters_out = ui["compare_refresh"]
        tabs.select(filters_fn, [], filters_out, show_progress="hidden")
        demo.load(*ui.train.event(train_tab.command_and_estimate, list(train_tab.NAMED), ["command", "estimate"]),
                  show_progress="hidden")
        ui["experiment"].change(lambda name: name, [ui["experiment"]], [remembered])
        for fn in demo.fns.values():  # the page's own events stay out of the API documentation
            if fn.api_name not in api.NAMES and fn.api_visibility == "public":
                fn.api_visibility = "undocumented"
    return demo, ui


def served_paths(settings: Settings) -> tuple[list[str], list[str]]:
    """(allowed, blocked) for Gradio's file route: only what a user downloads on purpose (run artifacts, exports,
    dataset files), never the database, the secrets file or the workers' logs, whatever path is asked."""
    ws = settings.workspace
    allowed = [ws / "experiments", ws / "exports", ws / "datasets"]
    # everything else is refused for not being allowed; these are blocked in case they were put inside one of them
    blocked = [settings.secrets_path]
    if settings.database_url.startswith("sqlite:///"):
        db_file = Path(settings.database_url.removeprefix("sqlite:///"))
        blocked += [db_file.with_name(db_file.name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
    return [str(p) for p in allowed], [str(p) for p in blocked]


def launch(settings: Settings, host: str, port: int, auth: tuple[str, str] | None = None,
           allowed_hosts: tuple[str, ...] = ()):
    """Serve the lab on host:port behind the Guard (host names, origins, login throttle); returns (server, url).
    The server runs in a thread: `server.close()` stops it."""
    import uvicorn
    from fastapi import FastAPI
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    from lab.guard import Guard, HostPolicy

    demo = build(settings)
    demo.queue(default_concurrency_limit=8)
    allowed, blocked = served_paths(settings)
    # our own CORS policy, which allows no other origin, replaces Gradio's (it trusts any origin when the Host
    # header is not a loopback name); the Guard answers first
    parent = FastAPI(middleware=[Middleware(Guard, policy=HostPolicy(host, port, allowed_hosts)),
                                 Middleware(CORSMiddleware, allow_origins=[])],
                     docs_url=None, redoc_url=None, openapi_url=None)
    app = gr.mount_gradio_app(parent, demo, path="", auth=auth, allowed_paths=allowed, blocked_paths=blocked,
                              css=CSS, theme=gr.themes.Soft(), footer_links=["api"], show_error=True,
                              server_name=host, server_port=port)
    # Gradio checks that input files were uploaded (not server paths) only once its Blocks count as launched,
    # which mounting alone does not set
    with internal("gradio-server"):
        from gradio.http_server import Server

        demo.has_launched = True
        server = Server(uvicorn.Config(app, host=host.strip("[]"), port=port, log_level="warning"))
    server.run_in_thread()
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return server, f"http://{shown}:{port}/"
