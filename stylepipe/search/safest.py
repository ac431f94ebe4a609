"""The safest configuration: the top-K trials, and the user's own settings (the baseline),
replayed under stress at the horizon that matters (docs/design.md, 'Safest configuration').

Each candidate is replayed once with its learning rate multiplied by ``search.lr_margin`` (the
likeliest failure, first) and with ``search.replay_seeds`` more seeds, each for
``confirm_horizon`` steps. It is *safe* when every replay stays finite and does not diverge;
its replays stop at the first that fails. Candidates are certified best-first by their trial's
quality, so the first that passes is the safest (ties go to the lower gradient-norm spikiness)
and worse candidates are not replayed; ``search.certify_all`` replays every candidate in full. The replays are shared work: any worker of the study runs them once the search has
ended, each exactly once (replays.py). If none is safe there is no safest configuration. The record states its
**certificate** (the seeds, the margin and the horizon it passed) and compares it with the
**baseline**, the settings of the user's own config file, which every study runs as its first
trial and which is always replayed.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from typing import Any

import optuna

from stylepipe.config import Config
from stylepipe.records import BROKE, Certificate, Edges, Safest
from stylepipe.search import replays
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.space import apply, params_from_trial
from stylepipe.search.study_data import StudyData
from stylepipe.threads import ALONE, Cores
from stylepipe.tracking import Tracker

log = logging.getLogger(__name__)

# The replays run at the final model's length when that costs at most this many trials' length.
HORIZON_MULTIPLE = 4


def confirm_horizon(config: Config) -> int:
    """How long each stress replay trains: ``search.confirm_steps`` when set; otherwise the final
    model's length, capped at ``HORIZON_MULTIPLE`` times a trial's, and never shorter than a
    trial. A spike that comes late only shows in a long run, but the replays cost
    (top_k + 1) x (replay_seeds + 1) runs: at the cap, as much as about 4 x that many trials."""
    if config.search.confirm_steps is not None:
        return config.search.confirm_steps
    return max(config.train.steps, min(config.final_run_steps, HORIZON_MULTIPLE * config.train.steps))


def replay_plan(seed: int, replay_seeds: int, lr_margin: float) -> list[dict[str, Any]]:
    """The stress replays of one candidate, the likeliest failure first: its lr x margin, then
    more seeds at its own lr. A candidate's replays stop at its first failure."""
    plan = [{"seed": seed, "lr_factor": lr_margin}] if lr_margin > 1.0 else []
    return plan + [{"seed": seed + i, "lr_factor": 1.0} for i in range(1, replay_seeds + 1)]


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial that answers for the config file's own settings. A baseline trial failed by a
    crash or a kill says nothing about stability: its retry (Optuna re-queues a copy, marked
    baseline too) answers for it."""
    marked = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")]
    answering = [t for t in marked if t.state != optuna.trial.TrialState.FAIL]
    return (answering or marked or [None])[0]


def _verdict(trial, params, plan, results, horizon) -> dict[str, Any]:
    """A candidate's verdict from its replays that ran (``results``, in plan order); its
    ``quality`` is the median over the seeds it ran at its own lr (its trial's and its replays'
    at a trial's length), ``qualities`` each of them."""
    qualities = replays.seed_qualities(trial.value, results)
    failed = [r for r in results if r["outcome"] != "complete"]
    safe = not failed and len(results) == len(plan)
    spikes = [r["spikiness"] for r in results if r["spikiness"] is not None]
    why = (
        "every replay stayed finite"
        if safe
        else (
            f"seed {failed[0]['seed']}, lr x{failed[0]['lr_factor']:g} went {failed[0]['outcome']} "
            f"({failed[0]['cause']}) at step {failed[0]['step']}"
        )
    )
    log.info("trial %d: %s", trial.number, "safe" if safe else f"NOT safe: {why}")
    return {
        "trial": trial.number,
        "quality": statistics.median(qualities),
        "qualities": qualities,
        "params": params,
        "safe": safe,
        "spikiness": max(spikes) if spikes else None,
        "replays": results,
        "why": why,
        "plan": plan,
        "horizon": horizon,
    }


def _unfinished(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The verdict of a candidate whose own trial did not complete (the baseline may not have)."""
    outcome = trial.user_attrs.get("outcome", trial.state.name.lower())
    return {
        "trial": trial.number,
        "quality": None,
        "params": params_from_trial(trial),
        "safe": False,
        "spikiness": None,
        "replays": [],
        "why": f"its trial ended {outcome} ({trial.user_attrs.get('cause') or 'no cause'})",
    }


def spread(verdict: dict[str, Any]) -> tuple[float, float]:
    """The lowest and highest quality a candidate reached over its seeds."""
    qualities = verdict.get("qualities") or [verdict["quality"]]  # a verdict kept from before
    return min(qualities), max(qualities)


def _closer_to_breaking(verdict: dict[str, Any], edges: Edges | None) -> tuple[float, float]:
    """How near a candidate trains to where training breaks: its lr over the edge of its clipping
    mode (its lr alone where none is known), then its clip norm (off: infinite)."""
    lr, clip = verdict["params"]["lr"], verdict["params"].get("clip_norm")
    edge = edges.of_mode("off" if clip is None else "on") if edges is not None else None
    nearness = lr / edge.lr if edge is not None and edge.lr is not None else lr
    return nearness, math.inf if clip is None else clip


def choose(safe: list[dict[str, Any]], edges: Edges | None = None) -> tuple[dict[str, Any], str]:
    """The safest among the candidates that passed, and why, when the median alone did not decide.

    The lowest median quality over seeds leads. Candidates whose medians lie within each other's
    spread (each in the other's lowest-to-highest) are not told apart by it: among them, the
    smaller spread wins, then the one further below the edge of its clipping mode (or clipped
    tighter), then the lower median."""
    leader = min(safe, key=lambda v: (v["quality"], v["spikiness"] or math.inf))
    low, high = spread(leader)

    def within(v: dict[str, Any]) -> bool:
        v_low, v_high = spread(v)
        return low <= v["quality"] <= high and v_low <= leader["quality"] <= v_high

    close = [v for v in safe if within(v)]
    if len(close) < 2:
        return leader, ""

    def width(v: dict[str, Any]) -> float:
        v_low, v_high = spread(v)
        return v_high - v_low

    best = min(close, key=lambda v: (width(v), _closer_to_breaking(v, edges), v["quality"]))
    shown = " and ".join(
        f"trial {v['trial']} ({v['quality']:.4g}, seeds {spread(v)[0]:.4g}–{spread(v)[1]:.4g})" for v in close
    )
    others = [v for v in close if v is not best]
    narrower = all(width(best) < width(v) for v in others)
    reason = (
        "the smallest spread over seeds"
        if narrower
        else "the same spread, further below the edge of its mode"
    )
    return (
        best,
        f"{shown} lie within each other's spread of quality over seeds: trial {best['trial']} has {reason}",
    )


def certificate(replays: list[dict[str, Any]], horizon: int) -> Certificate:
    """What a configuration was shown to survive, in numbers and in plain words."""
    seeds = [r["seed"] for r in replays if r["lr_factor"] == 1.0]
    stressed = [r for r in replays if r["lr_factor"] > 1.0]
    parts = (
        [f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} at its learning rate"]
        if seeds
        else []
    )
    parts += [f"seed {r['seed']} at its learning rate x{r['lr_factor']:g}" for r in stressed]
    text = (
        f"stayed finite and did not diverge for {horizon} steps with {' and '.join(parts)}"
        if parts
        else "was not replayed (search.replay_seeds=0, search.lr_margin=1): only its trial"
    )
    margin = stressed[0]["lr_factor"] if stressed else 1.0
    return Certificate(seeds=seeds, lr_margin=margin, horizon_steps=horizon, text=text)


def compare_with_baseline(best: dict | None, baseline: dict | None) -> str:
    """The answer to "why not keep my own settings?", in numbers, each configuration named; plain
    when the baseline wins."""
    if baseline is None:
        return "no baseline trial in this study"
    mine = "your settings (the config file's)"
    verdict = "are safe" if baseline["safe"] else f"are not safe: {baseline['why']}"
    if best is None:
        return f"nothing was safe; {mine} {verdict}"
    if best["trial"] == baseline["trial"]:
        return f"{mine} are the safest configuration: keep them"
    safest = f"the safest configuration (trial {best['trial']}) reaches quality {_with_spread(best)}"
    if baseline["quality"] is None:
        return f"{safest}; {mine} {verdict}"
    theirs = f"the {_with_spread(baseline)} of {mine}"
    gain = (baseline["quality"] - best["quality"]) / abs(baseline["quality"]) if baseline["quality"] else 0.0
    if gain < 0:  # chosen among medians within each other's spread (``choose``), not for its median
        return (
            f"{safest}, {-gain:.0%} above {theirs}, within each other's spread over seeds: it is the steadier "
            f"or the further from the edge (lower is better); yours {verdict}"
        )
    return f"{safest}, {gain:.0%} lower than {theirs} (lower is better); yours {verdict}"


def _with_spread(verdict: dict[str, Any]) -> str:
    low, high = spread(verdict)
    return f"{verdict['quality']:.4g}" + (f" (seeds {low:.4g}–{high:.4g})" if low < high else "")


def nothing_safe_because(verdicts: list[dict]) -> str:
    """Why a study has no safe configuration, as its verdicts tell it."""
    if not verdicts:
        return "no trial completed: there was nothing to replay"
    if not any(v["replays"] for v in verdicts):
        return f"no candidate completed its trial, so none was replayed ({verdicts[0]['why']})"
    return "no candidate stayed finite under every stress replay"


class CertificatePlan:
    """Which candidates a study's certificate replays, how, and which verdicts it keeps.

    The candidates are the top-K complete trials, best-first, then the baseline. A candidate
    replayed before (the study then grew) keeps its verdict: the same trial, plan and horizon
    replay the same way, and the study's settings cannot change (study.py). Best-first, a
    candidate worse than one that passed before is not replayed (the baseline always is)."""

    def __init__(self, study: optuna.Study, config: Config):
        search = config.search
        self.horizon = confirm_horizon(config)
        self.plan = replay_plan(config.train.seed, search.replay_seeds, search.lr_margin)
        complete = [
            t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
        ]
        self.candidates = sorted(complete, key=lambda t: t.value)[: search.top_k]
        self.base = baseline_trial(study)
        if self.base is not None and self.base.number not in [t.number for t in self.candidates]:
            self.candidates.append(self.base)  # last: it is replayed whatever passed before it
        self.kept = {
            v["trial"]: v
            for v in StudyRecord(study).verdicts
            if v.get("plan") == self.plan and v.get("horizon") == self.horizon
        }
        # best-first: a candidate whose trial is worse than the spread over seeds of one that
        # passed before could not win on median (the baseline is replayed whatever passed)
        passed = [spread(v)[1] for v in self.kept.values() if v["safe"]]
        reach = min(passed) if passed and not search.certify_all else None
        self.to_replay = [
            t
            for t in self.candidates
            if t.number not in self.kept
            and (self.is_baseline(t) or reach is None or t.value is None or t.value <= reach)
        ]

    def is_baseline(self, trial: optuna.trial.FrozenTrial) -> bool:
        return self.base is not None and trial.number == self.base.number

    @property
    def queue_order(self) -> list[optuna.trial.FrozenTrial]:
        """The order their replays are queued in: the two certainly needed first (the best
        candidate's, and the baseline's, replayed whatever passes), then the others best-first,
        each of which a better one passing cancels. One worker runs the same replays as in the
        candidates' order; several start on the certain ones instead of speculating."""
        first, *rest = self.to_replay or [None]
        if first is None or self.is_baseline(first):
            return self.to_replay
        baseline = [t for t in rest if self.is_baseline(t)]
        return [first, *baseline, *(t for t in rest if not self.is_baseline(t))]


def share_replays(
    config: Config,
    study: optuna.Study,
    data: Callable[[], StudyData],
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    cores: Cores = ALONE,
    wait: bool = False,
    plan: CertificatePlan | None = None,
) -> tuple[optuna.Study, int]:
    """Queue the certificate's replays (once per study, replays.py) and run them with any other
    worker; with ``wait``, until every one has an end, run here or elsewhere. Any worker of the
    study may call it once the search has ended; the finisher calls it with ``wait`` (and the
    ``plan`` it already made). Returns the certificate's companion study and how many units
    this process claimed."""
    plan = plan or CertificatePlan(study, config)
    companion = replays.open_companion(config, study)
    objective = replays.ReplayObjective(config, study, data, tracker, parent_run_id, cores)
    base = plan.base.number if plan.base is not None else None
    claimed = 0
    while True:
        queued = replays.plan_units(config, study, companion, plan.queue_order, plan.plan, plan.horizon, base)
        claimed += replays.run_units(config, companion, objective, wait)
        if not wait or queued == 0:  # a unit that failed (out of retries) is queued again
            return companion, claimed


def confirm_safest(
    study: optuna.Study,
    config: Config,
    data: Callable[[], StudyData],
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    cores: Cores = ALONE,
) -> Safest | None:
    """Replay the top-K complete trials and the baseline (with any other worker of the study);
    return the safest record (or None).

    The study keeps every verdict (``safety``) and, with or without a safest, what the
    baseline did (``baseline``) and the comparison (``versus_baseline``). ``data`` is built
    only when a replay runs here: a finisher whose replays all ran elsewhere loads nothing."""
    plan = CertificatePlan(study, config)
    companion, _ = share_replays(config, study, data, tracker, parent_run_id, cores, wait=True, plan=plan)
    record = StudyRecord(study)
    record.record_certificate_steps(replays.replay_steps(companion))
    verdicts = []
    for trial in plan.candidates:
        if trial.number in plan.kept:
            log.info(
                "trial %d: its verdict from before is kept (%s)", trial.number, plan.kept[trial.number]["why"]
            )
            verdicts.append(plan.kept[trial.number])
            continue
        if trial.state != optuna.trial.TrialState.COMPLETE:
            verdicts.append(_unfinished(trial))
            continue
        results = replays.results_of(companion, trial.number, plan.horizon)
        failed = any(r["outcome"] != "complete" for r in results)
        if trial.number not in {t.number for t in plan.to_replay} or (
            not failed and len(results) < len(plan.plan)
        ):
            # best-first: a worse candidate that passed would not be chosen (the baseline is
            # still replayed, for the comparison)
            log.info("trial %d: not replayed, a better candidate passed first", trial.number)
            continue
        verdicts.append(_verdict(trial, params_from_trial(trial), plan.plan, results, plan.horizon))
    baseline = next((v for v in verdicts if plan.base is not None and v["trial"] == plan.base.number), None)
    safe = [v for v in verdicts if v["safe"]]
    best, because = choose(safe, record.edges) if safe else (None, "")
    if because:
        log.info("%s", because)
    versus = compare_with_baseline(best, baseline)
    record.record_verdicts(verdicts, baseline, versus)
    if best is None:
        record.record_safest(None)
        return None
    safest = Safest(
        study=study.study_name,
        trial=best["trial"],
        quality=best["quality"],
        qualities=best.get("qualities") or [best["quality"]],
        chosen_because=because,
        params=best["params"],
        settings=apply(config, best["params"]).model_dump(mode="json"),
        certificate=certificate(best["replays"], plan.horizon),
        spikiness=best["spikiness"],
        replays=best["replays"],
        candidates=len(verdicts),
        safe_candidates=len(safe),
        baseline=baseline,
        versus_baseline=versus,
        lowest_failing_lr=lowest_failing_lr(study, best["params"]["lr"]),
    )
    record.record_safest(safest)
    return safest


def lowest_failing_lr(study: optuna.Study, lr: float) -> dict[str, Any] | None:
    """Where the margin ends, as far as the study saw: the lowest learning rate above ``lr``
    at which a trial went NaN or diverged."""
    failed = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("outcome") in BROKE and t.params.get("lr", 0) > lr
    ]
    if not failed:
        return None
    first = min(failed, key=lambda t: t.params["lr"])
    return {
        "lr": first.params["lr"],
        "trial": first.number,
        "outcome": first.user_attrs["outcome"],
        "cause": first.user_attrs.get("cause"),
    }
