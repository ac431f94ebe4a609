"""The certificate's replays as shared work (search/replays.py): each unit is claimed by one
worker, a unit whose worker died is run again by another, and a unit no longer needed is
cancelled. The units' own work is stood in for (a short sleep), so what is checked is who ran
what, how often."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import uuid

import optuna
import pytest
from optuna.storages._heartbeat import NullHeartbeatThread

from stylepipe.config import load_config
from stylepipe.search import replays
from stylepipe.search.replays import cancelled_because, open_companion, plan_units, run_units
from stylepipe.search.storage import SqliteStore
from tests.helpers import DEMO, ends_within, needs_postgres, study_of

PLAN = [{"seed": 0, "lr_factor": 2.0}, {"seed": 1, "lr_factor": 1.0}, {"seed": 2, "lr_factor": 1.0}]


def settings(storage: str, study: str, tmp_path):
    return load_config(
        DEMO,
        [f"run_dir={tmp_path}", f"search.storage={storage}", f"search.study_name={study}",
         "search.heartbeat_interval=1", "search.grace_period=3", "search.max_retry=3"],
    )  # fmt: skip


def queued_study(config, trials) -> tuple[optuna.Study, optuna.Study]:
    """A study of complete trials (in its storage) and its companion with every unit queued."""
    storage = replays.open_storage(config)
    study = optuna.create_study(study_name=config.study_name, storage=storage)
    for trial in study_of(*trials).trials:
        study.add_trial(trial)
    companion = open_companion(config, study)
    frozen = sorted(study.trials, key=lambda t: t.value)
    base = next(t.number for t in study.trials if t.user_attrs["baseline"])
    plan_units(config, study, companion, frozen, PLAN, 5, base)
    return study, companion


class Sleeper:
    """A unit's work: record who ran it; a 'broken' candidate's lr x2 replay diverges."""

    def __init__(self, seconds: float, broken: tuple[int, ...] = (), die_on: tuple | None = None):
        self.seconds, self.broken, self.die_on = seconds, broken, die_on

    def __call__(self, trial: optuna.Trial) -> float:
        unit = trial.user_attrs
        trial.set_user_attr("worker", os.getpid())
        if self.die_on == (unit["candidate"], unit["seed"]):
            os.kill(os.getpid(), signal.SIGKILL)  # a worker lost mid-replay: no goodbye
        time.sleep(self.seconds)
        broke = unit["candidate"] in self.broken and unit["lr_factor"] > 1
        trial.set_user_attr("result", {"seed": unit["seed"], "lr_factor": unit["lr_factor"],
                                       "outcome": "diverged" if broke else "complete"})  # fmt: skip
        return 5.0


def _work(config, sleeper: Sleeper, wait: bool) -> None:
    study = optuna.load_study(study_name=config.study_name, storage=replays.open_storage(config))
    run_units(config, open_companion(config, study), sleeper, wait)


def _ran(companion: optuna.Study) -> list[tuple]:
    return [
        replays.unit_key(t.user_attrs)
        for t in companion.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    ]


@needs_postgres
def test_two_processes_claim_each_replay_exactly_once(databases, tmp_path):
    config = settings(databases[0], f"claims-{uuid.uuid4().hex[:6]}", tmp_path)
    # certify_all: nothing is cancelled, every unit must run once (4 candidates x 3 replays)
    config = config.with_overrides({"search.certify_all": True})
    trials = [(1e-3, 1.5, True), (2e-3, 1.0, False), (3e-3, 2.0, False), (4e-3, 3.0, False)]
    _, companion = queued_study(config, trials)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_work, args=(config, Sleeper(0.3), True)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    ran = _ran(companion)
    assert len(ran) == 12 and len(set(ran)) == 12  # every unit, once
    pids = {t.user_attrs["worker"] for t in companion.trials}
    assert pids == {w.pid for w in workers}  # both workers took a share
    assert not [t for t in companion.trials if t.state != optuna.trial.TrialState.COMPLETE]
    # Queued again by a late worker: nothing is added, nothing runs twice.
    study = optuna.load_study(study_name=config.study_name, storage=replays.open_storage(config))
    assert plan_units(config, study, companion, study.trials, PLAN, 5, 0) == 0


@needs_postgres
def test_a_replay_whose_worker_died_is_run_again_by_another_once(databases, tmp_path):
    config = settings(databases[0], f"dies-{uuid.uuid4().hex[:6]}", tmp_path)
    config = config.with_overrides({"search.certify_all": True})
    _, companion = queued_study(config, [(1e-3, 1.5, True), (2e-3, 1.0, False)])
    context = multiprocessing.get_context("spawn")
    doomed = context.Process(target=_work, args=(config, Sleeper(0.2, die_on=(1, 1)), False))
    doomed.start()
    doomed.join(timeout=60)
    assert doomed.exitcode == -signal.SIGKILL
    stuck = companion.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert [replays.unit_key(t.user_attrs)[:2] for t in stuck] == [(1, 1)]
    survivor = context.Process(target=_work, args=(config, Sleeper(0.2), True))
    survivor.start()
    survivor.join(timeout=120)
    assert survivor.exitcode == 0
    ran = _ran(companion)
    assert len(ran) == 6 and len(set(ran)) == 6  # the dead worker's unit ran again, once
    retried = [t for t in companion.trials if t.system_attrs.get("failed_trial") is not None]
    assert len(retried) == 1 and retried[0].user_attrs["worker"] == survivor.pid
    assert [t.state for t in companion.trials].count(optuna.trial.TrialState.FAIL) == 1


def test_a_unit_whose_worker_died_before_its_first_heartbeat_is_run_again(tmp_path, caplog, monkeypatch):
    # As on a shared store, where a RUNNING unit may be a live peer's (on SQLite it is a dead
    # process's, failed at once): the survivor must find it dead by its missing heartbeats.
    monkeypatch.setattr(SqliteStore, "running_is_orphaned", False)
    config = settings(f"sqlite:///{tmp_path}/optuna.db", "silent", tmp_path)
    config = config.with_overrides({"search.certify_all": True})
    _, companion = queued_study(config, [(1e-3, 1.5, True), (2e-3, 1.0, False)])
    # What a worker killed between its claim and its first heartbeat leaves: a RUNNING unit
    # with no heartbeat row (Optuna's own stale check never fails one).
    claimed = companion.ask()
    survivor = open_companion(config, optuna.load_study(study_name=config.study_name,
                                                        storage=replays.open_storage(config)))  # fmt: skip
    caplog.set_level(logging.INFO, logger="stylepipe")
    assert ends_within(lambda: run_units(config, survivor, Sleeper(0.0), wait=True), timeout=60)
    waiting = [r.message for r in caplog.records if r.message.startswith("waiting for")]
    assert waiting == [f"waiting for 1 running elsewhere in {companion.study_name} (one whose worker stopped "
                       "runs again here after search.grace_period seconds without a heartbeat)"]  # fmt: skip
    assert companion.trials[claimed.number].state == optuna.trial.TrialState.FAIL
    ran = _ran(companion)
    assert len(ran) == 6 and len(set(ran)) == 6  # the silent claim's unit ran again, once
    retried = [t for t in companion.trials if t.system_attrs.get("failed_trial") is not None]
    assert [t.system_attrs["failed_trial"] for t in retried] == [claimed.number]


def test_a_unit_just_claimed_is_not_taken_for_dead_before_its_first_heartbeat(tmp_path, monkeypatch):
    config = settings(f"sqlite:///{tmp_path}/optuna.db", "live", tmp_path)
    config = config.with_overrides({"search.certify_all": True})
    _, companion = queued_study(config, [(1e-3, 1.5, True)])
    # Optuna's heartbeat thread has not written yet (a loaded machine) when a peer looks.
    monkeypatch.setattr(optuna.study._optimize, "get_heartbeat_thread", lambda *a: NullHeartbeatThread())
    peer = open_companion(config, optuna.load_study(study_name=config.study_name,
                                                    storage=replays.open_storage(config)))  # fmt: skip

    class LookedAtByAPeer(Sleeper):
        def __call__(self, trial: optuna.Trial) -> float:
            optuna.storages.fail_stale_trials(peer)
            return super().__call__(trial)

    run_units(config, companion, LookedAtByAPeer(0.0), wait=True)
    assert [t.state for t in companion.trials] == [optuna.trial.TrialState.COMPLETE] * 3


def test_units_no_longer_needed_are_cancelled_but_the_baselines_are_not(tmp_path):
    config = settings(f"sqlite:///{tmp_path}/optuna.db", "cancels", tmp_path)
    # quality: trial 1 best, the baseline (0) second, trial 2 third; trial 1 passes
    _, companion = queued_study(config, [(1e-3, 1.5, True), (2e-3, 1.0, False), (3e-3, 2.0, False)])
    run_units(config, companion, Sleeper(0.0), wait=True)
    states = {replays.unit_key(t.user_attrs)[:2]: t for t in companion.trials}
    assert all(states[(1, s)].state == optuna.trial.TrialState.COMPLETE for s in (0, 1, 2))
    assert all(states[(0, s)].state == optuna.trial.TrialState.COMPLETE for s in (0, 1, 2))  # baseline
    for seed in (0, 1, 2):
        assert states[(2, seed)].state == optuna.trial.TrialState.PRUNED
        assert (
            states[(2, seed)].user_attrs["cancelled"].startswith("trial 1, a better candidate, passed first")
        )


def test_a_candidate_that_failed_a_replay_has_the_rest_cancelled(tmp_path):
    config = settings(f"sqlite:///{tmp_path}/optuna.db", "fails", tmp_path)
    _, companion = queued_study(config, [(1e-3, 1.5, True), (2e-3, 1.0, False)])
    run_units(config, companion, Sleeper(0.0, broken=(1,)), wait=True)
    by_key = {replays.unit_key(t.user_attrs)[:2]: t for t in companion.trials}
    assert by_key[(1, 0)].user_attrs["result"]["outcome"] == "diverged"
    assert by_key[(1, 1)].user_attrs["cancelled"] == "trial 1 already failed its replay with seed 0"
    unit = {**by_key[(1, 2)].user_attrs}
    assert cancelled_because(companion, unit, certify_all=True) is None  # certify_all: every replay
    assert [by_key[(0, s)].state for s in (0, 1, 2)] == [optuna.trial.TrialState.COMPLETE] * 3


@pytest.mark.parametrize("certify_all", [False, True])
def test_planning_twice_queues_nothing_new(tmp_path, certify_all):
    config = settings(f"sqlite:///{tmp_path}/optuna.db", "twice", tmp_path)
    config = config.with_overrides({"search.certify_all": certify_all})
    study, companion = queued_study(config, [(1e-3, 1.5, True), (2e-3, 1.0, False)])
    run_units(config, companion, Sleeper(0.0), wait=True)
    assert plan_units(config, study, companion, study.trials, PLAN, 5, 0) == 0
