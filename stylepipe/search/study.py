"""The Optuna study: open or resume it, run its trials (one worker or many), read it as a table."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from stylepipe.config import MOVED, Config
from stylepipe.data.sources import data_fingerprint
from stylepipe.errors import StylepipeError
from stylepipe.records import Safest
from stylepipe.search import space
from stylepipe.search.attributes import COUNTED, StudyRecord
from stylepipe.search.objective import Objective
from stylepipe.search.space import Parameter, baseline_params, params_from_trial, trial_values
from stylepipe.search.storage import (
    Lock,
    NoLock,
    StudyLock,
    StudyStore,
    fail_dead_trials,
    open_storage,
    sole_worker,
    study_lock,
)
from stylepipe.train.lifecycle import NOT_FINGERPRINTED

log = logging.getLogger(__name__)

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
# What counts towards search.n_trials: a failed trial (a crash, a killed worker) does not.


# What a study may be resumed with changed: where it runs and is recorded, how many trials it
# holds, how fast a machine computes, where its images are. Everything else decides its answer:
# a study answers for the settings it was created with, and other settings are refused
# (``check_settings``). The style image is in data.content's fingerprint by what it is: its path
# may change (a worker's copy fetched by hash, search/inputs.py).
STUDY_MAY_CHANGE = (
    "name",
    "run_dir",
    "data.style_image",
    "prepare.",
    "schedule.",
    "search.n_trials",
    "search.storage",
    "search.study_name",
    "search.heartbeat_interval",
    "search.grace_period",
    "search.max_retry",
    "search.workers_per_device",
    "search.workers",
    "search.certify_all",
    "search.val_batch_size",
    "tracking.uri",
    "tracking.experiment",
    "tracking.registered_model",
    "tracking.log_every",
    "final.mirror_checkpoints",
    "final.showcase_image",
    "final.showcase_size",
    "final.train",
    "final.speculative",
    *NOT_FINGERPRINTED,
)


class StudySettingsError(StylepipeError):
    """A study opened with settings other than those it was created with."""


def study_settings(config: Config) -> dict[str, Any]:
    """The settings a study answers for, flat (``search.space.lr``: [1e-4, 3]); ``data.content``
    is what the images are (their fingerprint), not where they are."""
    flat = _answering(config)
    data = config.data
    flat["data.content"] = data_fingerprint(data.content, data.style_image, data.image_size)
    return flat


def _answering(config: Config) -> dict[str, Any]:
    """Every setting, flat, but those a study may change."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif not may_change(prefix):
            flat[prefix] = value

    walk("", config.model_dump(mode="json"))
    return flat


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in STUDY_MAY_CHANGE)


def check_settings(study: optuna.Study, config: Config) -> None:
    """Record a new study's settings; refuse, naming the keys, to go on with other ones."""
    settings = study_settings(config)
    record = StudyRecord(study)
    recorded = record.settings
    if recorded is not None:  # a study recorded before some settings moved: their new names
        recorded = {MOVED.get(key, key): value for key, value in recorded.items()}
        # and before some of them were free to change (data.style_image): not compared
        recorded = {key: value for key, value in recorded.items() if not may_change(key)}
        # and before some were added: one at its default is what the study ran with
        defaults = _answering(Config())
        added = {
            k: v for k, v in settings.items() if k not in recorded and k in defaults and v == defaults[k]
        }
        recorded = {**recorded, **added}
    if recorded is None:
        if study.get_trials(deepcopy=False):
            log.warning(
                "study %s was made by an earlier stylepipe that did not record its settings: it now "
                "answers for these",
                study.study_name,
            )
        record.record_settings(settings)
        return
    if recorded != settings:

        def shown(value: Any) -> str:
            text = json.dumps(value)
            return text if len(text) <= 40 else text[:13] + '..."'

        keys = [k for k in sorted({*recorded, *settings}) if recorded.get(k) != settings.get(k)]
        differ = ", ".join(f"{k} ({shown(recorded.get(k))} -> {shown(settings.get(k))})" for k in keys)
        raise StudySettingsError(
            f"study {study.study_name} was made with other settings: {differ}. A study answers for the settings it "
            f"was made with: go back to them, or start a new study (--set search.study_name={study.study_name}-2)"
        )


def open_study(config: Config) -> optuna.Study:
    """Create the study, or load it when it exists (re-running resumes); other settings than
    those it was made with are refused (``StudySettingsError``)."""
    study = _create_or_load(config)
    check_settings(study, config)
    return study


