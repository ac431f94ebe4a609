"""The search stage on tiny CPU settings: NaN pruning, resume, MLflow records, the dashboard."""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from stylepipe.chain import run_search
from stylepipe.cli import main
from stylepipe.config import load_config
from stylepipe.nets import TransformerNet
from stylepipe.records import BROKE, Safest
from stylepipe.search.dashboard import IMPORTANCE_ID, MAP_ID
from stylepipe.search.quality import evaluate_quality
from stylepipe.search.study_data import load_study_data
from stylepipe.stylize import stylize_tensor
from stylepipe.train.guards import CAUSES
from stylepipe.train.model_file import load_model
from tests.helpers import (
    DEMO,
    TINY_SEARCH,
    another_process_holds_sqlite,
    ends_within,
    search_command,
    search_config,
    search_overrides,
)


def study_trial_params(config) -> set[str]:
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    return {name for t in study.trials for name in t.params}


# lr up to 1e3: Adam at lr >= 10 blows up on its second step, so some trials surely go NaN.
SEARCHED = (
    "search.n_trials=6",
    "search.space.lr=[1e-3,1e3]",
    "tracking.registered_model=tiny-style",
    "search.confirm_steps=12",
)  # replays 12 steps long: trials are 8


@pytest.fixture(scope="module")
def searched(tmp_path_factory, prepared):
    config = search_config(tmp_path_factory.mktemp("study"), prepared, *SEARCHED)
    result = run_search(config, progress=False)
    return config, result


@pytest.mark.slow
def test_nan_trials_are_pruned_with_a_cause_and_a_nan_intermediate_value(searched):
    config, result = searched
    storage_study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    trials = storage_study.get_trials()
    assert len(trials) == 6
    halted = [t for t in trials if t.user_attrs.get("outcome") in ("nan", "diverged")]
    assert halted, "the learning-rate range should have produced at least one NaN trial"
    for t in halted:
        assert t.state == optuna.trial.TrialState.PRUNED
        assert t.user_attrs["cause"] in CAUSES
        assert math.isnan(t.intermediate_values[t.user_attrs["nan_step"]])
        assert t.user_attrs["first_nonfinite"]
        assert t.user_attrs["autopsy"]["step"] == t.user_attrs["nan_step"]
        # infeasible, for the sampler: the earlier it broke, the further (read back from the storage)
        assert t.constraints["stability"] == pytest.approx(1 + (8 - t.user_attrs["nan_step"]) / 8)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(
        t.user_attrs["outcome"] == "complete" and math.isfinite(t.value) for t in complete
    )
    assert all(t.constraints["stability"] == -1.0 for t in complete)  # feasible


@pytest.mark.slow
def test_safest_is_a_complete_trial_whose_replays_all_stayed_finite(searched):
    config, result = searched
    safest = Safest.load(Path(config.run_dir) / "safest.json")  # the file is a record that loads
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    trial = study.trials[safest.trial]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    # its quality: the median over its trial's seed and its other seed's replay, at a trial's length
    assert safest.qualities[0] == pytest.approx(trial.value) and len(safest.qualities) == 2
    assert safest.quality == pytest.approx(statistics.median(safest.qualities))
    assert len(safest.replays) == 2  # one more seed, one at lr x 2
    assert all(r["outcome"] == "complete" and math.isfinite(r["quality"]) for r in safest.replays)
    assert any(r["lr_factor"] == 2.0 for r in safest.replays)
    assert safest.settings["train"]["lr"] == pytest.approx(safest.params["lr"])
    assert study.user_attrs["safest"]["trial"] == safest.trial
    assert (Path(config.run_dir) / "stability_map.png").stat().st_size > 10_000

    certificate = safest.certificate
    assert (certificate.horizon_steps, certificate.lr_margin, certificate.seeds) == (12, 2.0, [1])
    assert certificate.text == (
        "stayed finite and did not diverge for 12 steps with seed 1 at its learning rate and seed 0 at its "
        "learning rate x2"
    )
    client = MlflowClient(tracking_uri=config.tracking_uri)
    replays = [r for r in client.search_runs([client.get_experiment_by_name(config.study_name).experiment_id])
               if r.data.tags.get("stylepipe.role") == "replay"]  # fmt: skip
    assert replays and all(max(m.step for m in client.get_metric_history(r.info.run_id, "loss/total")) == 12
                           for r in replays if r.data.tags["outcome"] == "complete")  # fmt: skip

    # the baseline: trial 0 is the config's own settings, replayed like any candidate
    baseline = study.trials[0]
    assert baseline.user_attrs["baseline"] is True
    assert baseline.params["lr"] == pytest.approx(config.train.lr)
    assert baseline.params["clip_norm"] == pytest.approx(config.train.clip_norm)
    assert safest.baseline["trial"] == 0 and "your settings" in safest.versus_baseline
    assert {v["trial"] for v in study.user_attrs["safety"]} >= {0}


