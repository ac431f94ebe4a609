"""Tables and pictures of a search: what happened to each trial, and where training is stable.

Everything here works on a plain ``pandas.DataFrame`` with one row per trial (``number``,
``outcome``, ``cause``, ``value``, ``lr``, ``clip_norm``, the loss weights, ...), so it can be
used from a flow, a notebook or the CLI without touching Optuna or MLflow. Optional columns
(``cause``, ``nan_step``, ``first_nonfinite``, ``duration_s``, ``safe``) may be missing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stylepipe.records import BROKE, Edges, FinalRun, Safest
from stylepipe.search import space
from stylepipe.search.cost import cost_markdown

OUTCOMES = ("complete", "nan", "diverged", "pruned", "failed")

COLORS = {
    "complete": "#2ca02c",
    "nan": "#d62728",
    "diverged": "#ff7f0e",
    "pruned": "#9a9a9a",
    "failed": "#000000",
}
MARKERS = {"complete": "o", "nan": "X", "diverged": "D", "pruned": "s", "failed": "P"}
OTHER_COLOR, OTHER_MARKER = "#8c6bb1", "v"
SAFEST_COLOR = "#1f3a93"

CAUSE_ABBREV = {
    "bad_input": "in",
    "precision_overflow": "fp",
    "gradient_explosion": "grad",
    "parameter_blowup": "param",
    "loss_imbalance": "imb",
    "divergence": "div",
    "unknown": "?",
}

_STATE_TO_OUTCOME = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}


def _outcomes(trials: pd.DataFrame) -> pd.Series:
    """The outcome of each trial as a lower-case string (falls back to ``state``)."""
    if "outcome" in trials.columns:
        out = trials["outcome"]
    elif "state" in trials.columns:
        out = trials["state"].map(lambda s: _STATE_TO_OUTCOME.get(str(s).upper(), str(s).lower()))
    else:
        out = pd.Series(["other"] * len(trials), index=trials.index)
    return out.where(out.notna(), "other").astype(str).str.lower()


def _causes(trials: pd.DataFrame, outcomes: pd.Series) -> pd.Series:
    """The cause of each NaN/diverged trial (``unknown`` if not recorded); None for the rest."""
    if "cause" in trials.columns:
        raw = trials["cause"].map(lambda c: None if c is None or c == "" or pd.isna(c) else str(c))
    else:
        raw = pd.Series([None] * len(trials), index=trials.index, dtype=object)
    failed = outcomes.isin(BROKE)
    values = [(c if c is not None else "unknown") if f else None for c, f in zip(raw, failed, strict=True)]
    return pd.Series(values, index=trials.index, dtype=object)


def outcome_order(outcome: str) -> int:
    return OUTCOMES.index(outcome) if outcome in OUTCOMES else len(OUTCOMES)


def causes_summary(trials: pd.DataFrame) -> pd.DataFrame:
    """Trial counts per outcome and, for ``nan``/``diverged``, per cause.

    Returns columns ``outcome``, ``cause`` (None for outcomes without a cause) and ``trials``,
    sorted by count descending (ties: outcome order complete, nan, diverged, pruned, failed).
    """
    columns = ["outcome", "cause", "trials"]
    if trials is None or len(trials) == 0:
        return pd.DataFrame(
            {
                "outcome": pd.Series(dtype=object),
                "cause": pd.Series(dtype=object),
                "trials": pd.Series(dtype="int64"),
            }
        )[columns]
    outcomes = _outcomes(trials)
    causes = _causes(trials, outcomes)
    counts: dict[tuple[str, str | None], int] = {}
    for outcome, cause in zip(outcomes, causes, strict=True):
        counts[(outcome, cause)] = counts.get((outcome, cause), 0) + 1
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], outcome_order(kv[0][0]), kv[0][0], kv[0][1] or ""))
    return pd.DataFrame(
        {
            "outcome": [o for (o, _), _n in rows],
            "cause": pd.Series([c for (_, c), _n in rows], dtype=object),
            "trials": pd.Series([n for _, n in rows], dtype="int64"),
        }
    )[columns]


def causes_markdown(trials: pd.DataFrame) -> str:
    """A short markdown summary of a search (for a Prefect markdown or MLflow text artifact)."""
    summary = causes_summary(trials)
    total = int(summary["trials"].sum())
    per_outcome = summary.groupby("outcome")["trials"].sum().to_dict()
    labels = {
        "complete": "complete",
        "nan": "NaN",
        "diverged": "diverged",
        "pruned": "pruned",
        "failed": "failed",
    }
    lines = ["### Search outcomes", "", f"**{total} trials**", ""]
    extra = sorted(set(per_outcome) - set(OUTCOMES))
    for outcome in (*OUTCOMES, *extra):
        n = int(per_outcome.get(outcome, 0))
        line = f"- {labels.get(outcome, outcome)}: {n}"
        if outcome in BROKE and n:
            sub = summary[summary["outcome"] == outcome]
            line += (
                " ("
                + ", ".join(f"{c} {int(k)}" for c, k in zip(sub["cause"], sub["trials"], strict=True))
                + ")"
            )
        lines.append(line)
    best = top_trials(trials, k=1) if total else pd.DataFrame()
    if len(best):
        lines += [
            "",
            f"Best complete trial: #{int(best['number'].iloc[0])}, value {best['value'].iloc[0]:.4g}",
        ]
    return "\n".join(lines) + "\n"


def top_trials(trials: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The ``k`` best complete trials by ``value`` (lower is better), with the settings that matter."""
    # Every parameter of the search's table, less those this study did not search at all.
    searched = [
        p.name
        for p in space.PARAMETERS
        if p.name in trials.columns and (p.unset == "off" or trials[p.name].notna().any())
    ]
    columns = [c for c in ("number", "value", *searched, "safe") if c in trials.columns]
    if len(trials) == 0 or "value" not in trials.columns:
        return pd.DataFrame(columns=columns)
    values = pd.to_numeric(trials["value"], errors="coerce")
    keep = (_outcomes(trials) == "complete") & np.isfinite(values)
    best = trials.loc[keep].assign(_v=values[keep])
    sort_by = ["_v", "number"] if "number" in best.columns else ["_v"]
    best = best.sort_values(sort_by, kind="stable").head(max(int(k), 0))
    return best[columns].reset_index(drop=True)