def existing_study(config: Config) -> optuna.Study | None:
    """The study, when it exists, loaded without creating anything (no SQLite file, no study);
    None when it does not, or its storage cannot be opened (the command that uses it says why)."""
    if not StudyStore.of(config.storage_url).exists():
        return None
    try:
        return optuna.load_study(study_name=config.study_name, storage=open_storage(config))
    except (StylepipeError, KeyError):
        return None


def _create_or_load(config: Config) -> optuna.Study:
    search = config.search
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=config.study_name,
        storage=open_storage(config),
        sampler=trial_sampler(config, 0),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=search.pruner_startup_trials, n_warmup_steps=search.pruner_warmup_steps
        ),
        direction="minimize",
        load_if_exists=True,
    )


def trial_sampler(config: Config, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """TPE seeded for the next trial by ``search.seed`` and the number of trials the study holds.

    A sampler seeded once per process proposes the same first configurations again on every
    resume, and in every worker; seeded by the study's size it is reproducible and does not
    repeat itself (TPE keeps no other state: it reads the trials from the storage). The two
    are mixed, not added: with seed + size, the study of seed 1 proposed the configurations of
    the study of seed 0, one trial later.
    """
    seed = int(np.random.SeedSequence([config.search.seed, trials_so_far]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.search.startup_trials)


def trials_table(study: optuna.Study, safest: Safest | None = None, steps: int | None = None) -> pd.DataFrame:
    """One row per trial: state, outcome, cause, quality and the flat parameters."""
    verdicts = {v["trial"]: v["safe"] for v in StudyRecord(study).verdicts}
    rows = []
    for t in study.get_trials(deepcopy=False):
        params = params_from_trial(t)
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "outcome": t.user_attrs.get("outcome", t.state.name.lower()),
                "cause": t.user_attrs.get("cause"),
                "value": t.value if t.value is not None else float("nan"),
                **{p.name: _cell(params.get(p.name), p) for p in space.PARAMETERS},
                "nan_step": t.user_attrs.get("nan_step", float("nan")),
                "steps": steps_trained(t, steps),
                "first_nonfinite": t.user_attrs.get("first_nonfinite"),
                "duration_s": t.duration.total_seconds() if t.duration else float("nan"),
                "safe": verdicts.get(t.number),
                "is_safest": safest is not None and safest.trial == t.number,
                "is_baseline": bool(t.user_attrs.get("baseline")),
            }
        )
    return pd.DataFrame(rows)


def steps_trained(trial: optuna.trial.FrozenTrial, steps: int | None) -> float:
    """How many steps a trial trained: to its halt, to the last report before the pruner
    stopped it, or all ``steps`` (``train.steps``) when it completed; NaN when not known."""
    if "nan_step" in trial.user_attrs:
        return float(trial.user_attrs["nan_step"])
    if trial.state == optuna.trial.TrialState.COMPLETE and steps is not None:
        return float(steps)
    if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
        return float(max(trial.intermediate_values))
    return float("nan")


def _cell(value: Any, parameter: Parameter) -> Any:
    """A parameter's table cell: a number column holds NaN where the parameter is off or unset."""
    return float("nan") if value is None and parameter.scale != "choice" else value


