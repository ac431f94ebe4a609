"""The speculative final: the best candidate's final model trained while its certificate runs
(docs/design.md, "The speculative final").

With several workers, the final model need not wait for the certificate. As soon as the search
has ended, the best complete trial's final run is queued as one unit of work, a trial of a
companion study ``<study>:final`` in the study's storage, claimed the way a replay is (Optuna
moves it WAITING -> RUNNING under a row lock, so one worker gets it) and queued before the
replays, so the first worker to reach the certificate takes it and the others the replays.

It is the final run the study would have started (final.py: the same fingerprint, folder and
MLflow run), trained to its last step and left ``trained``: its model is written only once the
certificate has passed, by whoever finishes the study, with the certified record. Every
``CHECK_S`` seconds it asks whether it is still wanted; it is not once its candidate failed a
replay, or once the study's verdict names another configuration (or none). Then it stops, its
MLflow run ended KILLED with the reason, never registered, and the certified safest's final
starts as it would have without speculation. Nothing is registered or promoted before the
certificate has passed.

A worker that dies mid-final stops beating; the next worker that looks (the finisher waits for
the unit) fails it and Optuna queues it again, keeping its attributes; whoever claims it resumes
the same MLflow run from its mirrored checkpoint (the unit holds no MLflow run id, so the
heartbeat callback does not end that run as it ends a dead replay's).
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import optuna

from stylepipe.config import Config
from stylepipe.final import FinalRunHalted, FinalTraining
from stylepipe.search import replays
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.safest import CertificatePlan, confirm_horizon
from stylepipe.search.space import params_from_trial
from stylepipe.search.storage import Lock, fail_dead_trials, open_storage, study_lock
from stylepipe.search.study import claim_units
from stylepipe.search.worker_id import worker_id
from stylepipe.threads import ALONE, Cores
from stylepipe.train.callbacks import NoLongerNeeded

if TYPE_CHECKING:
    from stylepipe.session import StudySession

log = logging.getLogger(__name__)

SUFFIX = ":final"
CHECK_S = 2.0  # how often a final in training asks whether it is still wanted (two reads)
_STATE = optuna.trial.TrialState


def enabled(config: Config) -> bool:
    """Whether this study trains its best candidate's final ahead of the certificate:
    ``final.speculative``, by default when several workers share the study. It needs the final
    run's checkpoints mirrored to its MLflow run, so that the finisher on another machine can
    finish it."""
    if not (config.final.train and config.final.mirror_checkpoints):
        return False
    wanted = config.final.speculative
    return config.search.workers > 1 if wanted is None else wanted


def open_units(config: Config, study: optuna.Study) -> optuna.Study:
    """The study's speculative-final companion, in the study's storage (created on first use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.create_study(
            study_name=f"{study.study_name}{SUFFIX}",
            storage=open_storage(config),
            sampler=optuna.samplers.RandomSampler(seed=0),  # never asked: units carry no parameters
            direction="minimize",
            load_if_exists=True,
        )


def queue(config: Config, study: optuna.Study, plan: CertificatePlan) -> int | None:
    """Queue the best candidate's final (once per study and candidate, under the study's
    ``final ahead`` lock); the candidate's trial number, or None when there is none to train:
    no complete trial, or its verdict is known already."""
    best = plan.candidates[0] if plan.candidates else None
    if best is None or best.state != _STATE.COMPLETE:
        return None
    if best.number in plan.kept:  # certified before (the study then grew): no speculation left
        return None
    units = open_units(config, study)
    with study_lock(config, Lock.FINAL_AHEAD):
        if not any(t.user_attrs.get("candidate") == best.number for t in units.get_trials(deepcopy=False)):
            units.enqueue_trial({}, user_attrs={"candidate": best.number, "quality": best.value})
            log.info(
                "the final model of trial %d (the best) is queued to train ahead of its certificate",
                best.number,
            )
    return best.number


def why_unwanted(config: Config, study: optuna.Study, candidate: int) -> str | None:
    """Why the final of ``candidate`` is no longer wanted, if it is not: the study's verdict names
    another configuration, or none, or the candidate already failed a replay."""
    record = StudyRecord(study)
    answered, safest = record.safest_for(record.counted)
    if answered and safest is not None and safest.trial == candidate:
        return None
    companion = replays.open_companion(config, study)
    failed = replays.failed_replay(companion, candidate, confirm_horizon(config))
    if failed or not answered:
        return failed
    return (
        "nothing was certified safe" if safest is None else f"trial {safest.trial} was certified the safest"
    )


class FinalAhead:
    """Optuna objective of the companion: train a claimed unit's final ahead, or stop it."""

    def __init__(self, config: Config, session: StudySession, cores: Cores = ALONE):
        self.config, self.session, self.cores = config, session, cores

    def __call__(self, unit_trial: optuna.Trial) -> float:
        study = self.session.study
        candidate = unit_trial.user_attrs["candidate"]
        trial = study.get_trials(deepcopy=False)[candidate]
        training = FinalTraining(self.config, candidate, params_from_trial(trial), self.session)
        why = why_unwanted(self.config, study, candidate)
        if why:  # before it started, or after its worker died
            training.stop_recorded(why)
            unit_trial.set_user_attr("stopped", why)
            raise optuna.TrialPruned(why)
        unit_trial.set_user_attr("worker", worker_id())
        self.cores.set_threads()
        try:
            state = training.train_ahead(lambda: why_unwanted(self.config, study, candidate), CHECK_S)
        except NoLongerNeeded as stopped:
            unit_trial.set_user_attr("stopped", str(stopped))
            unit_trial.set_user_attr("steps_trained", stopped.step)
            raise optuna.TrialPruned(str(stopped)) from None
        except FinalRunHalted as halted:  # an answer: the finisher reports it, if it is wanted
            unit_trial.set_user_attr("halted", str(halted)[:2000])
            state = "halted"
        unit_trial.set_user_attr("state", state)
        return float(training.final_config.train.steps)


def run_units(config: Config, session: StudySession, cores: Cores = ALONE, wait: bool = False) -> int:
    """Claim and run the queued speculative finals; with ``wait``, also wait for those running
    elsewhere (failing any whose heartbeats stopped, then running their retries here). Returns
    how many this process claimed."""
    units = open_units(config, session.study)
    gate = study_lock(config, Lock.FINAL_AHEAD)
    pause = min(CHECK_S, config.search.heartbeat_interval)
    return claim_units(
        units, FinalAhead(config, session, cores), gate, wait, lambda: fail_dead_trials(config, units), pause
    )


def stop_unwanted(config: Config, session: StudySession, safest: Any, cores: Cores = ALONE) -> int:
    """Once the study's verdict is recorded (``safest``, a Safest or None): a final trained ahead
    for any other candidate is stopped: by its worker at its next check; here when it never
    started, its worker died, or it was trained to its end already. The one the verdict wants
    goes on (``train_final`` waits for it). Returns how many units this process claimed."""
    units = open_units(config, session.study)
    wanted = safest.trial if safest is not None else None
    trials = units.get_trials(deepcopy=False)
    for unit in trials:
        candidate = unit.user_attrs.get("candidate")
        if (
            unit.state == _STATE.COMPLETE
            and unit.user_attrs.get("state") == "trained"
            and candidate != wanted
        ):
            trial = session.study.get_trials(deepcopy=False)[candidate]
            training = FinalTraining(config, candidate, params_from_trial(trial), session)
            training.stop_recorded(why_unwanted(config, session.study, candidate) or "not certified")
    live = [t for t in trials if t.state in (_STATE.WAITING, _STATE.RUNNING)]
    if all(t.user_attrs.get("candidate") == wanted for t in live):
        return 0
    return run_units(config, session, cores, wait=True)


def stopped_steps(config: Config, study: optuna.Study) -> int:
    """The steps trained by speculative finals that were then stopped: a study's cost counts them
    with its final model's."""
    if not enabled(config):
        return 0
    try:  # read only: a study reported again is not written to, its companion not created
        units = optuna.load_study(study_name=f"{study.study_name}{SUFFIX}", storage=open_storage(config))
    except KeyError:
        return 0
    wanted = StudyRecord(study).safest_for(StudyRecord(study).counted)[1]
    steps = 0
    for unit in units.get_trials(deepcopy=False):
        if unit.state == _STATE.PRUNED:
            steps += int(unit.user_attrs.get("steps_trained", 0))
        elif unit.state == _STATE.COMPLETE and (
            wanted is None or unit.user_attrs["candidate"] != wanted.trial
        ):
            steps += int(unit.value or 0)
    return steps
