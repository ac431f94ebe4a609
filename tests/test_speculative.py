"""The speculative final (speculative.py): the best candidate's final model trains while its
certificate runs; it goes on when the candidate is certified and is stopped (KILLED, never
registered) when it is not. The cells of docs/design.md's table "The speculative final"; its
process killed mid-final is here on SQLite (the same command again) and in
tests/test_topology.py on the stack, with a real fan-out."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow import MlflowClient

from stylepipe import chain, speculative, stages
from stylepipe.config import load_config
from stylepipe.final import AHEAD_TAG, STATE_TAG
from stylepipe.pipeline import Context
from stylepipe.search import replays as replays_module
from stylepipe.search.replays import ReplayResult, open_companion
from stylepipe.search.safest import CertificatePlan, confirm_horizon
from stylepipe.session import StudySession
from tests.helpers import DEMO, search_command, search_overrides

_STATE = optuna.trial.TrialState
# No replays: the best candidate is certified whatever its runs do (the cells where it passes).
CERTIFIED = ["search.top_k=1", "search.replay_seeds=0", "search.lr_margin=1"]


def _config(tmp_path: Path, prepared: Path, *extra: str):
    overrides = search_overrides(
        tmp_path / "run", prepared, "search.n_trials=3", "final.speculative=true", *extra
    )
    return load_config(DEMO, overrides)


def _units(config) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(
        study_name=f"{config.study_name}{speculative.SUFFIX}", storage=config.storage_url
    ).trials


def _final_runs(config) -> list:
    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.study_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`stylepipe.role` = 'final'")
    return sorted(runs, key=lambda r: r.info.start_time)


def _steps(config, run) -> list[int]:
    history = MlflowClient(tracking_uri=config.tracking_uri).get_metric_history(run.info.run_id, "loss/total")
    return sorted(m.step for m in history)


def _registered(config) -> list:
    return MlflowClient(tracking_uri=config.tracking_uri).search_model_versions(
        f"name='{config.tracking.registered_model}'"
    )


def _killed_mid_final_ahead(args: list[str], run_dir: Path) -> None:
    """Run the search command ``args`` and kill -9 it once its final trained ahead has written
    its step-16 checkpoint."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(
            (run_dir / "final").glob("*/checkpoints/step-00000016*")
        ):
            assert process.poll() is None, "the search ended before it was killed"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()


def test_a_final_is_trained_ahead_only_with_several_workers_and_a_mirror(tmp_path, prepared):
    config = load_config(DEMO, search_overrides(tmp_path / "run", prepared))
    assert not speculative.enabled(config)  # one worker: nothing to overlap the final with
    assert speculative.enabled(config.with_overrides({"search.workers": 2}))
    # the finisher may be on another machine: it finishes the run from its mirrored checkpoint
    assert not speculative.enabled(
        config.with_overrides({"search.workers": 2, "final.mirror_checkpoints": False})
    )
    assert not speculative.enabled(config.with_overrides({"search.workers": 2, "final.train": False}))
    assert not speculative.enabled(config.with_overrides({"search.workers": 2, "final.speculative": False}))


def test_a_certified_candidate_s_final_trained_ahead_is_the_run_registered(tmp_path, prepared):
    config = _config(tmp_path, prepared, *CERTIFIED, "final.steps=12", "train.checkpoint_every=4")
    answer = chain.run_search(config, progress=False)

    (unit,) = _units(config)
    assert unit.state == _STATE.COMPLETE and unit.user_attrs["state"] == "trained"
    assert answer["safest"].trial == unit.user_attrs["candidate"]
    (final,) = _final_runs(config)  # one final run: the one trained ahead, finished by the finisher
    assert final.data.tags[AHEAD_TAG] and final.data.tags[STATE_TAG] == "finished"
    assert final.info.status == "FINISHED"
    (version,) = _registered(config)
    assert version.run_id == final.info.run_id
    # the finisher resumed it at its last step: no step trained twice
    steps = _steps(config, final)
    assert steps[-1] == 12 and len(steps) == len(set(steps))

    # Run again when finished, with speculation as it was and switched off (a setting a study may
    # change): its recorded answer; no unit queued, no final run or version added.
    for again in (config, config.with_overrides({"final.speculative": False})):
        reported = chain.run_search(again, progress=False)
        assert reported["recorded_before"] and reported["safest"].trial == answer["safest"].trial
        assert len(_units(config)) == 1 and len(_final_runs(config)) == 1 and len(_registered(config)) == 1


def _fail_the_best(monkeypatch, config):
    """Replays of the study's best trial diverge; every other replay passes."""

    def run_candidate(replay_config, data, loggers, **kwargs):
        study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
        best = CertificatePlan(study, config).candidates[0]
        broke = replay_config.train.lr / best.params["lr"] in (1.0, config.search.lr_margin)
        quality = None if broke else 0.5
        return SimpleRun("diverged" if broke else "complete", quality)

    monkeypatch.setattr(replays_module, "run_candidate", run_candidate)