@pytest.mark.slow
def test_mlflow_holds_every_trial_the_summary_and_a_usable_registered_model(searched):
    config, result = searched
    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("stylepipe.role") == "study"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    parent = parent[0]
    trial_runs = [r for r in runs if r.data.tags.get("stylepipe.role") == "trial"]
    assert len(trial_runs) == 6
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trial_runs)
    assert all(r.info.status != "RUNNING" for r in runs)

    halted = [r for r in trial_runs if r.data.tags["outcome"] in ("nan", "diverged")]
    assert halted and all(r.data.tags["cause"] in CAUSES for r in halted)
    artifacts = [a.path for a in client.list_artifacts(halted[0].info.run_id)]
    assert "autopsy.json" in artifacts
    complete = next(r for r in trial_runs if r.data.tags["outcome"] == "complete")
    history = client.get_metric_history(complete.info.run_id, "loss/total")
    assert [m.step for m in history] == list(range(1, 9))
    for name in ("grad_norm/total", "grad_norm/encoder_in", "clip/fraction", "lr", "val/quality"):
        assert client.get_metric_history(complete.info.run_id, name), name
    assert complete.data.params["lr"]

    summary = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials.parquet", "nan_causes.md", "stability_map.png", "safest.json"} <= summary
    assert float(parent.data.tags["safest.lr"]) == pytest.approx(result["safest"].params["lr"])
    assert parent.data.tags["safest.certificate"] == result["safest"].certificate.text
    assert parent.data.tags["safest.horizon_steps"] == "12"
    # where the steps went: the trials as trials.csv counts them, the replays, the final model
    trials = pd.read_csv(Path(config.run_dir) / "trials.csv")
    stages = ("edge", "search", "certificate", "final")
    cost = {stage: parent.data.metrics[f"cost/{stage}_steps"] for stage in stages}
    assert cost["edge"] == 0  # no range test in these tests (test_edge.py has one)
    assert cost["search"] == trials["steps"].sum() and 6 <= cost["search"] <= 6 * 8
    assert cost["certificate"] > 0 and cost["final"] == config.final_run_steps
    assert parent.data.metrics["cost/total_steps"] == sum(cost.values())
    assert result["cost"] == {**{k: int(v) for k, v in cost.items()}, "total": int(sum(cost.values()))}
    assert "Where the steps went" in result["summary_markdown"]
    # what decides broke versus finite, where people look: lr spans six decades, up to where Adam blows up
    importance = result["stability_importance"]
    assert importance and set(importance) <= set(study_trial_params(config))
    assert {f"stability_importance.{name}" for name in importance} <= set(parent.data.tags)
    assert "What decides stability" in result["summary_markdown"]
    assert parent.data.tags["safest.versus_baseline"] == result["safest"].versus_baseline

    version = client.get_model_version_by_alias("tiny-style", "safest")
    assert str(version.version) == result["model"]["version"]
    assert version.tags["certificate"] == result["safest"].certificate.text
    assert version.tags["recoveries"] == "0"
    # the search's quality with its noise over seeds, beside the final model's own quality
    assert version.tags["search_quality"] == result["safest"].quality_text().removeprefix("quality ")
    assert "(seeds " in version.tags["search_quality"]
    assert f"| quality | {version.tags['search_quality']} |" in result["summary_markdown"]
    final = client.get_run(version.run_id)
    assert any(a.path == "samples" for a in client.list_artifacts(final.info.run_id))
    mlflow.set_tracking_uri(config.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/tiny-style@safest")  # what a user of the registry does
    image = torch.rand(1, 3, 40, 48)
    styled = model.predict(image.numpy())
    assert styled.shape == image.shape and np.isfinite(styled).all()
    expected = stylize_tensor(load_model(result["model"]["model"]), image)
    assert np.allclose(styled, expected.numpy(), atol=1e-6)
    stored = [p.name for p in (Path(config.run_dir) / "mlartifacts").rglob("*") if p.is_file()]
    assert "model.safetensors" in stored
    assert not [name for name in stored if name.endswith((".pkl", ".pth", ".pt", ".pickle"))]  # no pickle


@pytest.mark.slow
def test_a_tampered_registered_model_is_refused_and_its_payload_never_runs(searched, tmp_path):
    from stylepipe.registry import Registry, RegistryError

    config, result = searched
    registry = Registry(config.tracking_uri, "tiny-style")
    version = result["model"]["version"]
    assert isinstance(registry.load(version), TransformerNet)
    [weights] = [p for p in (Path(config.run_dir) / "mlartifacts").rglob("model.safetensors")
                 if p.parent.name == "artifacts"]  # fmt: skip
    original = weights.read_bytes()
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    try:
        torch.save({"encoder_in.1.weight": Payload()}, weights)  # a pickle with code, in the store
        with pytest.raises(RegistryError, match="changed since registration"):
            registry.load(version)
        with pytest.raises(Exception):  # noqa: B017  (MLflow's wrapper of safetensors' error)
            mlflow.pyfunc.load_model(f"models:/tiny-style/{version}")
        assert not marker.exists()
    finally:
        weights.write_bytes(original)
    assert isinstance(registry.load(version), TransformerNet)


@pytest.mark.slow
def test_the_report_stage_reads_the_study_without_loading_images_or_the_loss_network(searched, monkeypatch):
    from stylepipe import session, stages

    config, result = searched
    (Path(config.run_dir) / "stability_map.png").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("the report stage loaded the shard and built the loss network")

    monkeypatch.setattr(session, "load_study_data", refuse)  # what a StudySession builds its data with
    reported = stages.report(config, result["safest"], result["model"])
    assert Path(reported["stability_map"]).is_file()
    assert sum(reported["outcomes"].values()) == 6
    assert f"trial {result['safest'].trial}" in reported["summary_markdown"]


def test_quality_does_not_depend_on_the_trials_loss_weights(tmp_path, prepared):
    light = load_study_data(
        search_config(tmp_path, prepared, "loss.content_weight=0.01", "loss.style_weight=1")
    )
    heavy = load_study_data(
        search_config(tmp_path, prepared, "loss.content_weight=50", "loss.style_weight=1e9")
    )
    torch.manual_seed(0)
    model = TransformerNet()
    assert evaluate_quality(model, light) == pytest.approx(evaluate_quality(model, heavy), rel=1e-6)
    torch.manual_seed(1)
    other = TransformerNet()
    assert evaluate_quality(other, light) != pytest.approx(evaluate_quality(model, light), rel=1e-6)


@pytest.mark.slow
def test_an_interrupted_study_resumes_without_duplicate_trial_numbers(tmp_path, prepared, monkeypatch):
    from stylepipe.search import quality

    extra = ("search.n_trials=3", "search.top_k=1", "search.replay_seeds=0", "search.lr_margin=1",
             "final.train=false", "search.space.lr=[1e-3,1e-2]")  # fmt: skip
    config = search_config(tmp_path, prepared, *extra)
    original = quality.QualityReporter.on_check

    def break_trials(self, state):
        if self.trial is not None and self.trial.number == 0:
            raise OSError("disk full")  # not about numerics: the trial fails, the study goes on
        if self.trial is not None and self.trial.number == 1:
            raise KeyboardInterrupt  # Ctrl-C in the middle of trial 1's training
        return original(self, state)

    monkeypatch.setattr(quality.QualityReporter, "on_check", break_trials)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, progress=False)
    monkeypatch.setattr(quality.QualityReporter, "on_check", original)
    run_search(config, progress=False)

    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(5))  # no duplicates, no gaps
    assert [t.state for t in study.trials[:2]] == [optuna.trial.TrialState.FAIL] * 2
    assert study.trials[0].user_attrs["failure"] == "OSError: disk full"
    assert study.trials[1].user_attrs["outcome"] == "failed"
    # failed trials do not count: the study goes on to 3 complete (or pruned) ones
    assert [t.state for t in study.trials[2:]] == [optuna.trial.TrialState.COMPLETE] * 3
    client = MlflowClient(tracking_uri=config.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(config.study_name).experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
    assert sum(r.data.tags.get("stylepipe.role") == "study" for r in runs) == 1  # the same parent run


@pytest.mark.slow
def test_search_command_says_plainly_when_nothing_is_safe(tmp_path, prepared, capsys):
    args = ["search", "--quiet", "--config", str(DEMO)]
    # every lr blows up: the searched ones, and the config's own (the baseline trial)
    overrides = [f"run_dir={tmp_path}", f"data.content={prepared}", *TINY_SEARCH, "search.n_trials=2",
                 "search.space.lr=[100,1000]", "search.space.allow_no_clip=true", "train.lr=300"]  # fmt: skip
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 4
    assert "No safe configuration" in capsys.readouterr().err
    assert json.loads((tmp_path / "safest.json").read_text())["safest"] is None
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not client.search_registered_models()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_optuna_dashboard_serves_the_pruned_trials_with_their_cause(searched):
    config, _ = searched
    port = _free_port()
    command = [str(Path(sys.executable).parent / "optuna-dashboard"), config.storage_url, "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/api/studies"
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = json.load(urllib.request.urlopen(base, timeout=5))["study_summaries"]
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        study_id = next(s["study_id"] for s in studies if s["study_name"] == config.study_name)
        detail = json.load(urllib.request.urlopen(f"{base}/{study_id}?after=0", timeout=10))
        pruned = [t for t in detail["trials"] if t["state"] == "Pruned"]
        causes = [{a["key"]: a["value"] for a in t["user_attrs"]}.get("cause") for t in pruned]
        assert any(cause in CAUSES for cause in causes)
        # the study's note, shown above its trials: what decides whether training breaks
        assert detail["note"]["body"].startswith("**What decides stability**")
        # its two plots, and each trial that broke infeasible (the others feasible)
        assert {p["id"] for p in detail["plotly_graph_objects"]} == {MAP_ID, IMPORTANCE_ID}
        for t in detail["trials"]:
            outcome = {a["key"]: a["value"] for a in t["user_attrs"]}["outcome"]
            assert t["constraints"] and all(c <= 0 for c in t["constraints"]) == (outcome not in BROKE)
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_a_resumed_study_proposes_new_configurations(tmp_path):
    from stylepipe.search.space import suggest
    from stylepipe.search.study import open_study, run_trials

    config = load_config(DEMO, [f"run_dir={tmp_path}", "search.n_trials=3"])

    def objective(trial):
        return suggest(trial, config.search.space)["lr"]

    run_trials(config, open_study(config), objective, progress=False)  # then the process is gone
    resumed = config.with_overrides({"search.n_trials": 6})
    run_trials(resumed, open_study(resumed), objective, progress=False)  # the same command again
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    proposed = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(proposed) == 6 and len(set(proposed)) == 6
    # and it is reproducible: the same study again proposes the same six
    again = load_config(DEMO, [f"run_dir={tmp_path / 'again'}", "search.n_trials=3"])
    run_trials(again, open_study(again), objective, progress=False)
    run_trials(again.with_overrides({"search.n_trials": 6}), open_study(again), objective, progress=False)
    repeat = optuna.load_study(study_name=again.study_name, storage=again.storage_url)
    assert [tuple(sorted(t.params.items())) for t in repeat.trials] == proposed
    # and another search.seed proposes others, not the same ones shifted by a trial
    other = load_config(DEMO, [f"run_dir={tmp_path / 'other'}", "search.n_trials=6", "search.seed=1"])
    run_trials(other, open_study(other), objective, progress=False)
    seeded = optuna.load_study(study_name=other.study_name, storage=other.storage_url)
    assert not {tuple(sorted(t.params.items())) for t in seeded.trials[1:]} & set(proposed)


@pytest.mark.slow
def test_a_second_search_on_a_busy_sqlite_study_is_refused_and_touches_nothing(searched, prepared, capsys):
    config, result = searched
    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.study_name).experiment_id

    def state():
        runs = {r.info.run_id: r.info.status for r in client.search_runs([experiment], max_results=1000)}
        study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
        return runs, len(study.trials), len(client.search_model_versions("name='tiny-style'"))

    before = state()
    args = ["search", "--quiet", "--config", str(DEMO)]
    for override in search_overrides(Path(config.run_dir), prepared, *SEARCHED, "search.n_trials=7"):
        args += ["--set", override]
    with another_process_holds_sqlite(config.storage_url):  # e.g. the first search, confirming
        assert main(args) == 2
    assert "another stylepipe process is working on" in capsys.readouterr().err
    assert state() == before  # no trial, no run, no status change, no registration


def _runs(config):
    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.study_name)
    return [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=1000)


