"""Tables and pictures of a search (stylepipe.report)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from stylepipe.report import (
    COLORS,
    OUTCOMES,
    causes_markdown,
    causes_summary,
    pipeline_markdown,
    stability_figure,
    stability_map,
    top_trials,
)
from stylepipe.search.cost import cost_markdown, study_cost

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


def _panels(fig):
    """The (main, band) axes of a stability figure, None where absent; the band is the one labelled "clip off"."""
    band = [a for a in fig.axes if [t.get_text() for t in a.get_yticklabels()] == ["clip off"]]
    main = [a for a in fig.axes if a.get_ylabel() == "gradient-clip norm"]
    assert len(band) <= 1 and len(main) <= 1 and len(band) + len(main) == len(fig.axes)
    return (main or [None])[0], (band or [None])[0]


def _points(ax, outcome: str) -> list[tuple[float, float]]:
    """The (x, y) of every marker drawn on ``ax`` in the colour of ``outcome``."""
    if ax is None:
        return []
    rgb = to_rgb(COLORS[outcome])
    drawn = [c for c in ax.collections if len(c.get_facecolors()) and tuple(c.get_facecolors()[0][:3]) == rgb]
    return sorted((float(x), float(y)) for c in drawn for x, y in np.asarray(c.get_offsets()))


def _star(fig):
    """(axes, offsets) of the collection labelled "safest ...", or None."""
    stars = [(a, c) for a in fig.axes for c in a.collections if c.get_label().startswith("safest")]
    assert len(stars) <= 1
    return (stars[0][0], [tuple(p) for p in np.asarray(stars[0][1].get_offsets())]) if stars else None


def _tags(ax) -> dict[tuple[float, float], str]:
    return {tuple(t.xy): t.get_text() for t in ax.texts if t.get_text() != "safest"}


def _cause_key(fig) -> list[str]:
    return [t.get_text() for t in fig.texts if t.get_text() != fig.get_suptitle()]


def _legend(fig) -> list[str]:
    legends = [a.get_legend() for a in fig.axes if a.get_legend() is not None] + fig.legends
    assert len(legends) == 1
    return [t.get_text() for t in legends[0].get_texts()]


def test_stability_figure_points_per_outcome_in_main_and_band():
    df = _trials()
    main, band = _panels(stability_figure(df, safest_number=3))
    assert main is not None and band is not None
    assert band.get_shared_x_axes().joined(band, main)
    assert band.get_position().y0 > main.get_position().y1  # the band on top
    assert band.get_position().height < main.get_position().height / 4  # and thin
    assert main.get_xscale() == band.get_xscale() == main.get_yscale() == "log"
    for outcome in OUTCOMES:
        sel = df[df["outcome"] == outcome]
        clipped, off = sel[sel["clip_norm"].notna()], sel[sel["clip_norm"].isna()]
        assert _points(main, outcome) == sorted(zip(clipped["lr"], clipped["clip_norm"], strict=True))
        assert [x for x, _ in _points(band, outcome)] == sorted(off["lr"])
    assert sum(len(_points(a, o)) for a in (main, band) for o in OUTCOMES) == 10
    assert len(_points(main, "complete")) == 3 and len(_points(band, "complete")) == 1
    assert len(_points(main, "nan")) == 2 and len(_points(band, "nan")) == 1


def test_stability_figure_legend_title_and_x_range():
    fig = stability_figure(_trials(), safest_number=3, title="demo")
    assert _legend(fig) == [
        "complete (4)",
        "nan (3)",
        "diverged (1)",
        "pruned (1)",
        "failed (1)",
        "safest (#3)",
    ]
    assert fig.get_suptitle() == "demo  (10 trials)"
    main, _ = _panels(fig)
    lo, hi = main.get_xlim()
    assert lo < 1e-4 and hi > 5.0  # every learning rate inside
    assert _legend(stability_figure(_trials(), safest_number=None))[-1] == "failed (1)"
    single = stability_figure(_trials().iloc[[0]], safest_number=0)
    assert _legend(single) == ["complete (1)", "safest (#0)"] and single.get_suptitle().endswith("(1 trial)")
    lo, hi = single.axes[0].get_xlim()
    assert lo < 1e-3 < hi and hi / lo >= 9.9  # about a decade around a single learning rate


def test_stability_figure_star_on_safest():
    fig = stability_figure(_trials(), safest_number=3)
    main, band = _panels(fig)
    assert _star(fig) == (main, [(1e-2, 0.5)])
    assert "safest" in [t.get_text() for t in main.texts]
    off = stability_figure(_trials(), safest_number=5)  # clipping off: the star sits in the band
    assert _star(off) == (_panels(off)[1], [(5.0, 0.0)])
    assert "safest" in [t.get_text() for t in _panels(off)[1].texts]


def test_stability_figure_no_star():
    for safest in (None, 99):
        fig = stability_figure(_trials(), safest_number=safest)
        assert _star(fig) is None
        assert not any(t.get_text() == "safest" for a in fig.axes for t in a.texts)
        assert not any(label.startswith("safest") for label in _legend(fig))


def test_stability_figure_cause_tags():
    fig = stability_figure(_trials(), safest_number=3)
    main, band = _panels(fig)
    assert _tags(main) == {(2.0, 5.0): "fp", (3.0, 50.0): "grad", (0.8, 1.0): "div"}
    assert _tags(band) == {(5.0, 0.0): "fp"}
    assert _cause_key(fig) == ["cause: fp = precision_overflow, grad = gradient_explosion, div = divergence"]
    quiet = stability_figure(_trials(), safest_number=3, annotate_causes=False)
    assert all(_tags(a) == {} for a in quiet.axes) and _cause_key(quiet) == []
    many = pd.DataFrame(
        {
            "number": range(26),
            "outcome": "nan",
            "cause": "bad_input",
            "lr": np.logspace(-4, 0, 26),
            "clip_norm": 1.0,
        }
    )
    crowded = stability_figure(many)
    assert _tags(crowded.axes[0]) == {} and _cause_key(crowded) == []  # too many to tag
    assert len(_points(crowded.axes[0], "nan")) == 26
    few = stability_figure(many.iloc[:25])
    assert set(_tags(few.axes[0]).values()) == {"in"}
    assert _cause_key(few) == ["cause: in = bad_input"]


def test_stability_figure_edge_cases():
    df = _trials()
    main, band = _panels(stability_figure(df.assign(clip_norm=NAN), safest_number=3))
    assert main is None and band is not None  # a band-only figure
    assert len(_points(band, "complete")) == 4 and len(_points(band, "nan")) == 3
    assert band.get_xlabel() == "learning rate"

    main, band = _panels(stability_figure(df[df["clip_norm"].notna()], safest_number=3))
    assert band is None and len(_points(main, "complete")) == 3

    minimal = df[["number", "outcome", "value", "lr", "clip_norm"]].copy()
    minimal.loc[0, "clip_norm"] = None
    fig = stability_figure(minimal, safest_number=0)
    main, band = _panels(fig)
    assert _points(band, "complete") == [(1e-3, 0.0), (2e-3, 0.0)]
    assert _star(fig) == (band, [(1e-3, 0.0)])
    assert _tags(main) == {(2.0, 5.0): "?", (3.0, 50.0): "?", (0.8, 1.0): "?"}  # no cause column

    empty = stability_figure(df.iloc[:0])
    assert len(empty.axes) == 1 and [t.get_text() for t in empty.axes[0].texts] == ["no trials"]
    assert all(len(c.get_offsets()) == 0 for c in empty.axes[0].collections)
    assert empty.get_suptitle() == "Stability map  (0 trials)"


def test_the_map_shows_where_the_safest_margin_ends_and_which_trial_is_yours():
    df = _trials()
    df["is_baseline"] = df["number"] == 0
    fig = stability_figure(df, safest_number=3, lr_margin=2.0)
    main, band = _panels(fig)
    [bar] = main.lines
    assert list(bar.get_xdata()) == pytest.approx([1e-2, 2e-2]) and list(bar.get_ydata()) == pytest.approx(
        [0.5, 0.5]
    )
    assert any(t.get_text() == "x2 ok" for t in main.texts)
    [yours] = [t for t in main.texts if t.get_text() == "yours"]
    assert tuple(yours.xy) == pytest.approx((1e-3, 1.0))  # trial 0
    assert not stability_figure(df, safest_number=3).axes[-1].lines  # no margin given: no bar


def test_the_summary_says_plainly_when_your_own_settings_win():
    from stylepipe.search.safest import compare_with_baseline

    yours = {"trial": 0, "quality": 1.0, "safe": True, "why": "every replay stayed finite"}
    assert (
        compare_with_baseline(yours, yours)
        == "your settings (the config file's) are the safest configuration: keep them"
    )
    better = {"trial": 4, "quality": 0.75, "safe": True}
    assert compare_with_baseline(better, yours) == (
        "the safest configuration (trial 4) reaches quality 0.75, 25% lower than the 1 of your settings "
        "(the config file's) (lower is better); yours are safe"
    )
    unsafe = {**yours, "safe": False, "why": "seed 1, lr x2 went nan (parameter_blowup) at step 7"}
    assert "yours are not safe: seed 1, lr x2 went nan" in compare_with_baseline(better, unsafe)
    assert compare_with_baseline(None, unsafe).startswith("nothing was safe; your settings")
    # qualities are medians over seeds: shown with their spread; one chosen within your spread says so
    noisy = {**yours, "qualities": [1.0, 0.6, 1.4]}
    steady = {**better, "quality": 1.05, "qualities": [1.05, 0.95, 1.1]}
    assert compare_with_baseline(steady, noisy) == (
        "the safest configuration (trial 4) reaches quality 1.05 (seeds 0.95–1.1), 5% above the 1 (seeds 0.6–1.4) "
        "of your settings (the config file's), within each other's spread over seeds: it is the steadier or the "
        "further from the edge (lower is better); yours are safe"
    )
    # your own trial diverged: two configurations, each named (not "quality ..., safe; yours were not safe")
    diverged = {**unsafe, "quality": None, "why": "its trial ended diverged (divergence)"}
    assert compare_with_baseline(better, diverged) == (
        "the safest configuration (trial 4) reaches quality 0.75; your settings (the config file's) are not safe: "
        "its trial ended diverged (divergence)"
    )


def test_the_cost_counts_the_steps_each_stage_trained():
    trials = pd.DataFrame({"number": [0, 1, 2, 3], "steps": [30.0, 7.0, 12.0, float("nan")]})  # last: crashed
    verdicts = [
        {"horizon": 60, "replays": [{"outcome": "diverged", "step": 9}]},  # stopped at its first failure
        {"horizon": 60, "replays": [{"outcome": "complete", "step": None}] * 3},
    ]
    cost = study_cost(trials, verdicts, final_steps=300, edge_steps=62)  # the edge test trained 62
    assert cost == {
        "edge": 62,
        "search": 49,
        "certificate": 9 + 180,
        "final": 300,
        "total": 62 + 49 + 189 + 300,
    }
    line = cost_markdown(cost)
    assert line.startswith(
        "**Where the steps went**: edge test 62 (10%), search 49 (8%), certificate 189 (32%), final 300 (50%)"
    )
    assert "600 in all" in line
    # a cost recorded before the edge test existed (safest.json of an earlier study) reads as none
    assert cost_markdown({k: v for k, v in cost.items() if k != "edge"}).startswith(
        "**Where the steps went**: edge test 0 (0%)"
    )
    assert "Where the steps went" in pipeline_markdown(trials.assign(outcome="complete"), None, cost=cost)
