"""Experiments: create, rename, add notes, archive; pick the current experiment (used by Train and Jobs)."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from lab import experiments
from lab.errors import LabError
from lab.ui import choices
from lab.ui.common import UI, user_errors
from lab.ui.html import ok_box

COLUMNS = ["name", "runs", "notes", "archived", "created_at"]


def table(ui: UI) -> pd.DataFrame:
    rows = experiments.list_all(ui.settings)
    return pd.DataFrame([{c: r[c] for c in COLUMNS} for r in rows], columns=COLUMNS)


def build(ui: UI) -> None:
    gr.Markdown("Experiments group runs. New runs go into the **current experiment** (top right).")
    ui["exp_table"] = gr.Dataframe(interactive=False, label="Experiments", wrap=True)
    with gr.Row():
        with gr.Column():
            gr.Markdown("#### New experiment")
            new_name = gr.Textbox(label="Name", placeholder="e.g. alpaca-lora-sweep")
            new_notes = gr.Textbox(label="Notes", lines=2)
            create = gr.Button("Create", variant="primary")
        with gr.Column():
            gr.Markdown("#### Edit an experiment")
            chosen = gr.Dropdown(label="Experiment", choices=choices.experiments(ui), allow_custom_value=False)
            rename_to = gr.Textbox(label="New name")
            notes = gr.Textbox(label="Notes", lines=2)
            with gr.Row():
                rename = gr.Button("Rename")
                save_notes = gr.Button("Save notes")
                archive = gr.Button("Archive / unarchive")
                make_current = gr.Button("Make current", variant="primary")
    message = gr.HTML()

    def refreshed(msg: str, current_choice: str | None = None):
        all_names = choices.experiments(ui)
        return (table(ui), gr.update(choices=all_names, value=current_choice), ok_box(msg),
                gr.update(choices=choices.experiments(ui, include_archived=False)))

    outputs = [ui["exp_table"], chosen, message, ui["experiment"]]

    @user_errors
    def on_create(name, text):
        experiments.create(ui.settings, (name or "").strip(), text)
        return refreshed(f"created experiment {name}", name)

    @user_errors
    def on_rename(old, new):
        experiments.rename(ui.settings, old or "", (new or "").strip())
        return refreshed(f"renamed {old} to {new}", new)

    @user_errors
    def on_notes(name, text):
        experiments.set_notes(ui.settings, name or "", text)
        return refreshed(f"saved the notes of {name}", name)

    @user_errors
    def on_archive(name):
        row = next((e for e in experiments.list_all(ui.settings) if e["name"] == name), None)
        if row is None:
            raise LabError("pick an experiment first")
        experiments.set_archived(ui.settings, name, not row["archived"])
        return refreshed(f"{name} is {'unarchived' if row['archived'] else 'archived'}", name)

    def on_pick(name):
        row = next((e for e in experiments.list_all(ui.settings) if e["name"] == name), None)
        return (row or {}).get("notes", ""), name or ""

    create.click(on_create, [new_name, new_notes], outputs)
    rename.click(on_rename, [chosen, rename_to], outputs)
    save_notes.click(on_notes, [chosen, notes], outputs)
    archive.click(on_archive, [chosen], outputs)
    chosen.change(on_pick, [chosen], [notes, rename_to])

    @user_errors
    def on_make_current(name):
        if not name:
            raise LabError("pick an experiment first")
        if name not in choices.experiments(ui, include_archived=False):
            raise LabError(f"{name} is archived: unarchive it to run in it")
        return gr.update(value=name)

    make_current.click(on_make_current, [chosen], [ui["experiment"]])
    ui.on_refresh(lambda _: {ui["exp_table"]: table(ui), chosen: gr.update(choices=choices.experiments(ui))},
                  [ui["exp_table"], chosen])