def map_points(trials: pd.DataFrame) -> pd.DataFrame:
    """The stability map's points, one per trial with a learning rate: ``number``, ``outcome``,
    ``cause`` (NaN/diverged only), ``lr``, ``clip`` (NaN: clipping off), ``on`` (clipped),
    ``y`` (the clip norm, 0 on the clip-off band) and ``baseline`` (the user's own settings).
    The PNG (matplotlib) and the dashboard's plot (search/dashboard.py) both draw these."""
    outcomes = _outcomes(trials)
    df = pd.DataFrame(
        {"number": trials.get("number"), "outcome": outcomes, "cause": _causes(trials, outcomes)}
    )
    df["lr"], df["clip"] = (
        pd.to_numeric(trials.get(c, np.nan), errors="coerce") for c in ("lr", "clip_norm")
    )
    baseline = (
        trials["is_baseline"] if "is_baseline" in trials.columns else pd.Series(False, index=trials.index)
    )
    df["baseline"] = baseline.astype(object).where(baseline.notna(), False).astype(bool)
    # Trials without a learning rate are not drawn; a clip norm of NaN, None or 0 means clipping off.
    return df[df["lr"] > 0].assign(on=lambda d: d["clip"] > 0, y=lambda d: d["clip"].where(d["on"], 0.0))


