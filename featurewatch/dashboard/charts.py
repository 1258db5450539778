"""Charts for the dashboard and the report, drawn by plotly from the catalog's numbers.

Pages load plotly.js from the dashboard itself (`/static/plotly.min.js`, the copy inside
the plotly package), never from a CDN; the report embeds it once, so the file opens
anywhere without a network."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import plotly.graph_objects as go

PLOTLY_JS = "plotly.min.js"
_CONFIG = {"displaylogo": False, "responsive": True}


@cache
def plotly_js() -> bytes:
    return (files("plotly") / "package_data" / PLOTLY_JS).read_bytes()


def _html(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=_CONFIG)


def sparkline(div_id: str, series: dict, window_start) -> str:
    """A feature's rate per bucket, small, the comparison window shaded."""
    fig = go.Figure(
        go.Scatter(x=series["bucket"], y=series["rate"], mode="lines", line={"width": 1.5})
    )
    if series["bucket"]:
        fig.add_vrect(x0=window_start, x1=series["bucket"][-1], fillcolor="orange", opacity=0.2,
                      line_width=0)  # fmt: skip
    fig.update_layout(
        width=220, height=48, margin={"l": 0, "r": 0, "t": 0, "b": 0}, showlegend=False,
        xaxis={"visible": False}, yaxis={"visible": False, "rangemode": "tozero"},
        plot_bgcolor="rgba(0,0,0,0)", paper_bgcolor="rgba(0,0,0,0)",
    )  # fmt: skip
    return _html(fig, div_id)


def trend_chart(div_id: str, series: dict, title: str) -> str:
    """Firing rate per bucket, with the tokens seen per bucket on a second axis."""
    fig = go.Figure()
    fig.add_bar(x=series["bucket"], y=series["tokens"], name="tokens seen", yaxis="y2",
                marker={"color": "rgba(120,120,120,0.25)"})  # fmt: skip
    fig.add_scatter(x=series["bucket"], y=series["rate"], name="firing rate", mode="lines+markers")
    fig.update_layout(
        title=title, height=320, margin={"l": 50, "r": 50, "t": 40, "b": 40},
        yaxis={"title": "firing rate", "rangemode": "tozero"},
        yaxis2={"title": "tokens", "overlaying": "y", "side": "right", "showgrid": False},
        legend={"orientation": "h"},
    )  # fmt: skip
    return _html(fig, div_id)


def movers_chart(div_id: str, movers: list[dict]) -> str:
    """Baseline and window rate of each top mover, side by side."""
    names = [f"{m['feature_id']} {m.get('label') or ''}".strip() for m in movers]
    fig = go.Figure()
    fig.add_bar(x=names, y=[m["base_rate"] for m in movers], name="baseline rate")
    fig.add_bar(x=names, y=[m["win_rate"] for m in movers], name="window rate")
    fig.update_layout(barmode="group", height=320, margin={"l": 50, "r": 20, "t": 20, "b": 80},
                      legend={"orientation": "h"}, xaxis={"type": "category"})  # fmt: skip
    return _html(fig, div_id)