def _wait_for_run(process, config, role: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the search ended before it could be stopped"
        try:
            running = [r for r in _runs(config) if r.info.status == "RUNNING"
                       and r.data.tags.get("stylepipe.role") == role]  # fmt: skip
        except Exception:  # the database is still being created
            running = []
        if running:
            return running[0]
        time.sleep(0.2)
    raise AssertionError(f"no {role} run started")


LONG_REPLAYS = ("search.n_trials=2", "search.space.lr=[1e-4,3e-4]", "train.steps=40", "train.check_every=5",
                "search.eval_every=20", "search.top_k=1", "search.replay_seeds=1", "search.confirm_steps=20", "search.lr_margin=1",
                "final.train=false", "search.heartbeat_interval=1", "search.grace_period=3")  # fmt: skip


@pytest.mark.slow
def test_runs_of_a_killed_search_are_ended_with_the_reason_when_it_resumes(tmp_path, prepared):
    overrides = search_overrides(tmp_path, prepared, *LONG_REPLAYS)
    config = load_config(DEMO, overrides)
    victim = subprocess.Popen(search_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        replay = _wait_for_run(victim, config, "replay")
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait(timeout=30)
    stopped = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert stopped.user_attrs["state"] == "certifying"  # killed in a replay: said so on the study
    assert main(search_command(overrides)[1:]) == 0  # the same command again (in this process)
    runs = {r.info.run_id: r for r in _runs(config)}
    assert [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"] == []
    killed = runs[replay.info.run_id]
    assert killed.info.status == "KILLED"
    assert "process stopped" in killed.data.tags["failure"] and killed.data.tags["outcome"] == "failed"


@pytest.mark.slow
def test_a_search_killed_mid_trial_runs_that_trial_again_at_once_when_resumed(tmp_path, prepared, caplog):
    """SQLite serves one process: a trial found RUNNING belongs to one that died. It is failed
    and queued again at once, not a heartbeat grace period (here 10 minutes) later."""
    overrides = search_overrides(tmp_path, prepared, *LONG_REPLAYS, "search.grace_period=600")
    config = load_config(DEMO, overrides)
    victim = subprocess.Popen(search_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_run = _wait_for_run(victim, config, "trial")
        time.sleep(0.5)  # inside its training
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait(timeout=30)
    (orphan,) = optuna.load_study(study_name=config.study_name, storage=config.storage_url).get_trials(
        states=(optuna.trial.TrialState.RUNNING,)
    )
    caplog.set_level(logging.INFO, logger="stylepipe")
    resumed = []
    assert ends_within(lambda: resumed.append(main(search_command(overrides)[1:])), timeout=120)
    assert resumed == [0]

    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert study.trials[orphan.number].state == optuna.trial.TrialState.FAIL
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert retry.params == orphan.params and retry.state == optuna.trial.TrialState.COMPLETE
    assert f"trial {orphan.number}: its process stopped (killed or lost)" in caplog.text
    killed = MlflowClient(tracking_uri=config.tracking_uri).get_run(killed_run.info.run_id)
    assert killed.info.status == "KILLED" and "its process stopped" in killed.data.tags["failure"]
    assert [r.info.run_name for r in _runs(config) if r.info.status == "RUNNING"] == []


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_leaves_no_run_running(tmp_path, prepared):
    overrides = search_overrides(tmp_path, prepared, *LONG_REPLAYS)
    config = load_config(DEMO, overrides)
    # a shell's background job (CI may be one) starts with SIGINT ignored: give the child Ctrl-C back
    search = subprocess.Popen(search_command(overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    trial = _wait_for_run(search, config, "trial")
    time.sleep(0.5)  # inside its training
    search.send_signal(signal.SIGINT)
    out, err = search.communicate(timeout=120)
    assert search.returncode == 130, out + err
    assert "Traceback" not in out + err and "interrupted" in err
    runs = {r.info.run_id: r for r in _runs(config)}
    assert [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"] == []
    stopped = runs[trial.info.run_id]
    assert stopped.info.status == "FAILED" and stopped.data.tags["failure"].startswith("interrupted")
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert study.trials[-1].state == optuna.trial.TrialState.FAIL