def stability_figure(
    trials: pd.DataFrame,
    safest_number: int | None = None,
    title: str = "Stability map",
    annotate_causes: bool = True,
    lr_margin: float | None = None,
    edges: Edges | None = None,
) -> Figure:
    """Learning rate (x, log) against gradient-clip norm (y, log), one marker per trial, coloured by outcome.

    Trials with clipping off (``clip_norm`` NaN) sit in a thin "clip off" band above, sharing x. The
    trial numbered ``safest_number`` gets a star, and a bar to ``lr_margin`` times its learning rate
    (where its certified margin ends); the baseline trial (``is_baseline``) is labelled "yours";
    NaN/diverged trials get a cause tag when there are few of them (``annotate_causes``). On the
    clipped axes and on the clip-off band, a dashed line marks the stability edge of that clipping
    mode (``edges``), where one was found.
    """
    trials = trials if trials is not None else pd.DataFrame()
    df = map_points(trials)

    fig = Figure(figsize=(7, 5), layout="constrained")
    fig.suptitle(f"{title}  ({len(trials)} trial{'' if len(trials) == 1 else 's'})")
    has_main, has_band = df["on"].any() or df.empty, not df["on"].all()
    grid = fig.add_gridspec(2, 1, height_ratios=(1, 7)) if has_main and has_band else fig.add_gridspec(1, 1)
    ax = band = None
    if has_main:
        ax = fig.add_subplot(grid[-1], xscale="log", yscale="log", ymargin=0.1, ylabel="gradient-clip norm")
    if has_band:
        band = fig.add_subplot(grid[0], sharex=ax, xscale="log", facecolor="#f0f0f0", ylim=(-1, 1))
        band.set_yticks([0], ["clip off"])
        band.tick_params(labelbottom=ax is None)
    axes = [a for a in (ax, band) if a is not None]
    for a in axes:
        a.grid(True, color="#dddddd", linewidth=0.6)
    axes[0].set_xlabel("learning rate")
    if df.empty:
        ax.set_xlim(1e-4, 1e1)
        ax.text(0.5, 0.5, "no trials", transform=ax.transAxes, ha="center", va="center", color="#666666")
        return fig

    # Each outcome labelled once (on the first axes it appears in), counted over both axes.
    for outcome in sorted(df["outcome"].unique(), key=lambda o: (outcome_order(o), o)):
        rows = df["outcome"] == outcome
        label = f"{outcome} ({rows.sum()})"
        for a in axes:
            sel = df[rows & (df["on"] == (a is ax))]
            if len(sel):
                a.scatter(
                    sel["lr"],
                    sel["y"],
                    s=55,
                    alpha=0.9,
                    c=COLORS.get(outcome, OTHER_COLOR),
                    marker=MARKERS.get(outcome, OTHER_MARKER),
                    edgecolors="white",
                    linewidths=0.6,
                    zorder=3,
                    label=label,
                )
                label = None

    failures = df[df["outcome"].isin(BROKE)].sort_values("lr")
    if annotate_causes and 0 < len(failures) <= 25:
        for i, t in enumerate(failures.itertuples()):  # tags alternate below/above: neighbours stay apart
            (ax if t.on else band).annotate(
                CAUSE_ABBREV.get(t.cause, t.cause[:5]),
                (t.lr, t.y),
                xytext=(5, -9 if i % 2 == 0 else 4),
                textcoords="offset points",
                fontsize=7,
                color=COLORS[t.outcome],
                zorder=4,
            )
        key = ", ".join(f"{a} = {c}" for c, a in CAUSE_ABBREV.items() if c in set(failures["cause"]))
        fig.text(0.01, 0.005, f"cause: {key}", fontsize=7, color="#444444", va="bottom")
        fig.get_layout_engine().set(rect=(0, 0.03, 1, 0.97))  # room for that line

    if df["baseline"].any():  # the user's own settings
        for t in df[df["baseline"]].itertuples():
            (ax if t.on else band).annotate(
                "yours",
                (t.lr, t.y),
                xytext=(-14, 9),
                textcoords="offset points",
                fontsize=8,
                color="#444444",
                zorder=4,
            )
    for t in df[df["number"] == safest_number].head(1).itertuples():
        a = ax if t.on else band
        if lr_margin and lr_margin > 1:  # where its certified margin ends
            a.plot([t.lr, t.lr * lr_margin], [t.y, t.y], color=SAFEST_COLOR, linewidth=2, zorder=4)
            a.annotate(
                f"x{lr_margin:g} ok",
                (t.lr * lr_margin, t.y),
                xytext=(3, -12),
                textcoords="offset points",
                fontsize=7,
                color=SAFEST_COLOR,
                zorder=4,
            )
        a.scatter(
            [t.lr],
            [t.y],
            marker="*",
            s=650,
            facecolors="none",
            edgecolors=SAFEST_COLOR,
            linewidths=1.8,
            zorder=5,
            label=f"safest (#{safest_number})",
        )
        a.annotate(
            "safest",
            (t.lr, t.y),
            xytext=(12, 12),
            textcoords="offset points",
            fontsize=10,
            fontweight="bold",
            color=SAFEST_COLOR,
            zorder=2,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.7},
        )

    drawn_edges = []
    for a, mode in ((ax, "on"), (band, "off")):  # where runs of that clipping mode break
        edge = edges.of_mode(mode) if edges is not None and a is not None else None
        if edge is None or edge.lr is None:
            continue
        drawn_edges.append(edge.lr)
        a.axvline(edge.lr, color=COLORS.get(edge.outcome, OTHER_COLOR), linestyle="--", linewidth=1)
        found_at = "" if edge.clip_norm is None else f", at clip {edge.clip_norm:g}"
        a.annotate(
            f"edge {edge.lr:.2g} ({CAUSE_ABBREV.get(edge.cause, edge.cause)}{found_at})",
            (edge.lr, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -10),
            textcoords="offset points",
            fontsize=7,
            color="#444444",
        )
    # At least about one decade of learning rate, with 10% margins.
    lrs = [*df["lr"], *drawn_edges]
    lo, hi = min(lrs), max(lrs)
    mid, half = math.sqrt(lo * hi), max(0.6 * math.log10(hi / lo), 0.5)
    axes[0].set_xlim(mid / 10**half, mid * 10**half)
    # One legend over the top axes (fig.legend's "outside" spot would cover the title), from
    # the labels: outcomes in their usual order, the safest star last.
    handles = sorted(
        (h for a in axes for h in a.collections if not h.get_label().startswith("_")),
        key=lambda h: (h.zorder, outcome_order(h.get_label().split(" (")[0])),
    )
    shown = axes[-1].legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=6,
        frameon=False,
        fontsize=8,
        handletextpad=0.3,
        columnspacing=1.0,
    )
    for handle in shown.legend_handles:
        handle.set_sizes([min(handle.get_sizes()[0], 150)])  # the star at legend size
    return fig


