"""Long runs: a killed run resumes as if never stopped; a late spike is recovered from."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from stylepipe.cli import main
from stylepipe.config import load_config
from stylepipe.data.sources import RandomBatches, load_content_images
from stylepipe.train import TrainingHalted
from stylepipe.train.callbacks import Callback
from stylepipe.train.recipe import train_from_config
from tests.conftest import DEMO
from tests.test_search import prepared, search_command, search_config, search_overrides  # noqa: F401

STYLEPIPE = str(Path(sys.executable).parent / "stylepipe")
LONG = ["data.image_size=32", "train.batch_size=2", "train.steps=60", "train.check_every=5",
        "train.checkpoint_every=10", "train.device=cpu", "train.warmup_steps=5"]  # fmt: skip


def train_command(run_dir: Path, *extra: str) -> list[str]:
    args = [STYLEPIPE, "train", "--config", str(DEMO), "--set", f"run_dir={run_dir}"]
    for override in (*LONG, *extra):
        args += ["--set", override]
    return args


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_as_if_never_stopped(tmp_path):
    whole = tmp_path / "whole"
    uninterrupted = subprocess.run(train_command(whole), capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    killed = tmp_path / "killed"
    victim = subprocess.Popen(train_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000020.pt").exists():  # past its second checkpoint
        assert victim.poll() is None and time.monotonic() < deadline, "it ended before it could be killed"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.2))  # 40 steps more take longer: killed before its end
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)

    resumed = subprocess.run(train_command(killed), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint at step" in resumed.stderr
    step = int(resumed.stderr.split("resumed from the checkpoint at step ")[1].split()[0])
    assert 20 <= step < 60, step
    # CPU kernels are deterministic: the same weights to the bit, and the same metrics history
    mine, reference = (
        load_file(str(killed / "model.safetensors")),
        load_file(str(whole / "model.safetensors")),
    )
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in mine)
    assert (killed / "metrics.csv").read_text() == (whole / "metrics.csv").read_text()
    assert list(pd.read_csv(killed / "metrics.csv")["step"]) == list(range(1, 61))  # each step once


def test_a_run_with_other_settings_is_not_resumed_and_fresh_starts_over(tmp_path, capsys):
    args = ["train", "--config", str(DEMO), "--set", f"run_dir={tmp_path}"]
    for override in (*LONG, "train.steps=10"):
        args += ["--set", override]
    assert main(args) == 0
    assert main([*args, "--set", "train.steps=15"]) == 0  # more steps: it goes on from step 10
    assert "resumed from the checkpoint at step 10" in capsys.readouterr().err
    assert list(pd.read_csv(tmp_path / "metrics.csv")["step"]) == list(range(1, 16))

    assert main([*args, "--set", "train.lr=0.01", "--set", "loss.style_weight=2e5"]) == 2
    err = capsys.readouterr().err
    assert (
        "written with other settings: loss.style_weight (100000.0 -> 200000.0), train.lr (0.001 -> 0.01)"
        in err
    )
    assert "--fresh" in err
    assert main([*args, "--set", "train.lr=0.01", "--fresh"]) == 0
    assert "resumed" not in capsys.readouterr().err
    assert list(pd.read_csv(tmp_path / "metrics.csv")["step"]) == list(range(1, 11))


class SlowSteps(Callback):
    """A stand-in clock for LongRun: every step takes 25 s."""

    def __init__(self):
        self.now = 0.0

    def on_metrics(self, rows):
        self.now += 25.0 * len(rows)


def test_checkpoint_minutes_adds_checkpoints_when_steps_are_slow(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from stylepipe.train import long_run
    from stylepipe.train.long_run import checkpoints

    kept = []
    for minutes in (None, 3):  # a check every 5 steps (125 s): 3 minutes pass at every second check
        clock = SlowSteps()
        monkeypatch.setattr(long_run, "time", SimpleNamespace(monotonic=lambda clock=clock: clock.now))
        every = [f"train.checkpoint_minutes={minutes}"] if minutes else []
        config = long_config(tmp_path / str(minutes), "train.steps=20", "train.checkpoint_every=1000",
                             "train.keep_checkpoints=10", *every)  # fmt: skip
        train_from_config(config, callbacks=[clock])
        kept.append(
            [
                int(path.stem.removeprefix("step-"))
                for path in checkpoints(tmp_path / str(minutes) / "checkpoints")
            ]
        )
    assert kept == [[0, 20], [0, 10, 20]]


class PoisonedBatches(RandomBatches):
    """Real batches, except the ones drawn for the given steps carry a NaN pixel."""

    def __init__(self, images, batch_size, poisoned: set[int]):
        super().__init__(images, batch_size, seed=0)
        self.poisoned = poisoned
        self.draws = 0

    def __next__(self):
        batch = super().__next__().float().div(255)
        self.draws += 1
        if self.draws in self.poisoned:
            batch[0, 0, 3, 3] = math.nan
        return batch

    def state_dict(self):
        return {**super().state_dict(), "draws": self.draws}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.draws = state["draws"]


def long_config(tmp_path, *extra):
    overrides = [f"run_dir={tmp_path}", *LONG, "train.steps=40", *extra]
    return load_config(DEMO, overrides)


def poisoned(config, steps: set[int]) -> PoisonedBatches:
    return PoisonedBatches(load_content_images(config.data.content, config.data.image_size), 2, steps)


def test_a_late_spike_is_recovered_from_with_recovery_on_and_halts_the_run_with_it_off(tmp_path):
    off = long_config(tmp_path / "off", "train.recovery=false")
    with pytest.raises(TrainingHalted) as halted:
        train_from_config(off, batches=poisoned(off, {23}))
    assert (halted.value.autopsy.step, halted.value.autopsy.cause) == (23, "bad_input")

    on = long_config(tmp_path / "on")
    output = train_from_config(on, batches=poisoned(on, {23}))
    [event] = output.recoveries
    assert (event["halted_at_step"], event["cause"], event["first_nonfinite"]) == (23, "bad_input", "input")
    assert (event["resumed_from_step"], event["skipped_batches"]) == (20, 3)  # the poisoned batch is skipped
    assert event["lr"] == pytest.approx([1e-3, 5e-4])  # recovery.lr_factor 0.5
    assert event["clip_norm"] == pytest.approx([10.0, 5.0])  # recovery.clip_factor 0.5 (the demo clips at 10)
    metrics = pd.read_csv(tmp_path / "on" / "metrics.csv")
    assert list(metrics["step"]) == list(range(1, 41))  # each step once: the abandoned stretch is not there
    assert metrics["loss/total"].notna().all() and math.isfinite(metrics["loss/total"].max())
    assert metrics.loc[metrics["step"] > 20, "lr"].max() == pytest.approx(5e-4)
    assert load_file(str(tmp_path / "on" / "model.safetensors"))  # the model was written


def test_a_spike_that_always_comes_back_ends_after_max_attempts_with_every_autopsy(tmp_path, capsys):
    args = ["train", "--config", str(DEMO), "--set", f"run_dir={tmp_path}"]
    for override in (
        *LONG,
        "train.steps=20",
        "train.lr=1e6",
        "train.clip_norm=null",
        "recovery.max_attempts=2",
    ):
        args += ["--set", override]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "gave up after 2 recoveries" in err and "parameter_blowup" in err
    autopsy = json.loads((tmp_path / "autopsy.json").read_text())
    assert autopsy["cause"] == "parameter_blowup"
    attempts = autopsy["recoveries"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert all(a["autopsy"]["cause"] and a["autopsy"]["step"] == a["halted_at_step"] for a in attempts)
    assert [a["lr"][1] for a in attempts] == pytest.approx([5e5, 2.5e5])  # compounded per attempt
    assert not (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------- the final model of a study

SAFEST = {"trial": 0, "params": {"lr": 1e-3, "clip_norm": 10.0, "content_weight": 1.0, "style_weight": 1e5,
                                 "tv_weight": 1e-6},
          "certificate": {"text": "stayed finite and did not diverge for 8 steps with seed 1 at its learning rate",
                          "seeds": [1], "lr_margin": 1.0, "horizon_steps": 8, "weakened": None}}  # fmt: skip


class DyingBatches(RandomBatches):
    """Real batches until the given draw, where the process dies (as by Ctrl-C)."""

    def __init__(self, images, batch_size, at: int):
        super().__init__(images, batch_size, seed=0)
        self.at, self.draws = at, 0

    def __next__(self):
        self.draws += 1
        if self.draws == self.at:
            raise KeyboardInterrupt
        return super().__next__()


def test_a_final_run_that_died_resumes_on_a_machine_without_its_checkpoints(tmp_path, prepared, monkeypatch):  # noqa: F811
    """The final run's checkpoints are mirrored to its MLflow run: a retry on another machine
    (here: the same stores, the checkpoint folder gone) resumes it in the same run."""
    from mlflow import MlflowClient

    from stylepipe import stages
    from stylepipe.search import objective

    config = search_config(tmp_path, prepared, "tracking.final_steps=30", "train.checkpoint_every=10",
                           "train.check_every=5", "tracking.log_every=1", "tracking.registered_model=moved")  # fmt: skip
    with monkeypatch.context() as patched:
        patched.setattr(objective, "RandomBatches",
                        lambda images, batch_size, seed: DyingBatches(images, batch_size, at=23))  # fmt: skip
        with pytest.raises(KeyboardInterrupt), stages.StudySession(config) as session:
            stages.train_final(config, SAFEST, session)
    client = MlflowClient(tracking_uri=config.tracking_uri)
    first = optuna.load_study(study_name=config.study_name, storage=config.storage_url).user_attrs[
        "final_run"
    ]
    shutil.rmtree(tmp_path / "checkpoints")  # another machine: none of this one's files

    with stages.StudySession(config) as session:
        final = stages.train_final(config, SAFEST, session)
    assert final["run_id"] == first and final["resumed_from"] == 20
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.tags["stylepipe.resumed_at_step"] == "20"
    steps = [m.step for m in client.get_metric_history(first, "loss/total")]
    assert sorted(steps) == list(range(1, 31))  # each step once
    assert {f.path for f in client.list_artifacts(first, "checkpoint")} == {
        "checkpoint/a.safetensors", "checkpoint/b.safetensors", "checkpoint/latest.json"}  # fmt: skip

    # a copy that does not match the SHA-256 its pointer recorded (an upload cut short) is not used
    from stylepipe.tracking import Tracker

    pointer = json.loads(
        Path(client.download_artifacts(first, "checkpoint/latest.json", str(tmp_path))).read_text()
    )
    broken = tmp_path / "broken" / pointer["slot"]
    broken.parent.mkdir()
    broken.write_bytes(b"cut short")
    client.log_artifact(first, str(broken), "checkpoint")
    elsewhere = tmp_path / "elsewhere"
    assert Tracker(config.tracking_uri, config.study_name).fetch_checkpoint(first, elsewhere) is None
    assert not list(elsewhere.glob("*.pt"))


def test_the_final_model_recovers_from_a_spike_and_the_mlflow_run_shows_it(tmp_path, prepared, monkeypatch):  # noqa: F811
    from mlflow import MlflowClient

    from stylepipe import stages
    from stylepipe.search import objective

    config = search_config(tmp_path, prepared, "tracking.final_steps=30", "train.checkpoint_every=10",
                           "train.check_every=5", "tracking.log_every=1", "tracking.registered_model=spiky")  # fmt: skip
    monkeypatch.setattr(objective, "RandomBatches",
                        lambda images, batch_size, seed: PoisonedBatches(images, batch_size, {17}))  # fmt: skip
    with stages.StudySession(config) as session:
        final = stages.train_final(config, SAFEST, session)
    assert final["recoveries"] == 1
    client = MlflowClient(tracking_uri=config.tracking_uri)
    run = client.get_run(final["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["stylepipe.recoveries"] == "1"
    summary = run.data.tags["stylepipe.recovery.1"]
    assert "halted at step 17" in summary and "bad_input" in summary and "back to step 10" in summary
    assert "lr 0.001 -> 0.0005" in summary
    event = json.loads(
        Path(client.download_artifacts(run.info.run_id, "recoveries/attempt-1.json")).read_text()
    )
    assert event["autopsy"]["first_nonfinite"] == "input" and event["skipped_batches"] == 7
    assert [m.step for m in client.get_metric_history(run.info.run_id, "recovery/count")] == [17]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert steps == list(range(1, 31))  # each step once: the abandoned stretch 11-17 is not there
    # the final run is the certificate's last test: it needed a recovery, so it is weakened
    weakened = final["safest"]["certificate"]["weakened"]
    assert weakened == "its 30-step final run needed 1 recoveries"
    assert json.loads((tmp_path / "safest.json").read_text())["certificate"]["weakened"] == weakened
    # how far the model moves images toward the style, on the run and on its registered version
    metrics = run.data.metrics
    for measure in ("texture", "palette"):
        before, after = metrics[f"final/style_{measure}_inputs"], metrics[f"final/style_{measure}_outputs"]
        assert metrics[f"final/style_{measure}_ratio"] == pytest.approx(after / before)
    registered = stages.register(config, final)
    version = client.get_model_version("spiky", registered["version"])
    assert version.tags["recoveries"] == "1" and version.tags["certificate"].endswith(f"weakened: {weakened}")
    assert version.tags["style"].startswith(f"texture x{metrics['final/style_texture_ratio']:.2f}, palette x")
    # and the next scheduled run re-checks it at a lower learning rate first
    assert stages.previous_safest(config)["lr"] == pytest.approx(1e-3 * config.recovery.lr_factor)


@pytest.mark.slow
def test_a_killed_final_run_resumes_in_the_same_mlflow_run(tmp_path, prepared):  # noqa: F811
    from mlflow import MlflowClient

    overrides = search_overrides(tmp_path, prepared, "search.n_trials=2", "search.space.lr=[1e-4,3e-4]",
                                 "search.top_k=1", "search.replay_seeds=0", "tracking.final_steps=80",
                                 "train.checkpoint_every=10", "train.check_every=5", "tracking.log_every=1",
                                 "tracking.registered_model=resumed-style")  # fmt: skip
    config = load_config(DEMO, overrides)
    victim = subprocess.Popen(search_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "checkpoints" / f"{config.study_name}-final"
    deadline = time.monotonic() + 240
    while not (folder / "step-00000010.pt").exists():
        assert victim.poll() is None and time.monotonic() < deadline, (
            "the search ended before it could be killed"
        )
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    resumed = subprocess.run(search_command(overrides), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.study_name)
    finals = [r for r in client.search_runs([experiment.experiment_id])
              if r.data.tags.get("stylepipe.role") == "final"]  # fmt: skip
    assert len(finals) == 1  # the same run before and after
    final = finals[0]
    assert final.info.status == "FINISHED" and "failure" not in final.data.tags
    assert int(final.data.tags["stylepipe.resumed_at_step"]) >= 10
    steps = [m.step for m in client.get_metric_history(final.info.run_id, "loss/total")]
    assert sorted(steps) == list(range(1, 81))  # each step once, no gap
    version = client.get_model_version_by_alias("resumed-style", "safest")
    assert version.run_id == final.info.run_id
