"""Playground: chat with a model, ask several models the same thing side by side, rank their answers into a
preference dataset (for `reward` and `dpo`), and see how a tokenizer splits a text."""

from __future__ import annotations

from html import escape

import gradio as gr

from lab import datasets, endpoints, playground, registry
from lab.errors import LabError
from lab.ui.common import UI, user_errors
from lab.ui.html import error_box, md, ok_box

COLUMNS = 3


def writers(ui: UI) -> list[str | tuple[str, str]]:
    """Models that write text: not scoring heads, not masked LMs; then the OpenAI-compatible endpoints."""
    local = [m["name"] for m in registry.list_all(ui.settings)
             if m["kind"] in ("full", "adapter") and not m["architecture"].endswith("ForMaskedLM")]
    return [*local, *((f"{e['name']} · endpoint ({e['model']})", endpoints.PREFIX + e["name"])
                      for e in endpoints.list_all(ui.settings))]


def endpoints_text(ui: UI) -> str:
    rows = endpoints.list_all(ui.settings)
    if not rows:
        return "No endpoint added yet."
    return "\n".join(f"- **{md(e['name'])}**: model `{md(e['model'])}` at `{md(e['url'])}`"
                     + (" (with an API key)" if e["api_key"] else "") for e in rows)


def preference_sets(ui: UI) -> list[str]:
    return [d["name"] for d in datasets.list_all(ui.settings) if d["format"] == "preference"]


def _running(ui: UI) -> list[int]:
    from lab import runs

    return [j["id"] for j in runs.list_jobs(ui.settings, status="running")]


def _load(ui: UI, name: str):
    if not name:
        raise LabError("pick a model first")
    return playground.cache().get(ui.settings, name, _running(ui))


def _stream(ui: UI, name: str, messages: list[dict], **sampling):
    """The answer as it grows, from a model of the lab or from an OpenAI-compatible endpoint."""
    if (name or "").startswith(endpoints.PREFIX):
        return endpoints.stream(ui.settings, name, messages, **sampling)
    model, tokenizer = _load(ui, name)
    return playground.stream_answer(model, tokenizer, messages, **sampling)


