"""``make bench-edge``: is the stability edge where runs trained as trials train really break, and
is the answer better than plain Optuna's once the seed's noise is counted? One process, counts not
times; every part's results are kept in ``--out`` (JSON) as they come, so a run cut short goes on.

Cases, both on the demo's settings (``configs/demo.yaml``: 30-step trials at 48 px):

* ``seed's case``: Adam at lr 0.1, no clipping, no warm-up as the user's settings;
* ``demo``: the demo as shipped (lr 1e-3, clipping at 10).

Parts:

1. ``sweep``: for each clipping mode the study's trials train in, runs from initialisation at a
   constant lr, at the trial's length, with the config's own guard (as a trial trains): 12 lrs
   log-spaced across ``search.space.lr``, then 8 more across the coarse sweep's step where runs
   began to break, 3 seeds each. The *true* edge is the lowest lr at which 2 of the 3 seeds broke.
   Beside it, the edge the edge test reports, and their ratio.
2. ``bound``: runs at the reported edge / ``search.edge_margin``, 3 seeds, at the trial's length
   and at 4x it: all must stay finite.
3. ``studies``: 12-trial studies on 5 study seeds, stylepipe as shipped against plain Optuna (no
   edge test, no constraints, 10 random start-up trials). Trials that broke among the sampled ones
   (the baseline, the user's own settings, is not sampled), and the best quality found: plain
   Optuna's at 12 trials, and at the same compute (12 trials plus the edge test's steps in trials).
4. ``answers``: the seed's case's answers on 3 study seeds (stylepipe's safest, plain Optuna's
   ``best_trial`` at 12 trials), each trained again on hidden content (images no study saw) with the
   study's style, at 4x a trial's length, on 3 seeds: the quality each reaches, its median and spread.

The images: scikit-image's bundled ones, split by name: two thirds are what every study, sweep and
edge test sees; the other third is the hidden content of part 4.

``python -m bench.edge_calibration --out runs/bench-edge/results.json`` (a run cut short goes on where it stopped).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

CASES = {
    "seed's case": ["train.lr=0.1", "train.clip_norm=null", "train.warmup_steps=0"],
    "demo": [],
}
PLAIN = ["search.edge_steps=0", "search.constraints=false", "search.startup_trials=10"]
SEEDS = (0, 1, 2)
COARSE, FINE = 12, 8
STUDY_SEEDS, ANSWER_SEEDS = 5, 3
TRIALS = 12
HORIZON_MULTIPLE = 4
BROKE = ("nan", "diverged")


class Results:
    """The parts' results, kept in a JSON file as each one comes."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))
        return value


def prepare_split(root: Path) -> tuple[Path, Path]:
    """The seen two thirds and the hidden third of scikit-image's bundled images, prepared."""
    from stylepipe.config import PrepareConfig
    from stylepipe.data.prepare import prepare
    from stylepipe.data.sources import SKIMAGE_DEMO, export_skimage

    names = sorted(SKIMAGE_DEMO)
    hidden = tuple(names[2::3])
    seen = tuple(n for n in names if n not in hidden)
    settings = PrepareConfig(image_size=64, min_size=32, val_fraction=0.25, workers=1)
    folders = []
    for part, chosen in (("seen", seen), ("hidden", hidden)):
        out = root / part / "prepared"
        if not (out / "shard.npy").is_file():
            prepare(export_skimage(root / part / "images", chosen), out, settings, progress=False)
        folders.append(out)
    return folders[0], folders[1]


def case_config(root: Path, prepared: Path, case: str, *more: str):
    from stylepipe.config import load_config

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    return load_config(
        demo,
        [
            f"run_dir={root}",
            f"data.content={prepared}",
            "final.train=false",
            "train.device=cpu",
            *CASES[case],
            *more,
        ],
    )


def cold_run(config, data, lr: float, clip_norm: float | None, seed: int, steps: int) -> dict[str, Any]:
    """One run from initialisation at ``lr``, as a trial trains (the config's own guard)."""
    from stylepipe.search.candidate import run_candidate

    settings = {"train.lr": lr, "train.clip_norm": clip_norm, "train.seed": seed, "train.steps": steps}
    run = run_candidate(config.with_overrides(settings), data)
    return {
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "outcome": run.outcome,
        "step": run.autopsy.step if run.autopsy else None,
    }


