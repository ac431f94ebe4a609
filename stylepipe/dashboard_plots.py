"""The study's stability as plotly figures, for optuna-dashboard's study page
(search/dashboard.py writes them): the stability map (learning rate x clip norm, one marker per
trial by outcome, each clipping mode's edge, the safest starred with its margin) and the
stability importance (search/stability.py).

The PNG for MLflow and the README stays matplotlib (report.stability_figure): plotly writes a
PNG only through kaleido and a headless browser, which a scheduled offline run cannot count
on. Both pictures draw the same points (report.map_points), edges and safest.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from stylepipe.records import BROKE, Edges
from stylepipe.report import CAUSE_ABBREV, COLORS, OTHER_COLOR, SAFEST_COLOR, map_points, outcome_order
from stylepipe.search.dashboard import IMPORTANCE_ID, MAP_ID

# matplotlib's markers (report.MARKERS) by their plotly names
SYMBOLS = {"complete": "circle", "nan": "x", "diverged": "diamond", "pruned": "square", "failed": "cross"}


def stability_figures(
    trials: pd.DataFrame,
    importance: dict[str, float] | None,
    safest_number: int | None = None,
    lr_margin: float | None = None,
    edges: Edges | None = None,
    title: str = "Stability map",
) -> dict[str, go.Figure]:
    """The two dashboard plots by their graph ids."""
    return {
        MAP_ID: map_figure(trials, safest_number, lr_margin, edges, title),
        IMPORTANCE_ID: importance_figure(importance),
    }


def map_figure(
    trials: pd.DataFrame,
    safest_number: int | None = None,
    lr_margin: float | None = None,
    edges: Edges | None = None,
    title: str = "Stability map",
) -> go.Figure:
    """The stability map (report.stability_figure's content) as a plotly figure: trials with
    clipping off on a thin band above the clipped ones; hovering a marker names its trial."""
    df = map_points(trials)
    has_main, has_band = bool(df["on"].any()) or df.empty, not bool(df["on"].all())
    if has_main and has_band:
        fig = make_subplots(
            rows=2, cols=1, shared_xaxes=True, row_heights=[0.12, 0.88], vertical_spacing=0.04
        )
        rows = {"off": 1, "on": 2}
    else:
        fig = make_subplots(rows=1, cols=1)
        rows = {"on": 1} if has_main else {"off": 1}

    def row_of(on: bool) -> int:
        return rows["on" if on else "off"]

    for outcome in sorted(df["outcome"].unique(), key=lambda o: (outcome_order(o), o)):
        group = df[df["outcome"] == outcome]
        for on, sel in group.groupby("on", sort=False):
            fig.add_trace(
                go.Scatter(
                    x=sel["lr"].tolist(),
                    y=sel["y"].tolist(),
                    mode="markers",
                    name=f"{outcome} ({len(group)})",
                    legendgroup=outcome,
                    showlegend=bool(on) == bool(group["on"].iloc[0]),
                    marker={
                        "color": COLORS.get(outcome, OTHER_COLOR),
                        "symbol": SYMBOLS.get(outcome, "circle"),
                        "size": 10,
                        "line": {"color": "white", "width": 0.6},
                    },
                    text=[_hover(t) for t in sel.itertuples()],
                    hoverinfo="text",
                ),
                row=row_of(bool(on)),
                col=1,
            )
    for t in df[df["baseline"]].itertuples():
        fig.add_annotation(
            x=math.log10(t.lr), y=math.log10(t.y) if t.on else 0, text="yours", showarrow=False,
            yshift=12, font={"size": 10, "color": "#444444"}, row=row_of(t.on), col=1,
        )  # fmt: skip
    for t in df[df["number"] == safest_number].head(1).itertuples():
        if lr_margin and lr_margin > 1:  # where its certified margin ends
            fig.add_trace(
                go.Scatter(
                    x=[t.lr, t.lr * lr_margin], y=[t.y, t.y], mode="lines",
                    line={"color": SAFEST_COLOR, "width": 2}, name=f"margin x{lr_margin:g}",
                    hoverinfo="name",
                ),
                row=row_of(t.on), col=1,
            )  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=[t.lr], y=[t.y], mode="markers", name=f"safest (#{safest_number})",
                marker={"symbol": "star-open", "size": 22, "color": SAFEST_COLOR, "line": {"width": 2}},
                text=[_hover(t)], hoverinfo="text",
            ),
            row=row_of(t.on), col=1,
        )  # fmt: skip

    lrs = df["lr"].tolist()
    clipped = df.loc[df["on"], "y"]
    for mode in rows:  # where runs of that clipping mode break, as a dashed line
        edge = edges.of_mode(mode) if edges is not None else None
        if edge is None or edge.lr is None:
            continue
        lrs.append(edge.lr)
        low, high = (clipped.min() / 1.5, clipped.max() * 1.5) if mode == "on" and len(clipped) else (-1, 1)
        found_at = "" if edge.clip_norm is None else f", at clip {edge.clip_norm:g}"
        fig.add_trace(
            go.Scatter(
                x=[edge.lr, edge.lr], y=[low, high], mode="lines",
                line={"color": COLORS.get(edge.outcome, OTHER_COLOR), "dash": "dash", "width": 1},
                name=f"edge, clip {mode}: lr {edge.lr:.2g} ({CAUSE_ABBREV.get(edge.cause, edge.cause)}{found_at})",
                hoverinfo="name",
            ),
            row=rows[mode], col=1,
        )  # fmt: skip

    fig.update_xaxes(type="log")
    fig.update_xaxes(title_text="learning rate", row=max(rows.values()), col=1)
    if "on" in rows:
        fig.update_yaxes(type="log", title_text="gradient-clip norm", row=rows["on"], col=1)
    if "off" in rows:
        fig.update_yaxes(range=[-1, 1], tickvals=[0], ticktext=["clip off"], row=rows["off"], col=1)
    if lrs:  # at least about one decade of learning rate, with margins (as the PNG)
        lo, hi = min(lrs), max(lrs)
        mid, half = math.log10(math.sqrt(lo * hi)), max(0.6 * math.log10(hi / lo), 0.5)
        fig.update_xaxes(range=[mid - half, mid + half])
    n = len(trials)
    fig.update_layout(
        template="none",
        title={"text": f"{title} ({n} trial{'' if n == 1 else 's'})"},
        legend={"orientation": "h", "y": -0.18},
        margin={"l": 70, "r": 20, "t": 50, "b": 40},
    )
    return fig


def _hover(t) -> str:
    clip = f"clip {t.clip:.3g}" if t.on else "clip off"
    cause = f": {t.cause}" if t.outcome in BROKE else ""
    yours = " (your settings)" if t.baseline else ""
    return f"trial {int(t.number)}{yours}<br>{t.outcome}{cause}<br>lr {t.lr:.3g}, {clip}"


def importance_figure(importance: dict[str, float] | None) -> go.Figure:
    """Each parameter's share in deciding broke versus finite, largest on top; a figure that
    says why when the study cannot tell yet."""
    title = "What decides stability (importance for broke versus finite, not for quality)"
    fig = go.Figure()
    if importance:
        names = list(importance)[::-1]  # plotly draws the first bar at the bottom
        fig.add_trace(
            go.Bar(
                x=[importance[n] for n in names], y=names, orientation="h",
                marker={"color": COLORS["nan"]}, text=[f"{importance[n]:.2f}" for n in names],
                textposition="auto", hoverinfo="x+y",
            )
        )  # fmt: skip
        fig.update_xaxes(range=[0, 1], title_text="share (fANOVA on each trial's outcome)")
    else:
        fig.add_annotation(
            text="not known yet: no trial broke, or every one did", showarrow=False,
            xref="paper", yref="paper", x=0.5, y=0.5, font={"size": 14, "color": "#666666"},
        )  # fmt: skip
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
    fig.update_layout(template="none", title={"text": title}, margin={"l": 110, "r": 20, "t": 50, "b": 50})
    return fig
