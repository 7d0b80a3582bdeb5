"""A plugin's pydantic Params as Gradio components, and the components' values back as parameters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gradio as gr

from lab import plugins
from lab.errors import LabError


@dataclass
class Form:
    plugin: str
    names: list[str]
    components: list[gr.components.Component]
    fields: dict[str, dict]

    @property
    def model_pickers(self) -> list[tuple[gr.components.Component, str | None]]:
        """The fields that name a registered model, with the kind of model they take."""
        return [(c, self.fields[n]["model_kind"]) for n, c in zip(self.names, self.components, strict=True)
                if self.fields[n]["widget"] in ("model", "models")]

    def values(self, raw: list[Any]) -> dict:
        """Typed parameter values from the components (JSON fields parsed); validation is the Params' job."""
        out = {}
        for name, value in zip(self.names, raw, strict=True):
            field = self.fields[name]
            if field["type"].startswith("dict"):
                text = (value or "").strip() or "{}"
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    example = '{"max_grad_norm": 0.5}'
                    raise LabError(f"`{name}` must be a JSON object, e.g. {example}: {exc.msg}") from None
            elif field["widget"] == "models" and isinstance(value, list):  # several names, kept comma-separated
                value = ",".join(v for v in value if v)
            elif field["type"] == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            out[name] = value
        return out

    def fill(self, params: dict) -> list[Any]:
        """Component values for stored parameters (e.g. cloning a job); missing ones take their defaults."""
        vals = []
        for name in self.names:
            field = self.fields[name]
            value = params.get(name, field["default"])
            if field["type"].startswith("dict"):
                value = json.dumps(value) if value else ""
            elif field["widget"] == "models":
                value = [v.strip() for v in str(value or "").split(",") if v.strip()]
            vals.append(value)
        return vals


def _component(f: dict) -> gr.components.Component:
    info = f["description"] or None
    label = f["name"]
    b = f["bounds"]
    if f["widget"] == "model":  # a registered model's name; the choices are filled from the registry on refresh
        return gr.Dropdown(choices=[""], value=f["default"] or "", label=label, info=info, allow_custom_value=True)
    if f["widget"] == "models":  # several registered models' names (kept comma-separated in the parameters)
        chosen = [v.strip() for v in str(f["default"] or "").split(",") if v.strip()]
        return gr.Dropdown(choices=chosen, value=chosen, multiselect=True, label=label, info=info,
                           allow_custom_value=True)
    if f["choices"]:
        return gr.Dropdown(choices=f["choices"], value=f["default"], label=label, info=info)
    if f["type"] == "bool":
        return gr.Checkbox(value=f["default"], label=label, info=info)
    if f["type"] in ("int", "float"):
        lo = b.get("ge", b.get("gt"))
        hi = b.get("le", b.get("lt"))
        if f["widget"] == "slider" and lo is not None and hi is not None:
            return gr.Slider(minimum=lo, maximum=hi, value=f["default"], step=0.01, label=label, info=info)
        # no minimum/maximum on the component: the Params check bounds and the message appears by the form
        bounds = ", ".join(f"{op} {v}" for op, v in (("≥", b.get("ge")), (">", b.get("gt")), ("≤", b.get("le")),
                                                       ("<", b.get("lt"))) if v is not None)
        return gr.Number(value=f["default"], label=label, info=f"{info or ''} ({bounds})" if bounds else info,
                         precision=0 if f["type"] == "int" else None)
    if f["type"].startswith("dict"):
        return gr.Textbox(value=json.dumps(f["default"]) if f["default"] else "", label=label, info=info,
                          placeholder='{"max_grad_norm": 0.5}')
    return gr.Textbox(value="" if f["default"] is None else str(f["default"]), label=label, info=info)


def build(plugin: plugins.Plugin) -> Form:
    """Lay out the plugin's fields: the common ones in a grid, the advanced ones folded away."""
    fields = {f["name"]: f for f in plugins.describe_params(plugin)}
    names, comps = [], []
    basic = [f for f in fields.values() if not f["advanced"]]
    advanced = [f for f in fields.values() if f["advanced"]]

    def grid(items: list[dict]) -> None:
        for i in range(0, len(items), 3):
            with gr.Row(equal_height=True):
                for f in items[i:i + 3]:
                    names.append(f["name"])
                    comps.append(_component(f))

    grid(basic)
    if advanced:
        with gr.Accordion("Advanced parameters", open=False):
            grid(advanced)
    return Form(plugin.id, names, comps, fields)