def build(ui: UI) -> None:
    with gr.Row():
        system = gr.Textbox(label="System prompt", placeholder="(none)", scale=3)
        temperature = gr.Slider(label="Temperature", minimum=0, maximum=2, step=0.05, value=0.7, scale=1)
        top_p = gr.Slider(label="Top-p", minimum=0.05, maximum=1, step=0.05, value=0.95, scale=1)
        max_new = gr.Number(label="Max new tokens", value=200, precision=0, minimum=1, maximum=4096, scale=1)
        seed = gr.Number(label="Seed", value=0, precision=0, scale=1)
    settings_inputs = [system, temperature, top_p, max_new, seed]
    with gr.Accordion("OpenAI-compatible endpoints", open=False):
        gr.Markdown("Chat with and rank models you run elsewhere beside the lab's: LM Studio's local server "
                    "(`http://127.0.0.1:1234/v1`), Ollama (`http://127.0.0.1:11434/v1`), llama.cpp's "
                    "`llama-server`, a model served from the Models page, or a hosted API. They appear in the "
                    "model lists as *NAME · endpoint*.")
        with gr.Row():
            ep_name = gr.Textbox(label="Name", scale=1, elem_id="ep-name")
            ep_url = gr.Textbox(label="Base URL", placeholder="http://127.0.0.1:1234/v1", scale=2, elem_id="ep-url")
            ep_model = gr.Textbox(label="Model id (empty: the one it serves)", scale=2, elem_id="ep-model")
            ep_key = gr.Textbox(label="API key (optional)", type="password", scale=1, elem_id="ep-key")
            ep_add = gr.Button("Add", scale=1, elem_id="ep-add")
        with gr.Row():
            ep_list = gr.Markdown(elem_id="ep-list")
            ep_gone = gr.Dropdown(label="Remove", choices=[], value=None, scale=1, elem_id="ep-remove")
            ep_remove = gr.Button("Remove", scale=1, size="sm")
        ep_message = gr.HTML(elem_id="ep-message")

    with gr.Tab("Chat"):
        chat_model = gr.Dropdown(label="Model", choices=[], value=None, elem_id="chat-model")
        chatbot = gr.Chatbot(height=380, elem_id="chatbot")
        with gr.Row():
            message = gr.Textbox(label="Message", placeholder="Ask something", scale=5, elem_id="chat-input")
            send = gr.Button("Send", variant="primary", scale=1)
            clear = gr.Button("Clear", scale=1)
        chat_error = gr.HTML()

    with gr.Tab("Side by side and ranking"):
        models = gr.Dropdown(label=f"Models (two to {COLUMNS})", multiselect=True, choices=[], value=[],
                             elem_id="sbs-models")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", scale=5, elem_id="sbs-prompt")
            ask = gr.Button("Ask all", variant="primary", scale=1, elem_id="sbs-ask")
        with gr.Row():
            cells = [gr.Textbox(label=f"Answer {chr(65 + i)}", lines=8, interactive=False,
                                elem_id=f"sbs-answer-{i}") for i in range(COLUMNS)]
        sbs_error = gr.HTML()
        gr.Markdown("**Which answer is better?** Each ranking adds a prompt/chosen/rejected row to the preference "
                    "dataset below (a tie adds none), ready for the `reward` and `dpo` plugins.")
        with gr.Row():
            target = gr.Dropdown(label="Preference dataset (pick one, or type a new name)", choices=[],
                                 allow_custom_value=True, value="playground-rankings", scale=3, elem_id="sbs-target")
            votes = [gr.Button(f"{chr(65 + i)} is better", scale=1, elem_id=f"vote-{i}") for i in range(COLUMNS)]
            tie = gr.Button("Tie", scale=1, elem_id="vote-tie")
        ranking = gr.HTML(elem_id="sbs-ranking")
        with gr.Row():
            to_reward = gr.Button("Train a reward model on it", scale=1)
            to_dpo = gr.Button("Tune with DPO on it", scale=1)
    shown = gr.State({})  # model -> answer, for the answers on the page now

    with gr.Tab("Tokenizer"):
        with gr.Row():
            tok_model = gr.Dropdown(label="Model", choices=[], value=None, scale=1, elem_id="tok-model")
            tok_text = gr.Textbox(label="Text", lines=3, value="The lab trains language models.", scale=3)
            tok_go = gr.Button("Split", scale=1)
        tok_view = gr.HTML(elem_id="tok-view")

    ui.c.update(play_chat_model=chat_model, play_models=models, play_target=target, play_tok_model=tok_model,
                play_endpoints=ep_list, play_endpoint_pick=ep_gone)

    # -- endpoints
    def endpoint_updates(note: str):
        names = writers(ui)
        return (endpoints_text(ui), gr.update(choices=[e["name"] for e in endpoints.list_all(ui.settings)],
                                              value=None),
                gr.update(choices=names), gr.update(choices=names), note)

    def on_add_endpoint(name, url, model, key):
        try:
            done = endpoints.add(ui.settings, name, url, model, key)
        except LabError as exc:
            return (*endpoint_updates(error_box(f"{exc}\nnothing was added")), key)
        return (*endpoint_updates(ok_box(f"added {done['name']}: {done['model']} at {done['url']}")), "")

    def on_remove_endpoint(name):
        try:
            endpoints.remove(ui.settings, name or "")
        except LabError as exc:
            return endpoint_updates(error_box(str(exc)))
        return endpoint_updates(ok_box(f"removed {name}"))

    ep_outputs = [ep_list, ep_gone, chat_model, models, ep_message]
    ep_add.click(on_add_endpoint, [ep_name, ep_url, ep_model, ep_key], [*ep_outputs, ep_key])
    ep_remove.click(on_remove_endpoint, [ep_gone], ep_outputs)

    # -- chat: the answer streams into the conversation
    def on_send(history, text, name, sys, temp, tp, n, sd):
        history = list(history or [])
        if not (text or "").strip():
            yield history, "", ""
            return
        try:
            messages = ([{"role": "system", "content": sys}] if sys else []) + [
                {"role": m["role"], "content": m["content"]} for m in history] + [{"role": "user", "content": text}]
            answers = _stream(ui, name, messages, max_new_tokens=int(n or 200), temperature=float(temp),
                              top_p=float(tp), seed=int(sd or 0))
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            for partial in answers:
                history[-1]["content"] = partial
                yield history, "", ""
        except LabError as exc:
            yield history, text, error_box(str(exc))

    send.click(on_send, [chatbot, message, chat_model, *settings_inputs], [chatbot, message, chat_error],
               concurrency_limit=2)
    message.submit(on_send, [chatbot, message, chat_model, *settings_inputs], [chatbot, message, chat_error],
                   concurrency_limit=2)
    clear.click(lambda: ([], ""), [], [chatbot, chat_error])

    # -- side by side: each model answers in turn, its column fills as it goes
    def on_ask(names, text, sys, temp, tp, n, sd):
        names = list(names or [])
        blank = [gr.update(value="", label=f"Answer {chr(65 + i)}") for i in range(COLUMNS)]
        if not 2 <= len(names) <= COLUMNS or not (text or "").strip():
            yield [*blank, error_box(f"pick two to {COLUMNS} models and write a prompt"), {}]
            return
        messages = ([{"role": "system", "content": sys}] if sys else []) + [{"role": "user", "content": text}]
        answers: dict[str, str] = {}
        columns = [gr.update(value="", label=f"Answer {chr(65 + i)}: {names[i]}" if i < len(names) else
                             f"Answer {chr(65 + i)}") for i in range(COLUMNS)]
        for i, name in enumerate(names):
            try:
                partial = ""
                for partial in _stream(ui, name, messages, max_new_tokens=int(n or 200), temperature=float(temp),
                                       top_p=float(tp), seed=int(sd or 0)):
                    columns[i] = gr.update(value=partial, label=f"Answer {chr(65 + i)}: {name}")
                    yield [*columns, "", answers]
                answers[name] = partial.strip()
            except LabError as exc:
                yield [*columns, error_box(str(exc)), answers]
                return
        yield [*columns, "", answers]

    ask.click(on_ask, [models, prompt, *settings_inputs], [*cells, sbs_error, shown], concurrency_limit=2)

    def vote(index: int | None):
        def handler(names, text, answers, dataset, sys):
            names = list(names or [])
            if index is not None and index >= len(names):
                return error_box(f"there is no answer {chr(65 + index)}"), gr.update()
            try:
                done = playground.record_ranking(ui.settings, (dataset or "").strip(), text or "", dict(answers or {}),
                                                 None if index is None else names[index], system=sys or "")
            except LabError as exc:
                return error_box(str(exc)), gr.update()
            what = "a tie: no pair added" if index is None else f"{done['added']} pair(s) added"
            return (ok_box(f"{what}; {done['dataset']} now holds {done['pairs']} pairs"),
                    gr.update(choices=preference_sets(ui), value=done["dataset"]))
        return handler

    for i, button in enumerate(votes):
        button.click(vote(i), [models, prompt, shown, target, system], [ranking, target])
    tie.click(vote(None), [models, prompt, shown, target, system], [ranking, target])

    def go_train(plugin: str):
        @user_errors
        def handler(page, v: dict) -> dict:
            if v["play_target"] not in preference_sets(ui):
                raise LabError("rank some answers first: the dataset does not exist yet")
            return page.open_with(plugin, v["play_target"], (v.get("play_models") or [None])[0])
        return handler

    for button, plugin in ((to_reward, "reward"), (to_dpo, "dpo")):
        ui.train.on(button.click, go_train(plugin), ["play_target", "play_models"],
                    ["tabs", "plugin", "dataset", "model"]).success(*ui.train.after_plugin())

    # -- tokenizer view
    @user_errors
    def on_split(name, text):
        if not name:
            raise LabError("pick a model first")
        pieces = playground.tokenize(ui.settings, name, text or "")
        spans = "".join(f'<span class="tok-piece" title="id {i}">{escape(p).replace(chr(10), "↵")}</span>'
                        for p, i in pieces)
        ids = " ".join(str(i) for _, i in pieces)
        return (f'<div class="tok-legend">{len(pieces)} tokens</div><div class="tok-sample">{spans}</div>'
                f'<div class="tok-ids">ids: {ids}</div>')

    tok_go.click(on_split, [tok_model, tok_text], [tok_view])
    ui.on_refresh(lambda _: refresh(ui), [ui[n] for n in ("play_chat_model", "play_models", "play_tok_model",
                                                             "play_target", "play_endpoints", "play_endpoint_pick")])



def refresh(ui: UI) -> dict:
    names = writers(ui)
    return {ui["play_chat_model"]: gr.update(choices=names), ui["play_models"]: gr.update(choices=names),
            ui["play_tok_model"]: gr.update(choices=[m["name"] for m in registry.list_all(ui.settings)]),
            ui["play_target"]: gr.update(choices=preference_sets(ui)),
            ui["play_endpoints"]: endpoints_text(ui),
            ui["play_endpoint_pick"]: gr.update(choices=[e["name"] for e in endpoints.list_all(ui.settings)])}

