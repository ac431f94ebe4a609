"""The safest configuration: the top-K trials, and the user's own settings (the baseline),
replayed under stress at the horizon that matters (docs/design.md, 'Safest configuration').

Each candidate is replayed once with its learning rate multiplied by ``search.lr_margin`` (the
likeliest failure, first) and with ``search.replay_seeds`` more seeds, each for
``confirm_horizon`` steps. It is *safe* when every replay stays finite and does not diverge;
its replays stop at the first that fails. Candidates are certified best-first by their trial's
quality, so the first that passes is the safest (ties go to the lower gradient-norm spikiness)
and worse candidates are not replayed; ``search.certify_all`` replays every candidate in full,
as before. If none is safe there is no safest configuration. The record states its
**certificate** (the seeds, the margin and the horizon it passed) and compares it with the
**baseline**, the settings of the user's own config file, which every study runs as its first
trial and which is always replayed.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna

from stylepipe.config import Config
from stylepipe.errors import failure_text
from stylepipe.records import Certificate, Safest
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.objective import StudyData, run_candidate
from stylepipe.search.space import apply, params_from_trial
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
    return next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")), None)


def _replay(config, data, trial, params, stress, horizon, tracker, parent_run_id) -> dict[str, Any]:
    replay_config = apply(
        config,
        {**params, "lr": params["lr"] * stress["lr_factor"]},
        **{"train.seed": stress["seed"], "train.steps": horizon},
    )
    logger = None
    if tracker is not None:
        name = f"replay trial {trial.number} seed {stress['seed']} lr x{stress['lr_factor']:g}"
        logger = tracker.child_run(
            parent_run_id,
            name,
            "replay",
            {**params, **stress, "steps": horizon},
            {"trial": trial.number},
            config.tracking.log_every,
        )
    try:
        run = run_candidate(replay_config, data, [logger] if logger else [])
    except BaseException as err:  # Ctrl-C too: the replay's run says why it stopped
        if logger is not None:
            tracker.finish_run(logger.run_id, "failed", logger=logger, failure=failure_text(err))
        raise
    if logger is not None:
        metrics = {"final/quality": run.quality} if run.quality is not None else {}
        tracker.finish_run(
            logger.run_id,
            run.outcome,
            run.autopsy.cause if run.autopsy else None,
            run.autopsy,
            metrics,
            logger=logger,
        )
    return {
        **stress,
        "outcome": run.outcome,
        "cause": run.autopsy.cause if run.autopsy else None,
        "step": run.autopsy.step if run.autopsy else None,
        "quality": run.quality,
        "spikiness": run.spikiness if math.isfinite(run.spikiness) else None,
    }


def _verdict(config, data, trial, plan, horizon, tracker, parent_run_id) -> dict[str, Any]:
    params = params_from_trial(trial)
    if trial.state != optuna.trial.TrialState.COMPLETE:  # the baseline may not have finished
        outcome = trial.user_attrs.get("outcome", trial.state.name.lower())
        return {
            "trial": trial.number,
            "quality": None,
            "params": params,
            "safe": False,
            "spikiness": None,
            "replays": [],
            "why": f"its trial ended {outcome} ({trial.user_attrs.get('cause') or 'no cause'})",
        }
    replays = []
    for stress in plan:
        replays.append(_replay(config, data, trial, params, stress, horizon, tracker, parent_run_id))
        if replays[-1]["outcome"] != "complete" and not config.search.certify_all:
            break  # it is not safe: the replays after this one cannot change that
    safe = all(r["outcome"] == "complete" for r in replays)
    spikes = [r["spikiness"] for r in replays if r["spikiness"] is not None]
    failed = [r for r in replays if r["outcome"] != "complete"]
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
        "quality": trial.value,
        "params": params,
        "safe": safe,
        "spikiness": max(spikes) if spikes else None,
        "replays": replays,
        "why": why,
    }


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
    safest = f"the safest configuration (trial {best['trial']}) reaches quality {best['quality']:.4g}"
    if baseline["quality"] is None:
        return f"{safest}; {mine} {verdict}"
    gain = (baseline["quality"] - best["quality"]) / abs(baseline["quality"]) if baseline["quality"] else 0.0
    return (
        f"{safest}, {gain:.0%} lower than the {baseline['quality']:.4g} of {mine} (lower is better); "
        f"yours {verdict}"
    )


def nothing_safe_because(verdicts: list[dict]) -> str:
    """Why a study has no safe configuration, as its verdicts tell it."""
    if not verdicts:
        return "no trial completed: there was nothing to replay"
    if not any(v["replays"] for v in verdicts):
        return f"no candidate completed its trial, so none was replayed ({verdicts[0]['why']})"
    return "no candidate stayed finite under every stress replay"


def confirm_safest(
    study: optuna.Study, data: StudyData, tracker: Tracker | None = None, parent_run_id: str | None = None
) -> Safest | None:
    """Replay the top-K complete trials and the baseline; return the safest record (or None).

    The study keeps every verdict (``safety``) and, with or without a safest, what the
    baseline did (``baseline``) and the comparison (``versus_baseline``)."""
    config = data.config
    search = config.search
    horizon = confirm_horizon(config)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    candidates = sorted(complete, key=lambda t: t.value)[: search.top_k]  # best-first
    base = baseline_trial(study)
    if base is not None and base.number not in [t.number for t in candidates]:
        candidates.append(base)  # last: it is replayed whatever passed before it
    plan = replay_plan(config.train.seed, search.replay_seeds, search.lr_margin)
    # A candidate replayed before (the study then grew) keeps its verdict: the same trial, plan
    # and horizon replay the same way, and the study's settings cannot change (study.py).
    record = StudyRecord(study)
    earlier = {
        v["trial"]: v for v in record.verdicts if v.get("plan") == plan and v.get("horizon") == horizon
    }
    verdicts = []
    passed: float | None = None  # the quality of the best candidate that passed
    for trial in candidates:
        is_baseline = base is not None and trial.number == base.number
        if not (is_baseline or search.certify_all) and passed is not None and trial.value > passed:
            # best-first: a worse candidate that passed would not be chosen (the baseline is
            # still replayed, for the comparison)
            log.info("trial %d: not replayed, a better candidate passed first", trial.number)
            continue
        if trial.number in earlier:
            log.info(
                "trial %d: its verdict from before is kept (%s)", trial.number, earlier[trial.number]["why"]
            )
            verdicts.append(earlier[trial.number])
        else:
            verdicts.append(
                {
                    **_verdict(config, data, trial, plan, horizon, tracker, parent_run_id),
                    "plan": plan,
                    "horizon": horizon,
                }
            )
            record.keep_verdict(verdicts[-1])
        if verdicts[-1]["safe"] and (passed is None or trial.value < passed):
            passed = trial.value
    baseline = next((v for v in verdicts if base is not None and v["trial"] == base.number), None)
    safe = [v for v in verdicts if v["safe"]]
    best = min(safe, key=lambda v: (v["quality"], v["spikiness"] or math.inf)) if safe else None
    versus = compare_with_baseline(best, baseline)
    record.record_verdicts(verdicts, baseline, versus)
    if best is None:
        record.record_safest(None)
        return None
    safest = Safest(
        study=study.study_name,
        trial=best["trial"],
        quality=best["quality"],
        params=best["params"],
        settings=apply(config, best["params"]).model_dump(mode="json"),
        certificate=certificate(best["replays"], horizon),
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
        if t.user_attrs.get("outcome") in ("nan", "diverged") and t.params.get("lr", 0) > lr
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
