"""The safest configuration: the top-K trials replayed under stress (docs/design.md, 'Safest configuration').

Each candidate is replayed with ``replay_seeds`` more seeds and once with its learning
rate multiplied by ``lr_margin``. It is *safe* when every replay stays finite and does
not diverge. The safest is the best quality among the safe ones; ties go to the lower
gradient-norm spikiness. If none is safe there is no safest configuration.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna

from stylepipe.search.objective import StudyData, failure_text, run_candidate
from stylepipe.search.space import apply, params_from_trial
from stylepipe.tracking import Tracker

log = logging.getLogger(__name__)


def replay_plan(seed: int, replay_seeds: int, lr_margin: float) -> list[dict[str, Any]]:
    """The stress replays of one candidate: more seeds at its own lr, then lr x margin."""
    plan = [{"seed": seed + i, "lr_factor": 1.0} for i in range(1, replay_seeds + 1)]
    if lr_margin > 1.0:
        plan.append({"seed": seed, "lr_factor": lr_margin})
    return plan


def confirm_safest(
    study: optuna.Study, data: StudyData, tracker: Tracker | None = None, parent_run_id: str | None = None
) -> dict[str, Any] | None:
    """Replay the top-K complete trials and return the safest record (or None)."""
    config = data.config
    search = config.search
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    candidates = sorted(complete, key=lambda t: t.value)[: search.top_k]
    plan = replay_plan(config.train.seed, search.replay_seeds, search.lr_margin)
    verdicts = []
    for trial in candidates:
        params = params_from_trial(trial)
        replays = []
        for stress in plan:
            replay_config = apply(
                config, {**params, "lr": params["lr"] * stress["lr_factor"]}, **{"train.seed": stress["seed"]}
            )
            logger = run_id = None
            if tracker is not None:
                name = f"replay trial {trial.number} seed {stress['seed']} lr x{stress['lr_factor']:g}"
                logger = tracker.child_run(parent_run_id, name, "replay", {**params, **stress},
                                           {"trial": trial.number}, config.tracking.log_every)  # fmt: skip
                run_id = logger.run_id
            try:
                run = run_candidate(replay_config, data, [logger] if logger else [])
            except BaseException as err:  # Ctrl-C too: the replay's run says why it stopped
                if tracker is not None:
                    tracker.finish_run(run_id, "failed", logger=logger, failure=failure_text(err))
                raise
            if tracker is not None:
                metrics = {"final/quality": run.quality} if run.quality is not None else {}
                cause = run.autopsy.cause if run.autopsy else None
                tracker.finish_run(run_id, run.outcome, cause, run.autopsy, metrics, logger=logger)
            replays.append({
                **stress,
                "outcome": run.outcome,
                "cause": run.autopsy.cause if run.autopsy else None,
                "step": run.autopsy.step if run.autopsy else None,
                "quality": run.quality,
                "spikiness": run.spikiness if math.isfinite(run.spikiness) else None,
            })  # fmt: skip
        safe = all(r["outcome"] == "complete" for r in replays)
        spikes = [r["spikiness"] for r in replays if r["spikiness"] is not None]
        verdicts.append({
            "trial": trial.number,
            "quality": trial.value,
            "params": params,
            "safe": safe,
            "spikiness": max(spikes) if spikes else None,
            "replays": replays,
        })  # fmt: skip
        log.info("trial %d: %s", trial.number, "safe" if safe else "NOT safe")

    study.set_user_attr("safety", verdicts)
    safe = [v for v in verdicts if v["safe"]]
    if not safe:
        study.set_user_attr("safest", None)
        return None
    best = min(safe, key=lambda v: (v["quality"], v["spikiness"] or math.inf))
    record = {
        "study": study.study_name,
        "trial": best["trial"],
        "quality": best["quality"],
        "params": best["params"],
        "settings": apply(config, best["params"]).model_dump(mode="json"),
        "seeds_passed": [r["seed"] for r in best["replays"] if r["lr_factor"] == 1.0] + [config.train.seed],
        "lr_margin_passed": search.lr_margin,
        "spikiness": best["spikiness"],
        "replays": best["replays"],
        "candidates": len(verdicts),
        "safe_candidates": len(safe),
    }
    study.set_user_attr("safest", record)
    return record
