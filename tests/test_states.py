"""What each command does in each state of a run or a study, cell by cell (docs/design.md,
"A run's state"). Each test names its cell; the ones that gave a wrong answer before say how."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sqlite3
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from stylepipe.cli import main
from stylepipe.config import PrepareConfig, load_config
from stylepipe.data.prepare import prepare
from stylepipe.data.sources import export_skimage
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.study import enqueue_first_trials, open_study
from stylepipe.session import StudySession
from stylepipe.train.recipe import train_from_config, train_run_folder
from tests.helpers import DEMO, SAFEST, StopAt, another_process_holds, search_config, search_overrides

SMALL = ["data.image_size=32", "train.batch_size=2", "train.steps=10", "train.check_every=5",
         "train.checkpoint_every=5", "train.device=cpu", "train.warmup_steps=0"]  # fmt: skip


def train_args(run_dir: Path, *extra: str) -> list[str]:
    args = ["train", "--config", str(DEMO), "--set", f"run_dir={run_dir}"]
    for override in (*SMALL, *extra):
        args += ["--set", override]
    return args


def config_of(run_dir: Path, *extra: str):
    return load_config(DEMO, [f"run_dir={run_dir}", *SMALL, *extra])


def folder_of(run_dir: Path, *extra: str) -> Path:
    return train_run_folder(config_of(run_dir, *extra)).path


SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its SHA-256 and modification time; a SQLite database by its
    rows. SQLite moves pages between a database and its write-ahead log on its own (a checkpoint
    when some process closes its last connection, whenever that connection is collected), which
    changes the files' bytes and not a row: the rows are what a command could have written."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.endswith(SQLITE_SIDE_FILES):
            continue
        if path.read_bytes()[:16] == b"SQLite format 3\x00":
            with contextlib.closing(sqlite3.connect(path)) as database:
                rows = "\n".join(database.iterdump())
            found[str(path.relative_to(folder))] = (hashlib.sha256(rows.encode()).hexdigest(), 0)
        else:
            found[str(path.relative_to(folder))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                path.stat().st_mtime_ns,
            )
    return found


def state_of(folder: Path) -> str:
    return json.loads((folder / "run.json").read_text())["state"]


def interrupted(config, at: int = 7) -> Path:
    with pytest.raises(KeyboardInterrupt):
        train_from_config(config, callbacks=[StopAt(at)])
    folder = train_run_folder(config).path
    assert state_of(folder) == "interrupted"
    return folder


# ---------------------------------------------------------------- stylepipe train


def test_train_finished_the_same_command_again_writes_nothing_and_other_settings_are_another_run(
    tmp_path, capsys
):
    """The README's "Training by hand" loop. Before: the second learning rate was refused ("written
    with other settings ... --fresh"), and the same command again trained "30 steps in 0.0 s" and
    wrote the model again."""
    mine = ("train.lr=0.01", "train.clip_norm=null")
    assert main(train_args(tmp_path, *mine)) == 0
    first = folder_of(tmp_path, *mine)
    assert state_of(first) == "finished"
    before = snapshot(first)

    assert main(train_args(tmp_path, "train.lr=0.002", "train.clip_norm=null")) == 0  # none yet: trains it
    second = folder_of(tmp_path, "train.lr=0.002", "train.clip_norm=null")
    assert second != first and (second / "model.safetensors").is_file()
    assert "resumed" not in capsys.readouterr().err
    assert snapshot(first) == before  # the other run is never touched

    assert main(train_args(tmp_path, *mine)) == 0  # finished, the same command
    assert f"already finished: {first / 'model.safetensors'}" in capsys.readouterr().out
    assert snapshot(first) == before

    assert main([*train_args(tmp_path, *mine), "--fresh"]) == 2  # finished, --fresh
    assert "never rewritten" in capsys.readouterr().err
    assert snapshot(first) == before


def test_train_fewer_steps_than_a_finished_run_is_a_new_run_with_its_own_weights(tmp_path, capsys):
    """Before: a finished 40-step run run again with train.steps=20 printed "trained 20 steps",
    its model said 20, and its weights were step 40's."""
    assert main(train_args(tmp_path)) == 0
    ten = folder_of(tmp_path)
    before = snapshot(ten)
    assert main(train_args(tmp_path, "train.steps=5")) == 0
    five = folder_of(tmp_path, "train.steps=5")
    assert five != ten and "trained 5 steps" in capsys.readouterr().out
    weights = load_file(str(five / "model.safetensors"))
    at_step_5 = torch.load(ten / "checkpoints" / "step-00000005.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], at_step_5[k]) for k in weights)  # step 5's weights, not step 10's
    with open(five / "model.safetensors", "rb") as handle:  # the model's own record says 5
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert json.loads(header["__metadata__"]["stylepipe"])["steps"] == 5
    assert snapshot(ten) == before


def test_train_interrupted_resumes_other_settings_are_another_run_and_fresh_starts_it_over(tmp_path, capsys):
    config = config_of(tmp_path)
    folder = interrupted(config)
    kept = snapshot(folder)

    other = train_from_config(config_of(tmp_path, "train.lr=0.002"))  # other settings: another run
    assert other.folder != folder and other.resumed_from is None
    assert snapshot(folder) == kept and state_of(folder) == "interrupted"

    assert main([*train_args(tmp_path), "--fresh"]) == 0  # interrupted, --fresh: starts it over
    assert "resumed" not in capsys.readouterr().err
    assert list(pd.read_csv(folder / "metrics.csv")["step"]) == list(range(1, 11))
    assert state_of(folder) == "finished"

    again = interrupted(config_of(tmp_path, "train.steps=20"), at=12)
    assert main(train_args(tmp_path, "train.steps=20")) == 0  # interrupted, the same command: resumes
    assert "resumed from the checkpoint at step 10" in capsys.readouterr().err
    assert list(pd.read_csv(again / "metrics.csv")["step"]) == list(range(1, 21))


HOLD = """import sys, time
from stylepipe.config import load_config
from stylepipe.train.recipe import train_run_folder
run = train_run_folder(load_config(sys.argv[1], sys.argv[2:]))
with run.claimed():
    print("held", flush=True)
    time.sleep(600)
"""


def test_train_running_in_another_process_is_refused_with_or_without_fresh(tmp_path, capsys):
    """Before: two `stylepipe train` on one run folder were both accepted; metrics.csv ended with NUL
    bytes and steps 21-40 twice."""
    folder = interrupted(config_of(tmp_path))
    before = snapshot(folder)
    with another_process_holds(HOLD, str(DEMO), f"run_dir={tmp_path}", *SMALL):
        for extra in ([], ["--fresh"]):
            assert main([*train_args(tmp_path), *extra]) == 2
            assert "another process is running this run" in capsys.readouterr().err
    assert snapshot(folder) == before


def test_train_halted_is_reported_again_and_fresh_starts_it_over(tmp_path, capsys):
    blowup = ("train.lr=10", "train.clip_norm=null", "train.recovery=false")
    assert main(train_args(tmp_path, *blowup)) == 3
    folder = folder_of(tmp_path, *blowup)
    assert state_of(folder) == "halted"
    capsys.readouterr()
    before = snapshot(folder)
    assert main(train_args(tmp_path, *blowup)) == 3  # halted, the same command: nothing is trained
    err = capsys.readouterr().err
    assert "halted for good before; nothing was trained now" in err and "parameter_blowup" in err
    assert snapshot(folder) == before
    assert main([*train_args(tmp_path, *blowup), "--fresh"]) == 3  # halted, --fresh: trains it again
    assert "halted for good before" not in capsys.readouterr().err
    assert snapshot(folder) != before and not (folder / "model.safetensors").exists()


def _prepared(tmp_path: Path, names: tuple[str, ...]) -> Path:
    out = tmp_path / "prepared"
    source = export_skimage(tmp_path / f"source-{len(names)}", names)
    prepare(
        source, out, PrepareConfig(image_size=32, min_size=32, val_fraction=0.0, workers=1), progress=False
    )
    return out


@pytest.mark.parametrize("now", [("astronaut", "coffee"), ("astronaut", "coffee", "chelsea", "rocket")],
                         ids=["fewer images", "more images"])  # fmt: skip
def test_train_interrupted_and_its_images_changed_is_refused_and_fresh_trains_on_the_new_ones(
    tmp_path, capsys, now
):
    """Before: with fewer images an IndexError traceback; with more, training silently went on with
    other data."""
    data = _prepared(tmp_path, ("astronaut", "coffee", "chelsea"))
    extra = (f"data.content={data}",)
    folder = interrupted(config_of(tmp_path, *extra))
    before = snapshot(folder)
    shutil.rmtree(data)
    _prepared(tmp_path, now)  # prepare rewrote the folder
    assert main(train_args(tmp_path, *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the images in data.content changed since the interrupted run" in errors[0]
    assert snapshot(folder) == before
    assert main([*train_args(tmp_path, *extra), "--fresh"]) == 0
    assert folder_of(tmp_path, *extra) != folder and snapshot(folder) == before


# ---------------------------------------------------------------- studies

IDENTICAL = ("search.space.lr=[1e-3,1e-3]", "search.space.clip_norm=[10,10]", "search.space.allow_no_clip=false",
             "search.space.content_weight=[3,3]", "search.space.style_weight=[1e5,1e5]",
             "search.space.tv_weight=[1e-6,1e-6]")  # fmt: skip
# every trial is the baseline's settings: the safest is trial 0 however many trials the study holds
STUDY = ("search.n_trials=1", "search.top_k=1", "search.replay_seeds=0", "search.lr_margin=1",
         "final.steps=4", "tracking.registered_model=states", *IDENTICAL)  # fmt: skip


def search_args(run_dir: Path, data: Path, *extra: str) -> list[str]:
    args = ["search", "--quiet", "--config", str(DEMO)]
    for override in search_overrides(run_dir, data, *STUDY, *extra):
        args += ["--set", override]
    return args


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, prepared):
    run_dir = tmp_path_factory.mktemp("study")
    assert main(search_args(run_dir, prepared)) == 0
    return run_dir


def _final_runs(config):
    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.study_name)
    return [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("stylepipe.role") == "final"
    ]


def _record(config):
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    versions = MlflowClient(tracking_uri=config.tracking_uri).search_model_versions("name='states'")
    finals = {
        r.info.run_id: (r.info.status, r.info.end_time, r.data.tags, r.data.metrics)
        for r in _final_runs(config)
    }
    storage = study._storage  # the note's versions are system attributes, which Study no longer shows
    system = storage.get_study_system_attrs(storage.get_study_id_from_name(config.study_name))
    return (
        len(study.trials),
        study.user_attrs,
        system,
        sorted(v.version for v in versions),
        finals,
    )


# cost knobs a study may change: certify_all, and workers (the scheduled flow's fan-out)
@pytest.mark.parametrize("command, knob", [("search", None), ("search", "search.certify_all=true"),
                                           ("search", "search.workers=3"), ("worker", None)])  # fmt: skip
def test_study_finished_the_same_command_again_reports_its_recorded_result(
    finished_study, prepared, capsys, command, knob
):
    config = search_config(finished_study, prepared, *STUDY)
    before = _record(config)
    final = next(iter(before[4].values()))
    assert final[0] == "FINISHED" and final[2]["stylepipe.state"] == "finished"
    files = snapshot(finished_study)
    args = search_args(finished_study, prepared, *([knob] if knob else []))
    assert main([command, *args[1:]]) == 0
    said = "finished before with these settings" if command == "search" else "worker ran 0 trials"
    assert said in capsys.readouterr().out
    assert _record(config) == before  # nothing replayed, trained or written: not even its note
    # Before: it wrote trials.csv, stability_map.png, safest.json and mlflow.db again
    assert snapshot(finished_study) == files
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert study.user_attrs["state"] == "finished"


@pytest.mark.parametrize("command, change, key", [
    ("search", "train.lr=0.02", "train.lr"), ("search", "search.seed=7", "search.seed"),
    ("search", "search.space.lr=[1e-5,1e-4]", "search.space.lr"),
    ("search", "search.startup_trials=3", "search.startup_trials"), ("search", "search.n_trials=2", None),
    ("worker", "train.lr=0.02", "train.lr")])  # fmt: skip
def test_study_finished_with_other_settings_is_refused_naming_them(
    finished_study,
    prepared,
    capsys,
    command,
    change,
    key,
):
    """Before: --set train.lr=0.02 printed "your settings (the config file's) are the safest
    configuration: keep them" beside a safest lr of 0.001; another seed or space gave the old answer."""
    config = search_config(finished_study, prepared, *STUDY)
    before = _record(config)
    extra = [change] if key else [change, "train.lr=0.02"]  # more trials with other settings: refused too
    assert main([command, *search_args(finished_study, prepared, *extra)[1:]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{key or 'train.lr'} (" in errors[0] and "search.study_name=" in errors[0]
    assert _record(config) == before


def test_study_searching_with_other_settings_is_refused(tmp_path, prepared, capsys, monkeypatch):
    from stylepipe.chain import run_search
    from stylepipe.search import quality

    original = quality.QualityReporter.on_check

    def ctrl_c_in_the_first_trial(self, state):
        if self.trial is not None:
            raise KeyboardInterrupt
        return original(self, state)

    monkeypatch.setattr(quality.QualityReporter, "on_check", ctrl_c_in_the_first_trial)
    with pytest.raises(KeyboardInterrupt):
        run_search(search_config(tmp_path, prepared, *STUDY), progress=False)
    monkeypatch.setattr(quality.QualityReporter, "on_check", original)
    config = search_config(tmp_path, prepared, *STUDY)
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert study.user_attrs["state"] == "searching"
    trials = len(study.trials)
    assert main(search_args(tmp_path, prepared, "loss.style_weight=2e5")) == 2
    assert "loss.style_weight (100000.0 -> 200000.0)" in capsys.readouterr().err
    assert len(optuna.load_study(study_name=config.study_name, storage=config.storage_url).trials) == trials


def test_study_finished_with_more_trials_is_certified_again_and_reuses_its_final_model(
    finished_study,
    prepared,
    tmp_path,
    capsys,
):
    """Before (a study extended from 3 to 6 trials): exit 2, "the safest configuration went nan";
    the finished final run was "resumed" at its last step and its MLflow record rewritten."""
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_study, run_dir)  # the fixture stays as it was for the other tests
    config = search_config(run_dir, prepared, *STUDY)
    trials, _, _, versions, finals = _record(config)
    assert main(search_args(run_dir, prepared, "search.n_trials=2")) == 0
    out = capsys.readouterr().out
    assert "its model is reused, not trained again; registered version 1 is reused" in out
    after = _record(config)
    assert after[0] == trials + 1 and after[3] == versions and after[4] == finals  # the final run untouched
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert study.user_attrs["finished"]["for_trials"] == 2 and study.user_attrs["state"] == "finished"


def test_study_another_safest_configuration_gets_its_own_final_run_and_version(tmp_path, prepared):
    from stylepipe import stages

    config = search_config(tmp_path, prepared, "final.steps=4", "tracking.registered_model=two")
    other = SAFEST.model_copy(update={"trial": 3, "params": {**SAFEST.params, "lr": 5e-4}})
    with StudySession(config) as session:
        first = stages.train_final(config, SAFEST, session)
        second = stages.train_final(config, other, session)
    assert first.run_id != second.run_id and first.folder != second.folder
    assert not first.reused and not second.reused
    versions = [stages.register(config, final)["version"] for final in (first, second)]
    assert versions == ["1", "2"]


@pytest.mark.parametrize("command", ["search", "worker"])
def test_study_killed_in_its_report_is_finished_by_the_same_command_with_its_report_whole(
    tmp_path, prepared, capsys, command
):
    """Before: a study was recorded finished before its report ran. Killed (kill -9) in the
    report, the same command answered "finished before" and wrote nothing: no safest.json, no
    stability map, ever. ``stylepipe search`` and ``stylepipe worker`` finish a study alike."""
    import signal
    import subprocess
    import sys

    from stylepipe.search.attributes import StudyState

    config = search_config(tmp_path, prepared, *STUDY)
    dies_in_its_report = (
        "import os, signal, sys\nimport stylepipe.report\n"
        "stylepipe.report.stability_map = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from stylepipe.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    same_command = [command, *search_args(tmp_path, prepared)[1:]]
    killed = subprocess.run([sys.executable, "-c", dies_in_its_report, *same_command],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert StudyRecord(study).state == StudyState.REPORTING
    assert not (tmp_path / "safest.json").exists() and not (tmp_path / "stability_map.png").exists()
    [run] = _final_runs(config)
    committed = (run.info.end_time, run.data.tags, run.data.metrics)

    # other settings on the study stopped in its report: refused in one line, nothing written
    assert main(search_args(tmp_path, prepared, "train.lr=0.02")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.lr (" in errors[0], errors
    assert StudyRecord(optuna.load_study(study_name=config.study_name, storage=config.storage_url)).state == (
        StudyState.REPORTING
    )
    assert not (tmp_path / "safest.json").exists()

    assert main(same_command) == 0
    out = capsys.readouterr().out
    assert "finished before with these settings" not in out, out
    said = "registered version 1 is reused" if command == "search" else "finished the study: True"
    assert said in out, out
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert StudyRecord(study).state == StudyState.FINISHED
    assert json.loads((tmp_path / "safest.json").read_text())["model"]["version"] == "1"
    assert (tmp_path / "stability_map.png").read_bytes().startswith(b"\x89PNG")
    assert len(pd.read_csv(tmp_path / "trials.csv")) == len(study.trials)
    [run] = _final_runs(config)  # the finished final run reused as it was: nothing trained again
    assert (run.info.end_time, run.data.tags, run.data.metrics) == committed
    versions = MlflowClient(tracking_uri=config.tracking_uri).search_model_versions("name='states'")
    assert [str(v.version) for v in versions] == ["1"]


def test_study_cut_short_after_its_final_model_completes_without_training_it_again(
    tmp_path,
    prepared,
    monkeypatch,
    capsys,
):
    """Before: a kill after the final model was written and before its registration left the study
    stuck: every rerun exited 2, "the safest configuration went nan (None) ... after 0 recoveries"."""
    from stylepipe import final, pipeline

    config = search_config(tmp_path, prepared, *STUDY)
    real_log_model, real_stages = final.log_model, pipeline.STAGES

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    # 1. stopped while its MLflow run was being committed: the model was on disk, the run not yet finished
    monkeypatch.setattr(final, "log_model", killed)
    assert main(search_args(tmp_path, prepared)) == 130
    [run] = _final_runs(config)
    assert run.data.tags.get("stylepipe.state") != "finished"
    monkeypatch.setattr(final, "log_model", real_log_model)
    # 2. stopped between the finished final run and its registration
    killed_register = dataclasses.replace(pipeline.stage_named(pipeline.REGISTER), run=killed)
    monkeypatch.setattr(pipeline, "STAGES", tuple(killed_register if s.name == pipeline.REGISTER else s
                                                  for s in pipeline.STAGES))  # fmt: skip
    assert main(search_args(tmp_path, prepared)) == 130
    [run] = _final_runs(config)
    assert run.info.status == "FINISHED" and run.data.tags["stylepipe.state"] == "finished"
    assert run.data.tags["stylepipe.resumed_at_step"] == "4"  # it went on at its last step: nothing retrained
    client = MlflowClient(tracking_uri=config.tracking_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == [1, 2, 3, 4]
    assert not client.search_model_versions("name='states'")
    monkeypatch.setattr(pipeline, "STAGES", real_stages)
    committed = (run.info.end_time, run.data.tags, run.data.metrics)
    # 3. the same command completes the registration; the finished final run is reused as it is
    capsys.readouterr()
    assert main(search_args(tmp_path, prepared)) == 0
    assert "its registration, cut short before, was completed: version 1" in capsys.readouterr().out
    [run] = _final_runs(config)
    assert (run.info.end_time, run.data.tags, run.data.metrics) == committed
    [version] = client.search_model_versions("name='states'")
    assert (
        version.run_id == run.info.run_id
        and version.tags["weights_sha256"] == run.data.tags["stylepipe.model_sha256"]
    )


def test_study_whose_only_trial_went_nan_says_nothing_was_replayed(tmp_path, prepared, capsys):
    """Before: "every candidate went NaN or diverged under the stress replays" when nothing was replayed."""
    args = ["search", "--quiet", "--config", str(DEMO)]
    for override in search_overrides(
        tmp_path, prepared, "search.n_trials=1", "train.lr=300", "train.clip_norm=null"
    ):
        args += ["--set", override]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "no candidate completed its trial, so none was replayed" in err and "stress replay" not in err


def test_train_fresh_in_a_searchs_run_folder_touches_only_its_own_run(finished_study, prepared, tmp_path):
    """Before: it deleted the study's final-run checkpoints and overwrote the search's model."""
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_study, run_dir)
    finals = run_dir / "final"
    before = snapshot(finals)
    assert main([*train_args(run_dir), "--fresh"]) == 0
    assert snapshot(finals) == before


def test_study_whose_baseline_trial_was_killed_is_answered_for_by_its_retry(tmp_path, prepared, capsys):
    """Killed (-9) while the baseline trial ran, then the same command: Optuna re-queues a copy of
    the trial, which passes. Before: the copy was chosen as the safest (the config's own settings)
    and the command said "your settings (the config file's) are not safe: its trial ended fail"."""
    config = search_config(tmp_path, prepared, *STUDY, "search.n_trials=2", "search.heartbeat_interval=1",
                           "search.grace_period=2", "final.train=false")  # fmt: skip
    study = open_study(config)
    enqueue_first_trials(study, config)
    killed = study.ask()  # the baseline, RUNNING, its heartbeat stopped as a killed worker's does
    assert killed.user_attrs["baseline"]
    study._storage.record_heartbeat(killed._trial_id)
    time.sleep(3)  # past the grace period
    args = ["search", "--quiet", "--config", str(DEMO)]
    for override in search_overrides(tmp_path, prepared, *STUDY, "search.n_trials=2", "search.heartbeat_interval=1",
                                      "search.grace_period=2", "final.train=false"):  # fmt: skip
        args += ["--set", override]
    assert main(args) == 0
    out = capsys.readouterr().out
    trials = optuna.load_study(study_name=config.study_name, storage=config.storage_url).get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL and trials[1].user_attrs["baseline"]
    assert StudyRecord(study).baseline["trial"] == 1 and StudyRecord(study).baseline["safe"]
    assert "ended fail" not in out
    # every trial trains the config's own settings here: the retry is the safest, or ties with it
    assert "are the safest configuration: keep them" in out or "yours are safe" in out
