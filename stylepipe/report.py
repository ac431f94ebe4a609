"""Tables and pictures of a search: what happened to each trial, and where training is stable.

Everything here works on a plain ``pandas.DataFrame`` with one row per trial (``number``,
``outcome``, ``cause``, ``value``, ``lr``, ``clip_norm``, the loss weights, ...), so it can be
used from a flow, a notebook or the CLI without touching Optuna or MLflow. Optional columns
(``cause``, ``nan_step``, ``first_nonfinite``, ``duration_s``, ``safe``) may be missing.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter  # noqa: E402

OUTCOMES = ("complete", "nan", "diverged", "pruned", "failed")
FAILURE_OUTCOMES = ("nan", "diverged")

COLORS = {
    "complete": "#2ca02c",
    "nan": "#d62728",
    "diverged": "#ff7f0e",
    "pruned": "#9a9a9a",
    "failed": "#000000",
}
MARKERS = {"complete": "o", "nan": "X", "diverged": "D", "pruned": "s", "failed": "P"}
OTHER_COLOR, OTHER_MARKER = "#8c6bb1", "v"

CAUSE_ABBREV = {
    "bad_input": "in",
    "precision_overflow": "fp",
    "gradient_explosion": "grad",
    "parameter_blowup": "param",
    "loss_imbalance": "imb",
    "divergence": "div",
    "unknown": "?",
}

TOP_COLUMNS = ("number", "value", "lr", "clip_norm", "content_weight", "style_weight", "tv_weight")
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
    failed = outcomes.isin(FAILURE_OUTCOMES)
    values = [(c if c is not None else "unknown") if f else None for c, f in zip(raw, failed, strict=True)]
    return pd.Series(values, index=trials.index, dtype=object)


def _order(outcome: str) -> int:
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
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], _order(kv[0][0]), kv[0][0], kv[0][1] or ""))
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
        if outcome in FAILURE_OUTCOMES and n:
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
    columns = [c for c in (*TOP_COLUMNS, "safe") if c in trials.columns]
    if len(trials) == 0 or "value" not in trials.columns:
        return pd.DataFrame(columns=columns)
    values = pd.to_numeric(trials["value"], errors="coerce")
    keep = (_outcomes(trials) == "complete") & np.isfinite(values)
    best = trials.loc[keep].assign(_v=values[keep])
    sort_by = ["_v", "number"] if "number" in best.columns else ["_v"]
    best = best.sort_values(sort_by, kind="stable").head(max(int(k), 0))
    return best[columns].reset_index(drop=True)


def _fmt_tick(v: float) -> str:
    return f"{v:g}"


def stability_map(
    trials: pd.DataFrame,
    path: str | Path,
    safest_number: int | None = None,
    title: str = "Stability map",
    annotate_causes: bool = True,
) -> Path:
    """Save a PNG of learning rate (x, log) against gradient-clip norm (y, log), one marker per trial.

    Markers are coloured by outcome; trials with clipping off (``clip_norm`` NaN) sit on a shaded
    band at the top labelled "off". The trial whose ``number`` equals ``safest_number`` gets a
    star outline and a "safest" label. NaN/diverged trials get a short cause tag when there are
    few of them (``annotate_causes``). Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = trials.copy() if trials is not None else pd.DataFrame()
    n_rows = len(df)
    df["_outcome"] = _outcomes(df) if n_rows else pd.Series(dtype=object)
    df["_cause"] = _causes(df, df["_outcome"]) if n_rows else pd.Series(dtype=object)
    lr = pd.to_numeric(df["lr"], errors="coerce") if "lr" in df.columns else pd.Series(np.nan, index=df.index)
    clip = (
        pd.to_numeric(df["clip_norm"], errors="coerce")
        if "clip_norm" in df.columns
        else pd.Series(np.nan, index=df.index)
    )
    df["_lr"], df["_clip"] = lr, clip
    df = df[np.isfinite(df["_lr"]) & (df["_lr"] > 0)]
    clip_on = np.isfinite(df["_clip"]) & (df["_clip"] > 0)

    # y layout in log10 units: the clipped trials below a separator, the clip-off band above it.
    if clip_on.any():
        lo, hi = math.log10(df.loc[clip_on, "_clip"].min()), math.log10(df.loc[clip_on, "_clip"].max())
    else:
        lo = hi = 0.0
    span = max(hi - lo, 1.0)
    bottom, sep, off, top = lo - max(0.12 * span, 0.2), hi + 0.12 * span, hi + 0.24 * span, hi + 0.36 * span
    if not clip_on.any():  # only the band: it fills the axes
        bottom = sep
    df["_y"] = np.where(clip_on, df["_clip"], 10**off)

    fig, ax = plt.subplots(figsize=(7, 5))
    try:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(10**bottom, 10**top)
        ax.axhspan(10**sep, 10**top, color="#f0f0f0", zorder=0)
        if clip_on.any():
            ax.axhline(10**sep, color="#666666", linestyle="--", linewidth=1, zorder=1)

        # y ticks: decades (or the data range) below the separator, plus "off" in the band.
        ticks = [
            t for t in LogLocator(base=10).tick_values(10**bottom, 10**sep) if 10**bottom <= t <= 10**sep
        ]
        if clip_on.any() and len(ticks) < 2:
            ticks = sorted({*ticks, 10**lo, 10**hi})
        if not clip_on.any():
            ticks = []
        minor = (
            [
                t
                for t in LogLocator(base=10, subs=tuple(range(2, 10))).tick_values(10**bottom, 10**sep)
                if 10**bottom <= t <= 10**sep
            ]
            if clip_on.any()
            else []
        )
        ax.yaxis.set_major_locator(FixedLocator([*ticks, 10**off]))
        ax.set_yticklabels([*(_fmt_tick(t) for t in ticks), "clip off"])
        ax.yaxis.set_minor_locator(FixedLocator(minor))
        ax.yaxis.set_minor_formatter(NullFormatter())

        present = sorted(df["_outcome"].unique(), key=lambda o: (_order(o), o))
        handles = []
        for outcome in present:
            sel = df[df["_outcome"] == outcome]
            color, marker = COLORS.get(outcome, OTHER_COLOR), MARKERS.get(outcome, OTHER_MARKER)
            ax.scatter(
                sel["_lr"],
                sel["_y"],
                c=color,
                marker=marker,
                s=55,
                alpha=0.9,
                edgecolors="white",
                linewidths=0.6,
                zorder=3,
            )
            handles.append(
                Line2D(
                    [],
                    [],
                    color=color,
                    marker=marker,
                    linestyle="",
                    markersize=8,
                    markeredgecolor="white",
                    label=f"{outcome} ({len(sel)})",
                )
            )

        failures = df[df["_outcome"].isin(FAILURE_OUTCOMES)]
        if annotate_causes and 0 < len(failures) <= 25:
            for i, (_, row) in enumerate(failures.sort_values("_lr").iterrows()):
                tag = CAUSE_ABBREV.get(row["_cause"], str(row["_cause"])[:5])
                ax.annotate(
                    tag,
                    (row["_lr"], row["_y"]),
                    xytext=(5, -9 if i % 2 == 0 else 4),  # alternate below/above: neighbours stay apart
                    textcoords="offset points",
                    fontsize=7,
                    color=COLORS.get(row["_outcome"], OTHER_COLOR),
                    zorder=4,
                )

        if safest_number is not None and "number" in df.columns:
            best = df[df["number"] == safest_number]
            if len(best):
                x, y = best["_lr"].iloc[0], best["_y"].iloc[0]
                ax.scatter(
                    [x],
                    [y],
                    marker="*",
                    s=650,
                    facecolors="none",
                    edgecolors="#1f3a93",
                    linewidths=1.8,
                    zorder=5,
                )
                ax.annotate(
                    "safest",
                    (x, y),
                    xytext=(12, 12),
                    textcoords="offset points",
                    fontsize=10,
                    fontweight="bold",
                    color="#1f3a93",
                    zorder=2,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.7},
                )
                handles.append(
                    Line2D(
                        [],
                        [],
                        marker="*",
                        linestyle="",
                        markersize=14,
                        markerfacecolor="none",
                        markeredgecolor="#1f3a93",
                        label=f"safest (#{safest_number})",
                    )
                )

        if len(df) == 0:
            ax.set_xlim(1e-4, 1e1)
            ax.text(0.5, 0.5, "no trials", transform=ax.transAxes, ha="center", va="center", color="#666666")
        else:
            xmin, xmax = df["_lr"].min(), df["_lr"].max()
            span_x = math.log10(xmax / xmin)
            pad = 0.08 * max(span_x, 1.0) + max(0.0, 1.0 - span_x) / 2  # at least ~1 decade shown
            ax.set_xlim(xmin / 10**pad, xmax * 10**pad)

        used = [c for c in CAUSE_ABBREV if c in set(failures["_cause"])] if annotate_causes else []
        if used and len(failures) <= 25:
            key = ", ".join(f"{CAUSE_ABBREV[c]} = {c}" for c in used)
            fig.text(0.01, 0.01, f"cause: {key}", fontsize=7, color="#444444")

        ax.set_xlabel("learning rate")
        ax.set_ylabel("gradient-clip norm")
        ax.grid(True, which="major", color="#dddddd", linewidth=0.6, zorder=0)
        ax.set_title(f"{title}  ({n_rows} trial{'' if n_rows == 1 else 's'})", pad=26)
        if handles:
            ax.legend(
                handles=handles,
                loc="lower center",
                bbox_to_anchor=(0.5, 1.0),
                ncol=min(len(handles), 6),
                frameon=False,
                fontsize=8,
                handletextpad=0.3,
                columnspacing=1.0,
            )
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def pipeline_markdown(
    trials: pd.DataFrame, safest: dict | None, model: dict | None = None, promotion: dict | None = None
) -> str:
    """The run summary a person reads first: safest settings, margins, NaN causes, the model."""
    lines = ["# stylepipe run", ""]
    if safest is None:
        lines += ["**No safe configuration**: every candidate went NaN or diverged under the stress",
                  "replays. Nothing was registered; the champion stays.", ""]  # fmt: skip
    else:
        lines += [f"## Safest configuration: trial {safest['trial']}", "", "| setting | value |", "|---|---|"]
        for key, value in safest["params"].items():
            shown = "off" if value is None else (f"{value:.4g}" if isinstance(value, float) else value)
            lines.append(f"| {key} | {shown} |")
        lines += [
            f"| quality | {safest['quality']:.4g} |",
            "",
            f"Passed: seeds {safest['seeds_passed']} and learning rate x{safest['lr_margin_passed']:g}; "
            f"{safest['safe_candidates']} of {safest['candidates']} candidates were safe.",
            "",
        ]
    if model:
        lines += [f"Registered model: `{model['model_uri']}` (version {model['version']}).", ""]
    if promotion:
        verdict = "promoted to **champion**" if promotion["promoted"] else "not promoted"
        lines += [f"Champion: {verdict}: {promotion['why']}.", ""]
    lines.append(causes_markdown(trials))
    return "\n".join(lines)
