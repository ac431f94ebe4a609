"""Tables and pictures of a search (stylepipe.report)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stylepipe.report import causes_markdown, causes_summary, stability_map, top_trials

NAN = math.nan


def _trials() -> pd.DataFrame:
    """Ten trials: 4 complete, 3 nan (2 causes), 1 diverged, 1 pruned, 1 failed; 3 with clipping off."""
    rows = [
        # number, outcome, cause, value, lr, clip_norm
        (0, "complete", None, 3.0, 1e-3, 1.0),
        (1, "complete", None, 1.5, 2e-3, NAN),
        (2, "complete", None, 2.0, 5e-4, 10.0),
        (3, "complete", None, 0.5, 1e-2, 0.5),
        (4, "nan", "precision_overflow", NAN, 2.0, 5.0),
        (5, "nan", "precision_overflow", NAN, 5.0, NAN),
        (6, "nan", "gradient_explosion", NAN, 3.0, 50.0),
        (7, "diverged", "divergence", NAN, 0.8, 1.0),
        (8, "pruned", None, NAN, 1e-4, NAN),
        (9, "failed", None, NAN, 1e-3, 2.0),
    ]
    df = pd.DataFrame(rows, columns=["number", "outcome", "cause", "value", "lr", "clip_norm"])
    df["state"] = df["outcome"].map({"complete": "COMPLETE", "pruned": "PRUNED"}).fillna("FAIL")
    df["content_weight"], df["style_weight"], df["tv_weight"] = 1.0, 1e5, 1e-6
    df["nan_step"] = np.where(df["outcome"].isin(["nan", "diverged"]), 12.0, NAN)
    df["duration_s"] = 1.0
    return df


def _count(summary: pd.DataFrame, outcome: str, cause: str | None = None) -> int:
    sel = summary[summary["outcome"] == outcome]
    if cause is not None:
        sel = sel[sel["cause"] == cause]
    return int(sel["trials"].sum())


def test_causes_summary_counts():
    s = causes_summary(_trials())
    assert list(s.columns) == ["outcome", "cause", "trials"]
    assert s["trials"].sum() == 10
    assert _count(s, "complete") == 4
    assert _count(s, "nan", "precision_overflow") == 2
    assert _count(s, "nan", "gradient_explosion") == 1
    assert _count(s, "diverged", "divergence") == 1
    assert _count(s, "pruned") == 1 and _count(s, "failed") == 1
    assert list(s["trials"]) == sorted(s["trials"], reverse=True)
    assert s.iloc[0]["outcome"] == "complete"
    no_cause = s[~s["outcome"].isin(["nan", "diverged"])]["cause"]
    assert all(c is None or c == "" for c in no_cause)


def test_causes_summary_missing_cause_and_empty():
    s = causes_summary(_trials().drop(columns=["cause"]))
    assert _count(s, "nan", "unknown") == 3
    assert _count(s, "diverged", "unknown") == 1
    empty = causes_summary(_trials().iloc[:0])
    assert empty.empty and list(empty.columns) == ["outcome", "cause", "trials"]


def test_causes_markdown_mentions_counts_and_causes():
    md = causes_markdown(_trials())
    assert "10 trials" in md
    assert "complete: 4" in md
    assert "NaN: 3" in md and "precision_overflow 2" in md and "gradient_explosion 1" in md
    assert "diverged: 1" in md and "divergence 1" in md
    assert "pruned: 1" in md and "failed: 1" in md
    assert "#3" in md  # best complete trial
    assert "0 trials" in causes_markdown(_trials().iloc[:0])


def test_top_trials_orders_and_filters():
    df = _trials()
    df["safe"] = df["number"] != 3
    top = top_trials(df, k=3)
    assert list(top["number"]) == [3, 1, 2]
    assert list(top.columns) == [
        "number",
        "value",
        "lr",
        "clip_norm",
        "content_weight",
        "style_weight",
        "tv_weight",
        "safe",
    ]
    assert list(top_trials(df)["number"]) == [3, 1, 2, 0]  # only the complete ones
    assert "safe" not in top_trials(_trials()).columns


def _assert_png(path):
    assert path.exists()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert 600 <= w <= 1200 and 400 <= h <= 900


@pytest.mark.parametrize(
    "case",
    ["normal", "single", "all_clip_off", "no_clip_off", "no_safest", "minimal_columns", "empty"],
)
def test_stability_map_writes_png(tmp_path, case):
    df, safest = _trials(), 3
    if case == "single":
        df, safest = df.iloc[[0]], 0
    elif case == "all_clip_off":
        df = df.assign(clip_norm=NAN)
    elif case == "no_clip_off":
        df = df[df["clip_norm"].notna()]
    elif case == "no_safest":
        safest = None
    elif case == "minimal_columns":
        df = df[["number", "outcome", "value", "lr", "clip_norm"]].copy()
        df.loc[0, "clip_norm"] = None
    elif case == "empty":
        df, safest = df.iloc[:0], None
    out = stability_map(df, tmp_path / "sub" / "map.png", safest_number=safest, title=case)
    assert out == tmp_path / "sub" / "map.png"
    _assert_png(out)
