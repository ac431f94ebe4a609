"""The certificate's stress replays as shared work (docs/design.md, "Replays as shared work").

Once the search has ended, each replay of each candidate (safest.py) is one *unit*: a trial of a
companion Optuna study, ``<study>:certificate``, in the same storage, enqueued with the replay's
candidate, seed, lr factor and horizon as user attributes. Any worker of the study claims the
next unit the way it claims an enqueued trial: Optuna moves it WAITING -> RUNNING under a row
lock, so one worker gets it. Heartbeats do the rest, as for the search's trials: a worker that
dies mid-replay stops beating, the next worker that looks fails the unit, ends its MLflow run
KILLED and queues it again (storage.py). The finisher of the study waits for every unit, then
reads the verdicts back in the candidates' order, exactly as one worker would have reached them.

The early stops of the certificate hold across workers: a unit is *cancelled* (PRUNED, with the
reason) when its candidate already failed a replay, or, unless it is the baseline or
``search.certify_all`` is set, when a better candidate passed all of its replays; a replay
already training checks again every ``CANCEL_CHECK_S`` seconds. Units are claimed in the order
they were queued (the best candidate's and the baseline's first, safest.CertificatePlan), each
candidate's likeliest failure first: one worker runs the same replays as the certificate did
before it was shared.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import optuna
from pydantic import NonNegativeInt, PositiveFloat

from stylepipe.config import Config
from stylepipe.errors import failure_text
from stylepipe.records import Record, RecordError
from stylepipe.search.candidate import run_candidate
from stylepipe.search.space import apply, params_from_trial
from stylepipe.search.storage import Lock, fail_dead_trials, open_storage, study_lock
from stylepipe.search.study import claim_units
from stylepipe.search.study_data import StudyData
from stylepipe.search.worker_id import worker_id
from stylepipe.threads import ALONE, Cores
from stylepipe.tracking import Tracker
from stylepipe.train.callbacks import NoLongerNeeded, StopWhenUnneeded

log = logging.getLogger(__name__)


class ReplayResult(Record):
    """What became of one replay, as its worker recorded it on its unit (``result``). A unit is
    read back from a shared store: one without a result stylepipe wrote has not run."""

    seed: int
    lr_factor: PositiveFloat
    outcome: Literal["complete", "nan", "diverged"]
    cause: str | None = None
    step: NonNegativeInt | None = None  # where it broke
    quality: float | None = None  # at its horizon
    # at a trial's length: comparable with the candidate's own trial, another seed's quality
    trial_quality: float | None = None
    spikiness: float | None = None


def unit_result(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """A finished unit's result, or None when it holds none that stylepipe wrote."""
    try:
        return ReplayResult.from_json(attrs.get("result"), "a certificate unit's result").to_json()
    except RecordError:
        return None


UNIT_KEYS = ("candidate", "seed", "lr_factor", "horizon", "order", "quality", "baseline", "replays")


def _ran(companion: optuna.Study, horizon: int) -> list[dict[str, Any]]:
    """The attributes of the units that ran to their end at ``horizon``, each with its result;
    a unit missing what stylepipe writes on it is left out (``plan_units`` queues it again)."""
    ran = []
    for t in companion.get_trials(deepcopy=False, states=(_STATE.COMPLETE,)):
        attrs, result = t.user_attrs, unit_result(t.user_attrs)
        if result is not None and all(k in attrs for k in UNIT_KEYS) and attrs["horizon"] == horizon:
            ran.append({**attrs, "result": result})
    return ran


def seed_qualities(trial_quality: float | None, results: list[dict[str, Any]]) -> list[float]:
    """A candidate's quality over the seeds it ran at its own lr, at a trial's length: its trial's
    first, then each seed replay's that reached it."""
    replayed = [
        r["trial_quality"] for r in results if r["lr_factor"] == 1.0 and r.get("trial_quality") is not None
    ]
    return ([trial_quality] if trial_quality is not None else []) + replayed


COMPANION_SUFFIX = ":certificate"
CANCEL_CHECK_S = 2.0  # how often a replay in training asks whether it is still needed (one read)
_STATE = optuna.trial.TrialState


def companion_name(study_name: str) -> str:
    return f"{study_name}{COMPANION_SUFFIX}"