class StudyProgress:
    """Optuna callback driving a rich progress bar: trials done, pruned by cause, best quality."""

    def __init__(self, study: optuna.Study, total: int, enabled: bool = True):
        self.total = total
        self.progress = Progress(
            TextColumn("[bold]search"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} trials"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            disable=not enabled,
        )
        self.task = self.progress.add_task("search", total=total, status="")
        self._update(study)

    def _update(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False, states=FINISHED)
        causes = Counter(
            t.user_attrs.get("cause") or t.user_attrs.get("outcome", "?")
            for t in trials
            if t.state != optuna.trial.TrialState.COMPLETE
        )
        complete = [t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = f"best {min(complete):.4g}" if complete else "no complete trial yet"
        stopped = ", ".join(f"{c} {n}" for c, n in causes.most_common()) or "none"
        counted = sum(t.state in COUNTED for t in trials)
        self.progress.update(
            self.task, completed=min(counted, self.total), status=f"stopped: {stopped} | {best}"
        )

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._update(study)


def warm_start(study: optuna.Study, params: dict[str, Any]) -> None:
    """Enqueue a known configuration (e.g. the previous safest) as the next trial."""
    study.enqueue_trial(trial_values(params), user_attrs={"warm_start": True}, skip_if_exists=True)


def enqueue_first_trials(study: optuna.Study, config: Config, warm_start_params: dict | None = None) -> None:
    """A new study's first trial is the user's own settings (the baseline); a warm start's
    configuration comes next. Under the study's lock: workers that open an empty study at the
    same instant would each see it empty and each enqueue the baseline."""
    with study_lock(config, Lock.ASK):
        if not study.get_trials(deepcopy=False):
            study.enqueue_trial(
                trial_values(baseline_params(config)), user_attrs={"baseline": True}, skip_if_exists=True
            )
        if warm_start_params:
            warm_start(study, warm_start_params)


class ReleaseGateThenRun:
    """Objective wrapper: the trial exists once it runs, so the start gate can open."""

    def __init__(self, objective: Callable[[optuna.Trial], float], gate: StudyLock | NoLock):
        self.objective = objective
        self.gate = gate

    def __call__(self, trial: optuna.Trial) -> float:
        self.gate.release()
        return self.objective(trial)


def claim_units(
    units: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    gate: StudyLock | NoLock,
    wait: bool,
    fail_dead: Callable[[], None],
    pause_s: float,
) -> int:
    """Claim and run a companion study's queued units (its WAITING trials: Optuna hands each to
    one worker) until none is left; with ``wait``, also wait for those running elsewhere,
    ``fail_dead`` first failing any whose worker died so that their retries run here. ``gate``
    makes a look for a waiting unit and its claim one step. Returns how many were claimed."""
    claim = ReleaseGateThenRun(objective, gate)
    claimed, said = 0, 0
    while True:
        gate.acquire()
        try:
            fail_dead()
            states = [t.state for t in units.get_trials(deepcopy=False)]
            if optuna.trial.TrialState.WAITING in states:
                units.optimize(claim, n_trials=1, catch=())  # the gate opens once it runs
                claimed, said = claimed + 1, 0
                continue
            if not (wait and optuna.trial.TrialState.RUNNING in states):
                return claimed
            said = _say_waiting(states.count(optuna.trial.TrialState.RUNNING), said, units.study_name)
            gate.release()
            time.sleep(pause_s)
        finally:
            gate.release()


def _say_waiting(running: int, said: int, what: str) -> int:
    """One line when this worker starts waiting for ``running`` trials of ``what`` that run
    elsewhere (or their number changes), not one per look: else it waits without a word."""
    if running != said:
        log.info(
            "waiting for %d running elsewhere in %s (one whose worker stopped runs again here "
            "after search.grace_period seconds without a heartbeat)",
            running,
            what,
        )
    return running


@contextlib.contextmanager
def frozen_heap():
    """Inside: what is loaded so far (torch, MLflow, Optuna, the study's data) is out of the
    garbage collector's view. Otherwise each full collection walks those millions of
    long-lived objects in the middle of some trial, while the GPU waits for its next kernels.
    No collection first (it walks them all once more, each time a search starts): garbage
    frozen with them is collected after they are handed back on the way out (a caller that
    drops the session may leave reference cycles among them)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_trials(
    config: Config,
    study: optuna.Study,
    objective: Objective,
    progress: bool = True,
    warm_start_params: dict | None = None,
) -> int:
    """Run trials until the study holds ``search.n_trials`` complete or pruned ones.

    Safe for many workers on one PostgreSQL study: counting and starting a trial happen
    under one advisory lock, so the study ends with exactly n_trials finished trials;
    a worker whose peers still run the last trials waits, failing any whose heartbeats
    stopped (their retries are queued and picked up here). Returns the trials run here.
    """
    target = config.search.n_trials
    enqueue_first_trials(study, config, warm_start_params)
    gate = study_lock(config, Lock.ASK)
    objective = ReleaseGateThenRun(objective, gate)
    bar = StudyProgress(study, target, enabled=progress)
    ran, said = 0, 0
    with sole_worker(config), bar.progress, frozen_heap():
        while True:
            gate.acquire()
            try:
                fail_dead_trials(config, study)
                # One read for both counts: with two, a peer's trial that finishes between them
                # is neither done nor running, and one trial too many starts.
                trials = study.get_trials(deepcopy=False)
                done = sum(t.state in COUNTED for t in trials)
                running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
                if done >= target:
                    break
                if done + running >= target:  # the last trials are running elsewhere
                    said = _say_waiting(running, said, study.study_name)
                    gate.release()
                    time.sleep(min(5, config.search.heartbeat_interval))
                    continue
                study.sampler = trial_sampler(config, len(trials))
                study.optimize(objective, n_trials=1, callbacks=[bar], catch=(Exception,))
                fatal = getattr(objective.objective, "fatal", None)  # this worker must stop
                if fatal is not None:
                    raise fatal
                ran, said = ran + 1, 0
            finally:
                gate.release()
    return ran