def true_edge(runs: list[dict[str, Any]]) -> float | None:
    """The lowest lr at which at least 2 of the 3 seeds broke."""
    by_lr: dict[float, int] = {}
    for r in runs:
        by_lr[r["lr"]] = by_lr.get(r["lr"], 0) + (r["outcome"] in BROKE)
    broke = [lr for lr, n in by_lr.items() if n >= 2]
    return min(broke) if broke else None


def sweep(config, data, clip_norm: float | None) -> dict[str, Any]:
    low, high = config.search.space.lr
    steps = config.train.steps
    coarse = [float(x) for x in np.geomspace(low, high, COARSE)]
    runs = [cold_run(config, data, lr, clip_norm, seed, steps) for lr in coarse for seed in SEEDS]
    edge = true_edge(runs)
    if edge is not None and edge > low:  # the coarse step where runs began to break, refined
        below = coarse[coarse.index(edge) - 1]
        fine = [float(x) for x in np.geomspace(below, edge, FINE + 2)[1:-1]]
        runs += [cold_run(config, data, lr, clip_norm, seed, steps) for lr in fine for seed in SEEDS]
    return {"runs": runs, "true_edge": true_edge(runs), "lrs": sorted({r["lr"] for r in runs})}


def calibrate(results: Results, root: Path, seen: Path, cases: list[str]) -> None:
    from stylepipe.search.edge import clip_modes, find_edge
    from stylepipe.search.study_data import load_study_data

    for case in cases:
        config = case_config(root / "sweeps", seen, case)
        data = load_study_data(config)
        for mode, clip_norm in clip_modes(config).items():
            key = f"calibration/{case}/{mode}"
            if results.get(key):
                continue
            found = find_edge(config, data, clip_norm)
            truth = sweep(config, data, clip_norm)
            row = {"clip_norm": clip_norm, "reported": found.lr, "passed": found.passed,
                   "edge_steps": found.steps_trained, **truth}  # fmt: skip
            bound = found.bound(config.search.edge_margin)
            row["bound"] = bound
            if bound is not None:
                row["bound_runs"] = [
                    cold_run(config, data, bound, clip_norm, seed, steps)
                    for steps in (config.train.steps, HORIZON_MULTIPLE * config.train.steps)
                    for seed in SEEDS
                ]
            print(f"{key}: reported {found.lr}, true {truth['true_edge']}", flush=True)
            results.put(key, row)