def open_companion(config: Config, study: optuna.Study) -> optuna.Study:
    """The study's certificate companion, in the study's storage (created on first use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.create_study(
            study_name=companion_name(study.study_name),
            storage=open_storage(config),
            sampler=optuna.samplers.RandomSampler(seed=0),  # never asked: units carry no parameters
            direction="minimize",
            load_if_exists=True,
        )


def unit_key(attrs: dict[str, Any]) -> tuple:
    return (attrs["candidate"], attrs["seed"], float(attrs["lr_factor"]), attrs["horizon"])


def plan_units(
    config: Config,
    study: optuna.Study,
    companion: optuna.Study,
    candidates: list[optuna.trial.FrozenTrial],
    plan: list[dict[str, Any]],
    horizon: int,
    baseline: int | None,
) -> int:
    """Queue each candidate's replays that the companion does not hold yet, in ``candidates``'
    order; returns how many were queued. Idempotent, under the study's ``certificate`` lock: every worker
    may call it once the search has ended. A unit that failed (its worker raised, or it ran out of
    retries) is queued again; one cancelled is queued again only under ``search.certify_all``."""
    with study_lock(config, Lock.CERTIFICATE):
        held = {
            unit_key(t.user_attrs)
            for t in companion.get_trials(deepcopy=False)
            if all(k in t.user_attrs for k in UNIT_KEYS)
            and (
                t.state in (_STATE.WAITING, _STATE.RUNNING)
                or (t.state == _STATE.COMPLETE and unit_result(t.user_attrs) is not None)
                or (t.state == _STATE.PRUNED and not config.search.certify_all)
            )
        }
        queued = 0
        for trial in candidates:
            if trial.state != _STATE.COMPLETE:
                continue  # the baseline may not have finished its trial: nothing to replay
            for order, stress in enumerate(plan):
                attrs = {
                    "candidate": trial.number,
                    "quality": trial.value,
                    "baseline": trial.number == baseline,
                    "order": order,
                    "replays": len(plan),
                    "seed": stress["seed"],
                    "lr_factor": stress["lr_factor"],
                    "horizon": horizon,
                }
                if unit_key(attrs) not in held:
                    companion.enqueue_trial({}, user_attrs=attrs)
                    queued += 1
        return queued


def results_of(companion: optuna.Study, candidate: int, horizon: int) -> list[dict[str, Any]]:
    """The replays of ``candidate`` that ran to their end, in plan order."""
    done = [a for a in _ran(companion, horizon) if a["candidate"] == candidate]
    return [a["result"] for a in sorted(done, key=lambda a: a["order"])]


def failed_replay(companion: optuna.Study, candidate: int, horizon: int) -> str | None:
    """How ``candidate`` failed a replay that ran to its end, if one did."""
    for attrs in _ran(companion, horizon):
        if attrs["candidate"] == candidate and attrs["result"]["outcome"] != "complete":
            return f"trial {candidate} already failed its replay with seed {attrs['seed']}"
    return None


def cancelled_because(companion: optuna.Study, unit: dict[str, Any], certify_all: bool) -> str | None:
    """Why ``unit`` is no longer needed, if it is not: its candidate already failed a replay, or a
    better candidate passed all of its replays and the unit's candidate is not within that one's
    spread of quality over seeds (it could not win on median; the baseline is replayed whatever
    passed)."""
    if certify_all:
        return None
    failed = failed_replay(companion, unit["candidate"], unit["horizon"])
    if failed:
        return failed
    ran = _ran(companion, unit["horizon"])
    if unit["baseline"]:
        return None
    passed: dict[tuple[float, int], list[dict]] = {}  # (quality, candidate) -> its replays that passed
    for attrs in ran:
        if attrs["result"]["outcome"] == "complete" and attrs["quality"] < unit["quality"]:
            passed.setdefault((attrs["quality"], attrs["candidate"]), []).append(attrs["result"])
    for (quality, candidate), results in sorted(passed.items()):
        if len(results) < unit["replays"]:
            continue
        top = max(seed_qualities(quality, results))
        if unit["quality"] > top:
            return f"trial {candidate}, a better candidate, passed first (its seeds reached up to {top:.4g})"
    return None


class ReplayObjective:
    """Optuna objective of the companion study: train one claimed unit, or cancel it.

    Its MLflow run is a replay run (name, role ``replay``, nested under the study's parent run),
    tagged with the worker that ran it."""

    def __init__(
        self,
        config: Config,
        study: optuna.Study,
        data: Callable[[], StudyData],
        tracker: Tracker | None,
        parent_run_id: str | None,
        cores: Cores = ALONE,
    ):
        self.config, self.study, self.data = config, study, data
        self.tracker, self.parent_run_id, self.cores = tracker, parent_run_id, cores

    def __call__(self, unit_trial: optuna.Trial) -> float:
        unit = unit_trial.user_attrs
        self.cores.set_threads()
        unit_trial.set_user_attr("worker", worker_id())
        trial = self.study.get_trials(deepcopy=False)[unit["candidate"]]
        params = params_from_trial(trial)
        stress = {"seed": unit["seed"], "lr_factor": unit["lr_factor"]}
        replay_config = apply(
            self.config,
            {**params, "lr": params["lr"] * stress["lr_factor"]},
            **{"train.seed": stress["seed"], "train.steps": unit["horizon"]},
        )
        logger = None
        if self.tracker is not None:
            logger = self.tracker.child_run(
                self.parent_run_id,
                f"replay trial {trial.number} seed {stress['seed']} lr x{stress['lr_factor']:g}",
                "replay",
                {**params, **stress, "steps": unit["horizon"]},
                {"trial": trial.number, "stylepipe.worker": worker_id()},
                self.config.tracking.log_every,
            )
            unit_trial.set_user_attr("mlflow_run_id", logger.run_id)  # a dead worker's run ends KILLED
        certify_all = self.config.search.certify_all
        watch = StopWhenUnneeded(
            lambda: cancelled_because(unit_trial.study, unit, certify_all), CANCEL_CHECK_S
        )
        callbacks = [*([logger] if logger else []), watch]
        try:
            # quality at a trial's length too: another seed's, comparable with the trial's own
            run = run_candidate(replay_config, self.data(), callbacks, eval_every=self.config.train.steps)
        except NoLongerNeeded as cancelled:
            log.info(
                "replay of trial %d seed %d: cancelled in training, %s",
                trial.number,
                stress["seed"],
                cancelled,
            )
            unit_trial.set_user_attr("cancelled", str(cancelled))
            unit_trial.set_user_attr("steps_trained", cancelled.step)
            if logger is not None:
                self.tracker.finish_run(
                    logger.run_id, "cancelled", logger=logger, failure=str(cancelled), status="KILLED"
                )
            raise optuna.TrialPruned(str(cancelled)) from None
        except BaseException as err:  # Ctrl-C too: the replay's run says why it stopped
            if logger is not None:
                self.tracker.finish_run(logger.run_id, "failed", logger=logger, failure=failure_text(err))
            raise
        cause = run.autopsy.cause if run.autopsy else None
        if logger is not None:
            metrics = {"final/quality": run.quality} if run.quality is not None else {}
            self.tracker.finish_run(logger.run_id, run.outcome, cause, run.autopsy, metrics, logger=logger)
        step = run.autopsy.step if run.autopsy else None
        result = ReplayResult(
            **stress,
            outcome=run.outcome,
            cause=cause,
            step=step,
            quality=run.quality,
            trial_quality=run.quality_at(self.config.train.steps),
            spikiness=run.spikiness if math.isfinite(run.spikiness) else None,
        )
        unit_trial.set_user_attr("result", result.to_json())
        return float(unit["horizon"] if step is None else step)  # the steps it trained


class _UnlessCancelled:
    """A claimed unit no longer needed is cancelled (PRUNED, with why), not run."""

    def __init__(self, objective: Callable[[optuna.Trial], float], certify_all: bool):
        self.objective, self.certify_all = objective, certify_all

    def __call__(self, unit_trial: optuna.Trial) -> float:
        unit = unit_trial.user_attrs
        why = cancelled_because(unit_trial.study, unit, self.certify_all)
        if why:
            log.info("replay of trial %d seed %d: cancelled, %s", unit["candidate"], unit["seed"], why)
            unit_trial.set_user_attr("cancelled", why)
            raise optuna.TrialPruned(why)
        return self.objective(unit_trial)


def run_units(
    config: Config,
    companion: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    wait: bool,
) -> int:
    """Claim and run the companion's queued units until none is left; with ``wait``, also wait
    for those running elsewhere (failing any whose heartbeats stopped, then running their
    retries here). Returns how many units this process claimed. A replay that raises stops
    this worker, as a trial does: its unit is failed and queued again by the next plan."""

    gate = study_lock(config, Lock.REPLAYS)
    objective = _UnlessCancelled(objective, config.search.certify_all)
    pause = min(5, config.search.heartbeat_interval)
    return claim_units(companion, objective, gate, wait, lambda: fail_dead_trials(config, companion), pause)


def replay_steps(companion: optuna.Study) -> int:
    """What the replays cost, cancelled ones included: each unit's steps to its end or its cancel."""
    total = 0
    for t in companion.get_trials(deepcopy=False, states=(_STATE.COMPLETE, _STATE.PRUNED)):
        if t.state == _STATE.COMPLETE and t.value is not None:
            total += int(t.value)
        else:
            total += int(t.user_attrs.get("steps_trained", 0))
    return total
