"""The lab's charts, as Plotly figures for `gr.Plot`: a legend naming every line, markers where a line has few
points (a metric logged once is still seen), whole-number ticks on step axes, and a real logarithmic axis."""

from __future__ import annotations

from dataclasses import dataclass

from lab.dependencies import internal

MARKERS_UP_TO = 40  # points in a line drawn with a marker on each
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross", "triangle-down")
DASHES = ("solid", "dash", "dot", "dashdot")  # lines that lie on each other still show apart
FONT = "ui-sans-serif, system-ui, sans-serif"


@dataclass
class Line:
    name: str  # the legend entry
    colour: str
    xs: list
    ys: list


def lines(series: list[Line], *, x_title: str, y_title: str, log_y: bool = False, whole_x: bool = False,
          height: int = 340, empty: str = "nothing logged yet"):
    """A line chart of `series`, each in its colour and named in the legend (also when it is alone), as the figure's
    Plotly JSON for gr.Plot: a Plotly Figure object would check and copy every point of a 50-run chart first, which
    took most of the time of drawing it."""
    import plotly.io as pio

    with internal("gradio-plot-data"):
        from gradio.components.plot import PlotData

    traces = []
    for i, s in enumerate(series):
        few = len(s.xs) <= MARKERS_UP_TO
        traces.append({
            "type": "scatter", "x": list(s.xs), "y": list(s.ys), "name": s.name,
            "mode": "lines+markers" if few else "lines", "showlegend": True,
            "line": {"color": s.colour, "width": 2, "dash": DASHES[i % len(DASHES)]},
            "marker": {"size": 8 if few else 4, "symbol": SYMBOLS[i % len(SYMBOLS)]}, "opacity": 0.9,
            "hovertemplate": f"%{{y:.5g}} at {x_title} %{{x}}<extra>{s.name}</extra>"})
    xs = [x for s in series for x in s.xs]
    grid = {"showgrid": True, "gridcolor": "#e5e7eb"}
    xaxis = {"title": {"text": x_title}, "zeroline": False, **grid}
    yaxis = {"title": {"text": y_title}, "type": "log" if log_y else "linear", **grid}
    if whole_x:  # steps and token counts are whole numbers: no 1.1, 1.2 ... ticks
        xaxis["tickformat"] = ",d"
        if xs and max(xs) - min(xs) <= 10:
            xaxis["dtick"] = 1
    layout = {
        "template": pio.templates[pio.templates.default].to_plotly_json(),
        "height": height, "margin": {"l": 60, "r": 20, "t": 60, "b": 50}, "font": {"family": FONT, "size": 12},
        "xaxis": xaxis, "yaxis": yaxis,
        # above the plot on the right: the component's label sits on the left
        "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1},
        "plot_bgcolor": "white", "paper_bgcolor": "white", "hovermode": "closest"}
    if not series:
        layout["annotations"] = [{"text": empty, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5,
                                  "y": 0.5, "font": {"size": 14, "color": "#6b7280"}}]
        xaxis["visible"] = yaxis["visible"] = False
    return PlotData(type="plotly", plot=pio.to_json({"data": traces, "layout": layout}, validate=False))


def confusion(labels: list[str], matrix: list[list[int]], title: str = "Confusion matrix"):
    """A confusion matrix as a heat map: rows the true label, columns the predicted one, counts in the cells."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, colorscale="Blues", showscale=False,
                               text=[[str(v) for v in row] for row in matrix], texttemplate="%{text}",
                               hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    side = 160 + 50 * len(labels)
    fig.update_layout(title={"text": title}, height=min(side, 700), width=min(side + 80, 800),
                      margin={"l": 80, "r": 20, "t": 50, "b": 60}, font={"family": FONT, "size": 12},
                      xaxis={"title": {"text": "predicted"}, "side": "bottom"},
                      yaxis={"title": {"text": "true"}, "autorange": "reversed"})
    return fig