def best_quality(trials, limit: int | None = None) -> float:
    """The best quality among the first ``limit`` counted (complete or pruned) trials."""
    import optuna

    counted = [
        t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    counted = counted[:limit] if limit else counted
    values = [t.value for t in counted if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    return min(values) if values else float("nan")


def broke_sampled(trials, limit: int | None = None) -> int:
    return sum(
        t.user_attrs.get("outcome") in BROKE for t in trials[:limit] if not t.user_attrs.get("baseline")
    )


def studies(results: Results, root: Path, seen: Path, cases: list[str]) -> None:
    import optuna

    from stylepipe import stages
    from stylepipe.chain import run_search
    from stylepipe.search.attributes import StudyRecord

    for case in cases:
        for seed in range(STUDY_SEEDS):
            key = f"studies/{case}/{seed}"
            if results.get(key):
                continue
            tag = "a" if case.startswith("seed") else "b"
            ours = case_config(
                root / "studies", seen, case, f"search.seed={seed}", f"search.n_trials={TRIALS}",
                f"search.study_name=edge-{tag}-{seed}",
            )  # fmt: skip
            result = run_search(ours, progress=False)
            study = optuna.load_study(study_name=ours.study_name, storage=ours.storage_url)
            trials = study.get_trials()
            edges = StudyRecord(study).edges
            edge_steps = edges.steps_trained if edges else 0
            extra = math.ceil(edge_steps / ours.train.steps)  # the edge test's steps, in trials
            plain = case_config(
                root / "studies", seen, case, *PLAIN, f"search.seed={seed}", f"search.n_trials={TRIALS + extra}",
                f"search.study_name=plain-{tag}-{seed}",
            )  # fmt: skip
            stages.search_trials(plain)
            plain_trials = optuna.load_study(
                study_name=plain.study_name, storage=plain.storage_url
            ).get_trials()
            safest = result["safest"]
            row = {
                "broke": broke_sampled(trials),
                "best": best_quality(trials),
                "edge_steps": edge_steps,
                "safest": safest.to_json() if safest else None,
                "plain_broke": broke_sampled(plain_trials, TRIALS),
                "plain_best": best_quality(plain_trials, TRIALS),
                "plain_best_same_compute": best_quality(plain_trials),
                "plain_trials_same_compute": TRIALS + extra,
                "plain_answer": _plain_answer(plain_trials),
            }
            print(f"{key}: {row['broke']} broke, best {row['best']:.4g}; plain {row['plain_broke']} broke, best "
                  f"{row['plain_best']:.4g} ({row['plain_best_same_compute']:.4g} at the same compute)", flush=True)  # fmt: skip
            results.put(key, row)


def _plain_answer(trials) -> dict[str, Any] | None:
    """Plain Optuna's ``best_trial`` among its first TRIALS counted trials: its parameters."""
    import optuna

    from stylepipe.search.space import params_from_trial

    counted = [
        t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    complete = [t for t in counted[:TRIALS] if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    return {"trial": best.number, "quality": best.value, "params": params_from_trial(best)} if best else None


def answers(results: Results, root: Path, seen: Path, hidden: Path) -> None:
    """Each answer of the seed's case trained again on hidden content, 4x a trial, 3 seeds."""
    from stylepipe.search.candidate import run_candidate
    from stylepipe.search.space import apply
    from stylepipe.search.study_data import load_study_data

    case = "seed's case"
    config = case_config(root / "answers", hidden, case)
    data = load_study_data(config)
    for seed in range(ANSWER_SEEDS):
        key = f"answers/{seed}"
        study = results.get(f"studies/{case}/{seed}")
        if results.get(key) or study is None:
            continue
        row = {}
        for side, answer in (("stylepipe", study["safest"]), ("plain", study["plain_answer"])):
            if answer is None:
                row[side] = None
                continue
            qualities = []
            for run_seed in SEEDS:
                trained = apply(config, answer["params"], **{"train.seed": run_seed,
                                                             "train.steps": HORIZON_MULTIPLE * config.train.steps})  # fmt: skip
                run = run_candidate(trained, data)
                qualities.append(run.quality if run.outcome == "complete" else None)
            row[side] = {
                "params": answer["params"],
                "search_quality": answer["quality"],
                "retrained": qualities,
            }
        print(f"{key}: {row}", flush=True)
        results.put(key, row)


def _median(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def tables(results: Results) -> str:
    lines = ["### The edge against runs trained as trials train", "",
             "| case | clipping | reported edge | true edge (2 of 3 seeds broke) | reported / true "
             "| runs at the bound (edge / 2), 3 seeds, 30 and 120 steps | edge-test steps |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for case in CASES:
        for mode in ("off", "on"):
            row = results.get(f"calibration/{case}/{mode}")
            if not row:
                continue
            clip = "off" if row["clip_norm"] is None else f"at {row['clip_norm']:g}"
            reported, truth = row["reported"], row["true_edge"]
            ratio = f"{reported / truth:.2f}" if reported and truth else "-"
            bound_runs = row.get("bound_runs") or []
            finite = sum(r["outcome"] == "complete" for r in bound_runs)
            bound = (
                f"{finite} of {len(bound_runs)} finite at lr {row['bound']:.3g}" if bound_runs else "no bound"
            )
            lines.append(
                f"| {case} | {clip} | {_num(reported)} | {_num(truth)} ({len(row['lrs'])} lrs) | {ratio} "
                f"| {bound} | {row['edge_steps']} |"
            )
    lines += ["", "### Trials that broke and the best quality, 12-trial studies on 5 seeds", "",
              "| case | trials that broke among the sampled, per study (median) | plain Optuna's (median) "
              "| best quality, median | plain Optuna's at 12 trials | ours / plain | plain Optuna's at the same compute "
              "| ours / plain at the same compute |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for case in CASES:
        rows = [results.get(f"studies/{case}/{s}") for s in range(STUDY_SEEDS)]
        rows = [r for r in rows if r]
        if not rows:
            continue
        broke = [r["broke"] for r in rows]
        plain_broke = [r["plain_broke"] for r in rows]
        best, plain = _median([r["best"] for r in rows]), _median([r["plain_best"] for r in rows])
        same = _median([r["plain_best_same_compute"] for r in rows])
        lines.append(
            f"| {case} | {statistics.median(broke):g} ({broke}) | {statistics.median(plain_broke):g} ({plain_broke}) "
            f"| {best:.4g} | {plain:.4g} | {best / plain:.3f} | {same:.4g} "
            f"({rows[0]['plain_trials_same_compute']} trials) | {best / same:.3f} |"
        )
    lines += ["", "### The seed's case's answers trained again on hidden content (120 steps, seeds 0-2)", "",
              "| study seed | answer | its parameters | search quality (one seed) | retrained quality, 3 seeds "
              "| median | spread (max - min) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    medians: dict[str, list[float]] = {"stylepipe": [], "plain": []}
    spreads: dict[str, list[float]] = {"stylepipe": [], "plain": []}
    for seed in range(ANSWER_SEEDS):
        row = results.get(f"answers/{seed}")
        if not row:
            continue
        for side in ("stylepipe", "plain"):
            answer = row.get(side)
            if answer is None:
                lines.append(f"| {seed} | {side} | none | | | | |")
                continue
            q = answer["retrained"]
            finite = [v for v in q if v is not None]
            median = _median(q)
            width = (max(finite) - min(finite)) if len(finite) == len(q) else float("inf")
            medians[side].append(median)
            spreads[side].append(width)
            p = answer["params"]
            clip = "off" if p.get("clip_norm") is None else f"{p['clip_norm']:.3g}"
            shown = f"lr {p['lr']:.2g}, clip {clip}, style {p.get('style_weight', float('nan')):.2g}"
            lines.append(
                f"| {seed} | {side} | {shown} | {answer['search_quality']:.4g} "
                f"| {', '.join('broke' if v is None else f'{v:.4g}' for v in q)} | {median:.4g} | {width:.4g} |"
            )
    if medians["stylepipe"] and medians["plain"]:
        lines += ["", f"Over the study seeds, median of the medians: stylepipe {_median(medians['stylepipe']):.4g}, "
                      f"plain Optuna {_median(medians['plain']):.4g}; median spread: stylepipe "
                      f"{_median(spreads['stylepipe']):.4g}, plain Optuna {_median(spreads['plain']):.4g}."]  # fmt: skip
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "none" if value is None else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-edge/results.json"))
    parser.add_argument("--parts", nargs="*", default=["calibration", "studies", "answers"])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--tables", action="store_true", help="print the tables of what --out holds, run nothing"
    )
    parser.add_argument(
        "--merge", nargs="*", type=Path, default=[],
        help="with --tables: more results files (of runs split over processes) to print with --out",
    )  # fmt: skip
    args = parser.parse_args()
    results = Results(args.out)
    for more in args.merge:
        results.data.update(Results(more).data)
    if not args.tables:
        logging.disable(logging.WARNING)
        warnings.filterwarnings("ignore", message="Fixed parameter lr with value")  # the baseline's lr 0.1
        root = (
            args.out.parent if args.out.parent != Path(".") else Path(tempfile.mkdtemp(prefix="bench-edge-"))
        )
        seen, hidden = prepare_split(root / "images")
        if "calibration" in args.parts:
            calibrate(results, root, seen, args.cases)
        if "studies" in args.parts:
            studies(results, root, seen, args.cases)
        if "answers" in args.parts:
            answers(results, root, seen, hidden)
    print(tables(results))


if __name__ == "__main__":
    main()