def triptych(
    content: np.ndarray, style: np.ndarray, result: np.ndarray, path: str | Path, caption: str = ""
) -> Path:
    """Content | style | result side by side (H x W x 3 uint8 arrays), saved as a PNG: what
    a person looks at to see whether the model took the style."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10.5, 3.9), layout="constrained")
    for ax, image, title in zip(
        fig.subplots(1, 3), (content, style, result), ("content", "style", "result"), strict=True
    ):
        ax.imshow(image)
        ax.set_title(title, fontsize=11)
        ax.set_axis_off()
    if caption:
        fig.suptitle(caption, fontsize=9, color="0.35")
    fig.savefig(path, dpi=100)
    return path


def stability_map(trials: pd.DataFrame, path: str | Path, **drawn: Any) -> Path:
    """Save :func:`stability_figure` (``drawn``: its options) as a PNG (about 840x600 px) and
    return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stability_figure(trials, **drawn).savefig(path, dpi=120)
    return path


def settings_table(params: dict[str, Any]) -> list[str]:
    """A configuration as the lines of a markdown table (off: a setting that is off)."""
    lines = ["| setting | value |", "|---|---|"]
    for key, value in params.items():
        shown = "off" if value is None else (f"{value:.4g}" if isinstance(value, float) else value)
        lines.append(f"| {key} | {shown} |")
    return lines


def safest_rows(safest: Safest | None, why_none: str | None = None) -> list[dict[str, str]]:
    """The safest configuration as table rows (setting, value), with its certificate and
    quality; one row saying why when nothing was safe."""
    if safest is None:
        return [{"setting": "safest", "value": f"none: {why_none or 'nothing was safe'}"}]
    rows = [
        {"setting": key, "value": "off" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))}
        for key, v in safest.params.items()
    ]
    return [
        {"setting": "trial", "value": str(safest.trial)},
        *rows,
        {"setting": "quality", "value": safest.quality_text().removeprefix("quality ")},
        {"setting": "certificate", "value": safest.certificate.text},
        {"setting": "margin", "value": f"safe up to lr x{safest.certificate.lr_margin:g}"},
    ]