class SimpleRun:
    def __init__(self, outcome: str, quality: float | None):
        self.outcome, self.quality, self.spikiness = outcome, quality, 1.0
        broke = SimpleNamespace(cause="divergence", step=3, to_dict=lambda: {"outcome": outcome, "step": 3})
        self.autopsy = broke if quality is None else None

    def quality_at(self, step: int) -> float | None:
        return self.quality


def test_a_final_trained_to_its_end_is_stopped_and_never_registered_when_its_candidate_fails(
    tmp_path, prepared, monkeypatch
):
    config = _config(tmp_path, prepared, "search.top_k=2", "final.steps=8")
    _fail_the_best(monkeypatch, config)
    answer = chain.run_search(config, progress=False)

    (unit,) = _units(config)
    best = unit.user_attrs["candidate"]
    assert unit.user_attrs["state"] == "trained"  # one process: trained whole before its replays
    assert answer["safest"] is not None and answer["safest"].trial != best
    ahead, certified = _final_runs(config)
    assert ahead.data.tags[AHEAD_TAG] and ahead.info.status == "KILLED"
    assert ahead.data.tags[STATE_TAG] == "stopped"
    assert f"trial {best} already failed its replay" in ahead.data.tags["failure"]
    (version,) = _registered(config)
    assert version.run_id == certified.info.run_id != ahead.info.run_id
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    records = {k: v for k, v in study.user_attrs.items() if k.startswith("final_run:")}
    assert sorted(r["state"] for r in records.values()) == ["finished", "stopped"]
    assert answer["cost"]["final"] == 8 + 8  # the certified final's steps and the stopped one's


def test_a_final_in_training_stops_at_its_next_check_when_its_candidate_fails_elsewhere(
    tmp_path, prepared, monkeypatch
):
    """Another worker's replay of the candidate fails while its final trains here."""
    config = _config(tmp_path, prepared, "search.top_k=2", "final.steps=32", "train.checkpoint_every=4")
    monkeypatch.setattr(speculative, "CHECK_S", 0.1)
    _fail_the_best(monkeypatch, config)
    with StudySession(config) as session:
        context = Context(config, session)
        stages.search_trials(config, session=session)
        plan = CertificatePlan(session.study, config)
        best = plan.candidates[0]
        failed = threading.Event()

        def another_worker_fails_its_replay():
            # once the final has trained a while, a replay of its candidate diverges elsewhere
            checkpoints = Path(config.run_dir) / "final"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(checkpoints.glob("*/checkpoints/step-00000008*")):
                time.sleep(0.05)
            companion = open_companion(config, session.study)
            result = ReplayResult(seed=0, lr_factor=2.0, outcome="diverged", cause="divergence", step=3)
            attrs = {"candidate": best.number, "quality": best.value, "baseline": False, "order": 0,
                     "replays": 2, "seed": 0, "lr_factor": 2.0, "horizon": confirm_horizon(config),
                     "result": result.to_json()}  # fmt: skip
            companion.add_trial(optuna.trial.create_trial(state=_STATE.COMPLETE, value=3.0, user_attrs=attrs))
            failed.set()

        writer = threading.Thread(target=another_worker_fails_its_replay)
        writer.start()
        stages.certificate_replays(config, session)
        writer.join()
        assert failed.is_set()
        finished = chain._finish_held(context, chain.in_process)

    (unit,) = _units(config)
    assert unit.state == _STATE.PRUNED
    assert 8 <= unit.user_attrs["steps_trained"] < 32
    assert finished["cost"]["final"] == 32 + unit.user_attrs["steps_trained"]  # the stopped steps count
    assert f"trial {best.number} already failed its replay with seed 0" in unit.user_attrs["stopped"]
    ahead, certified = _final_runs(config)
    assert ahead.info.status == "KILLED" and ahead.data.tags[STATE_TAG] == "stopped"
    (version,) = _registered(config)
    assert version.run_id == certified.info.run_id


def test_a_final_that_never_started_is_stopped_without_training_when_another_is_certified(
    tmp_path, prepared, monkeypatch
):
    config = _config(tmp_path, prepared, "search.top_k=2", "final.steps=8")
    _fail_the_best(monkeypatch, config)
    with StudySession(config) as session:
        stages.search_trials(config, session=session)
        speculative.queue(config, session.study, CertificatePlan(session.study, config))
        # the replays ran, and the verdict was recorded, before any worker claimed the final
        monkeypatch.setattr(speculative, "run_units", lambda *a, **k: 0)
        stages.certificate_replays(config, session)
        monkeypatch.undo()
        _fail_the_best(monkeypatch, config)
        chain._finish_held(Context(config, session), chain.in_process)

    (unit,) = _units(config)
    assert unit.state == _STATE.PRUNED and "already failed its replay" in unit.user_attrs["stopped"]
    assert "steps_trained" not in unit.user_attrs
    (certified,) = _final_runs(config)  # the stopped one never had a run
    assert AHEAD_TAG not in certified.data.tags
    assert len(_registered(config)) == 1


