"""``make bench-search``: the search and its certificate, today's way against the new one, side by
side in one process, on the embedded demo. Counts of trials and steps: this machine's noise does
not move them.

Sides, each a study per seed:

* ``before``: no range test (search.edge_steps=0), no constraints (search.constraints=false),
  every candidate replayed in full (search.certify_all=true), 10 random start-up trials;
* ``now``: the settings as shipped (the range test, constraints, the best-first certificate).

For the same certificate, each ``now`` study is then certified again in full on the same trials
(certify_all, its verdicts cleared): the steps of both, and whether they chose the same safest.

Cases: (a) the classic one, train.lr=0.1 and no clipping as the user's settings; (b) the demo as
shipped. ``python -m bench.search_bench --seeds 5 --trials 12`` (the defaults).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

CASES = {
    "a: lr 0.1, no clipping": ["train.lr=0.1", "train.clip_norm=null"],
    "b: the demo as shipped": [],
}
SIDES = {
    "before": [
        "search.edge_steps=0",
        "search.constraints=false",
        "search.certify_all=true",
        "search.startup_trials=10",
    ],
    "now": [],
}


def full_certificate(config, study) -> tuple[int | None, int]:
    """The study certified again with every candidate replayed in full, on the same trials: (its
    safest trial, its replay steps)."""
    from stylepipe.search.attributes import StudyRecord
    from stylepipe.search.cost import study_cost
    from stylepipe.search.safest import confirm_safest
    from stylepipe.search.study_data import load_study_data

    config = config.with_overrides({"search.certify_all": True})
    study.set_user_attr("safety", [])  # no verdict kept from the best-first certificate
    data = load_study_data(config)
    safest = confirm_safest(study, config, lambda: data)
    steps = study_cost(pd.DataFrame(), StudyRecord(study).verdicts, 0)["certificate"]
    return (safest.trial if safest else None), steps


def run_study(config) -> dict[str, Any]:
    from stylepipe.chain import run_search
    from stylepipe.search.study import open_study

    result = run_search(config, progress=False)
    trials = pd.read_csv(result["trials_csv"])
    finite = trials[trials["outcome"] == "complete"]["value"]
    broke = trials["outcome"].isin(["nan", "diverged"]) & ~trials["is_baseline"].astype(bool)
    safest = result["safest"]
    return {
        "diverged": int(broke.sum()),
        "best": float(finite.min()) if len(finite) else float("nan"),
        "certificate": result["cost"]["certificate"],
        "total": result["cost"]["edge"] + result["cost"]["search"] + result["cost"]["certificate"],
        "edge": result["cost"]["edge"],
        "safest": safest.trial if safest else None,
        "study": open_study(config),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--cases", nargs="*", default=list("ab"), help="a, b or both")
    parser.add_argument("--sides", nargs="*", default=list(SIDES), help="before, now or both")
    parser.add_argument("--set", action="append", default=[], help="more overrides for the 'now' side")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    # the baseline's own lr (0.1 in case a) lies outside the lr range below the edge, as meant
    warnings.filterwarnings("ignore", message="Fixed parameter lr with value")
    from stylepipe import stages
    from stylepipe.config import load_config

    root = Path(tempfile.mkdtemp(prefix="stylepipe-bench-search-"))
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    base = load_config(demo, [f"run_dir={root}", "final.train=false"])
    prepared = stages.prepare(base)["prepared"]
    started = time.perf_counter()
    rows = []
    for case, overrides in CASES.items():
        if case[0] not in args.cases:
            continue
        for seed in range(args.seeds):
            for side, side_overrides in SIDES.items():
                if side not in args.sides:
                    continue
                more = args.set if side == "now" else []
                config = load_config(
                    demo,
                    [
                        f"run_dir={root / side}",
                        "final.train=false",
                        f"data.content={prepared}",
                        f"search.n_trials={args.trials}",
                        f"search.seed={seed}",
                        f"search.study_name=bench-{case[0]}-{side}-{seed}",
                        *overrides,
                        *side_overrides,
                        *more,
                    ],
                )
                study = run_study(config)
                if side == "now":
                    study["full_safest"], study["full_certificate"] = full_certificate(config, study["study"])
                study.pop("study")
                rows.append({"case": case, "seed": seed, "side": side, **study})
                print(f"{case} seed {seed} {side}: {study}", flush=True)
    print(f"\n{len(rows)} studies in {time.perf_counter() - started:.0f} s\n")
    print(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table for bench/RESULTS.md: per case and side, sums and medians over seeds,
    and the ratios of now to before."""
    lines = [
        "| case | side | trials that broke (sum) | best quality (median) | certificate steps (sum) "
        "| steps to a certified configuration (sum) | the full certificate of the same trials |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in dict.fromkeys(r["case"] for r in rows):
        sums: dict[str, dict[str, float]] = {}
        for side in SIDES:
            mine = [r for r in rows if r["case"] == case and r["side"] == side]
            if not mine:
                continue
            sums[side] = {
                "diverged": sum(r["diverged"] for r in mine),
                "best": statistics.median(r["best"] for r in mine),
                "certificate": sum(r["certificate"] for r in mine),
                "total": sum(r["total"] for r in mine),
            }
            full = "-"
            if side == "now":
                agree = sum(r["safest"] == r["full_safest"] for r in mine)
                steps = sum(r["full_certificate"] for r in mine)
                full = f"{steps:,} steps; the same safest in {agree} of {len(mine)}"
            row = sums[side]
            lines.append(
                f"| {case} | {side} | {row['diverged']} | {row['best']:.4g} | {row['certificate']:,} "
                f"| {row['total']:,} | {full} |"
            )
        if len(sums) == 2:
            now, before = sums["now"], sums["before"]
            ratio = {k: now[k] / before[k] if before[k] else float("nan") for k in now}
            lines.append(
                f"| {case} | now / before | {ratio['diverged']:.2f} | {ratio['best']:.3f} "
                f"| {ratio['certificate']:.2f} | {ratio['total']:.2f} | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