def picture_markdown(title: str, image_url: str | None, link: str) -> str:
    """A picture in a markdown summary: the image itself where it has an HTTP URL, else a link."""
    return f"![{title}]({image_url})\n\n[{title}: the file]({link})" if image_url else f"[{title}]({link})"


def version_markdown(final: FinalRun, study: str, edge: str | None) -> str:
    """A registered version's description, as MLflow's UI shows it: what the model is, and why
    it can be trusted (``edge``: the study's edge line, each clipping mode's)."""
    safest, certificate = final.safest, final.safest.certificate
    weakened = f" Weakened: {certificate.weakened}." if certificate.weakened else ""
    recoveries = f"{final.recoveries} recover{'y' if final.recoveries == 1 else 'ies'}"
    quality = "not measured" if final.quality is None else f"{final.quality:.4g}"
    lines = [
        f"**stylepipe**: the final model of the safest configuration of study `{study}` (trial {safest.trial}).",
        "",
        *settings_table(safest.params),
        "",
        f"**Certificate**: {certificate.text}.{weakened}",
        "",
        f"**Stability edge**: {edge.removeprefix('stability edge: ') if edge else 'not measured (the edge test was off)'}.",
        "",
        f"**Quality**: {quality} (final model); search {safest.quality_text()}.",
        "",
        f"**Final run**: MLflow run `{final.run_id}`, {final.steps} steps, {recoveries}.",
        "",
        f"**Data**: fingerprint `{final.data_fingerprint or 'not recorded'}` (content images and style image).",
    ]
    return "\n".join(lines)


def pipeline_markdown(
    trials: pd.DataFrame,
    safest: Safest | None,
    model: dict | None = None,
    promotion: dict | None = None,
    versus_baseline: str | None = None,
    cost: dict[str, int] | None = None,
    stability_line: str | None = None,
    edge_line: str | None = None,
) -> str:
    """The run summary a person reads first: the safest settings and their certificate, where
    their margin ends, how they compare with the user's own settings, NaN causes, the model."""
    lines = ["# stylepipe run", ""]
    if safest is None:
        lines += [
            "**No safe configuration**: every candidate went NaN or diverged under the stress",
            "replays. Nothing was registered; the champion stays.",
            "",
        ]
    else:
        lines += [f"## Safest configuration: trial {safest.trial}", "", *settings_table(safest.params)]
        certificate = safest.certificate
        safe_of = f"{safest.safe_candidates} of {safest.candidates} candidates were safe"
        lines += [
            f"| quality | {safest.quality_text().removeprefix('quality ')} |",
            "",
            f"**Certificate**: {certificate.text}; {safe_of}.",
            "",
        ]
        if safest.chosen_because:
            lines += [f"**Chosen**: {safest.chosen_because}.", ""]
        if certificate.weakened:
            lines += [f"**Weakened**: {certificate.weakened}.", ""]
        lr, margin = safest.params["lr"], certificate.lr_margin
        failing = safest.lowest_failing_lr
        if failing:
            how = f"trial {failing['trial']}, {failing['outcome']}: {failing['cause']}"
            end = f"the lowest learning rate that failed in this study is {failing['lr']:.3g} ({how})"
        else:
            end = "no trial above it failed"
        lines += [f"**Margin**: safe up to lr {lr * margin:.3g} (x{margin:g}); {end}.", ""]
    versus = versus_baseline or (safest.versus_baseline if safest else None)
    if versus:
        lines += [f"**Against your own settings** (the baseline trial): {versus}.", ""]
    if edge_line:
        lines += [edge_line, ""]
    if model:
        recoveries = model.get("recoveries", 0)
        lines += [
            f"Registered model: `{model['model_uri']}` (version {model['version']}); its final run needed "
            f"{recoveries} recover{'y' if recoveries == 1 else 'ies'}.",
            "",
        ]
    if promotion:
        verdict = "promoted to **champion**" if promotion["promoted"] else "not promoted"
        lines += [f"Champion: {verdict}: {promotion['why']}.", ""]
    if stability_line:
        lines += [stability_line, ""]
    if cost:
        lines += [cost_markdown(cost), ""]
    lines.append(causes_markdown(trials))
    return "\n".join(lines)