def test_a_final_that_halted_ahead_is_reported_by_the_finisher_not_trained_again(tmp_path, prepared):
    """The divergence guard wakes after a trial's length: trials and replays pass, the final
    trained ahead halts after every recovery. The finisher reports that halt."""
    from stylepipe.final import FinalRunHalted

    guard = ["guard.divergence_warmup=12", "guard.divergence_factor=1.0001", "final.steps=60"]
    config = _config(tmp_path, prepared, *CERTIFIED, *guard)
    with pytest.raises(FinalRunHalted, match="recorded before, not trained again"):
        chain.run_search(config, progress=False)

    (unit,) = _units(config)
    assert unit.state == _STATE.COMPLETE and unit.user_attrs["state"] == "halted"
    (final,) = _final_runs(config)  # halted once, ahead; not trained again by the finisher
    assert final.data.tags[AHEAD_TAG] and final.data.tags[STATE_TAG] == "halted"
    assert _registered(config) == []


@pytest.mark.slow
def test_search_killed_mid_final_ahead_resumes_it_in_the_same_run_when_run_again(tmp_path, prepared):
    """`stylepipe search` on SQLite with final.speculative: kill -9 while its final trains ahead;
    the same command again fails the orphaned unit, queues it again and resumes the same run."""
    config = _config(tmp_path, prepared, *CERTIFIED, "final.steps=64", "train.checkpoint_every=8")
    args = search_command(search_overrides(tmp_path / "run", prepared, "search.n_trials=3", "final.speculative=true",
                                           *CERTIFIED, "final.steps=64", "train.checkpoint_every=8"))  # fmt: skip
    _killed_mid_final_ahead(args, tmp_path / "run")

    from stylepipe.cli import main

    assert main(args[1:]) == 0  # the same command again (in this process)
    units = _units(config)
    assert [u.state for u in units] == [_STATE.FAIL, _STATE.COMPLETE]
    (final,) = _final_runs(config)  # resumed in place: one final run
    assert final.info.status == "FINISHED" and final.data.tags[AHEAD_TAG]
    steps = _steps(config, final)
    assert steps[-1] == 64 and len(steps) == len(set(steps))
    (version,) = _registered(config)
    assert version.run_id == final.info.run_id


@pytest.mark.slow
def test_a_final_whose_worker_died_is_stopped_not_resumed_when_its_candidate_failed_meanwhile(
    tmp_path, prepared, monkeypatch
):
    """kill -9 while the final trains ahead; meanwhile a replay of its candidate failed elsewhere.
    The same command again: the orphaned unit is failed, its retry claimed and pruned without
    training, the MLflow run the dead process left RUNNING ended KILLED and tagged stopped, and
    the certified configuration's final is the one registered."""
    extra = ("search.top_k=2", "final.steps=64", "train.checkpoint_every=8")
    config = _config(tmp_path, prepared, *extra)
    args = search_command(search_overrides(tmp_path / "run", prepared, "search.n_trials=3", "final.speculative=true",
                                           *extra))  # fmt: skip
    _killed_mid_final_ahead(args, tmp_path / "run")
    (orphan,) = _units(config)
    assert orphan.state == _STATE.RUNNING
    (dead_run,) = _final_runs(config)
    assert dead_run.info.status == "RUNNING"

    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    best = CertificatePlan(study, config).candidates[0]
    assert orphan.user_attrs["candidate"] == best.number
    result = ReplayResult(seed=0, lr_factor=2.0, outcome="diverged", cause="divergence", step=3)
    attrs = {"candidate": best.number, "quality": best.value, "baseline": False, "order": 0, "replays": 2,
             "seed": 0, "lr_factor": 2.0, "horizon": confirm_horizon(config), "result": result.to_json()}  # fmt: skip
    open_companion(config, study).add_trial(
        optuna.trial.create_trial(state=_STATE.COMPLETE, value=3.0, user_attrs=attrs)
    )  # another worker's replay of the candidate, which diverged
    _fail_the_best(monkeypatch, config)

    from stylepipe.cli import main

    assert main(args[1:]) == 0  # the same command again (in this process)
    orphaned, retry = _units(config)
    assert orphaned.state == _STATE.FAIL
    assert retry.state == _STATE.PRUNED and "steps_trained" not in retry.user_attrs
    assert f"trial {best.number} already failed its replay" in retry.user_attrs["stopped"]
    ahead, certified = _final_runs(config)
    assert ahead.info.run_id == dead_run.info.run_id
    assert ahead.info.status == "KILLED" and ahead.data.tags[STATE_TAG] == "stopped"
    assert f"trial {best.number} already failed its replay" in ahead.data.tags["failure"]
    assert AHEAD_TAG not in certified.data.tags and certified.info.status == "FINISHED"
    (version,) = _registered(config)
    assert version.run_id == certified.info.run_id
