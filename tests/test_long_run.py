"""Long runs: a killed run resumes as if never stopped; a late spike is recovered from; nothing
non-finite is kept; a checkpoint read back (here or from the mirror) is untrusted input."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from stylepipe.cli import main
from stylepipe.config import load_config
from stylepipe.data.sources import RandomBatches, load_content_images
from stylepipe.session import StudySession
from stylepipe.train import TrainingHalted
from stylepipe.train.callbacks import Callback
from stylepipe.train.checkpoints import (
    MIRROR_POINTER,
    MIRROR_SLOTS,
    fetch_mirrored,
    nonfinite_tensors,
    write_state,
)
from stylepipe.train.lifecycle import RunStateError
from stylepipe.train.long_run import describe_recovery
from stylepipe.train.recipe import train_from_config, train_run_folder
from tests.helpers import DEMO, SAFEST, StopAt, search_command, search_config, search_overrides

STYLEPIPE = str(Path(sys.executable).parent / "stylepipe")
KILL_DELAYS = random.Random(19)  # where in a stretch the kill tests kill: seeded, the same every run
# The loss network up to relu2_2: these tests are about the run, not its style.
LONG = ["data.image_size=32", "train.batch_size=2", "train.steps=60", "train.check_every=5",
        "train.checkpoint_every=10", "train.device=cpu", "train.warmup_steps=5",
        "loss.style_layers=[relu1_2,relu2_2]"]  # fmt: skip


def train_command(run_dir: Path, *extra: str) -> list[str]:
    args = [STYLEPIPE, "train", "--config", str(DEMO), "--set", f"run_dir={run_dir}"]
    for override in (*LONG, *extra):
        args += ["--set", override]
    return args


def long_config(run_dir, *extra):
    return load_config(DEMO, [f"run_dir={run_dir}", *LONG, "train.steps=40", *extra])


def folder_of(config) -> Path:
    return train_run_folder(config).path


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_as_if_never_stopped(tmp_path):
    whole = tmp_path / "whole"
    assert main(train_command(whole)[1:]) == 0  # the reference, in this process
    same_threads = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same kernels

    killed = tmp_path / "killed"
    folder = folder_of(load_config(DEMO, [f"run_dir={killed}", *LONG]))
    victim = subprocess.Popen(train_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=same_threads)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (folder / "checkpoints" / "step-00000020.pt").exists():  # past its second checkpoint
        assert victim.poll() is None and time.monotonic() < deadline, "it ended before it could be killed"
        time.sleep(0.02)
    time.sleep(KILL_DELAYS.uniform(0.0, 0.2))  # 40 steps more take longer: killed before its end
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert json.loads((folder / "run.json").read_text())["state"] == "running"  # as the kill left it

    resumed = subprocess.run(
        train_command(killed), capture_output=True, text=True, timeout=300, env=same_threads
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint at step" in resumed.stderr
    step = int(resumed.stderr.split("resumed from the checkpoint at step ")[1].split()[0])
    assert 20 <= step < 60, step
    # CPU kernels are deterministic: the same weights to the bit, and the same metrics history
    reference = folder_of(load_config(DEMO, [f"run_dir={whole}", *LONG]))
    mine, theirs = (
        load_file(str(folder / "model.safetensors")),
        load_file(str(reference / "model.safetensors")),
    )
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert (folder / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    assert list(pd.read_csv(folder / "metrics.csv")["step"]) == list(range(1, 61))  # each step once
    assert json.loads((folder / "run.json").read_text())["state"] == "finished"


class SlowSteps(Callback):
    """A stand-in clock for LongRun: every step takes 25 s."""

    def __init__(self):
        self.now = 0.0

    def on_metrics(self, rows):
        self.now += 25.0 * len(rows)


def test_checkpoint_minutes_adds_checkpoints_when_steps_are_slow(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from stylepipe.train import long_run

    kept = []
    for minutes in (None, 3):  # a check every 5 steps (125 s): 3 minutes pass at every second check
        clock = SlowSteps()
        monkeypatch.setattr(long_run, "time", SimpleNamespace(monotonic=lambda clock=clock: clock.now))
        every = [f"train.checkpoint_minutes={minutes}"] if minutes else []
        config = long_config(tmp_path / str(minutes), "train.steps=20", "train.checkpoint_every=1000",
                             "train.keep_checkpoints=10", *every)  # fmt: skip
        train_from_config(config, callbacks=[clock])
        kept.append(
            sorted(
                int(p.stem.removeprefix("step-")) for p in (folder_of(config) / "checkpoints").glob("*.pt")
            )
        )
    assert kept == [[0, 20], [0, 10, 20]]


class PoisonedBatches(RandomBatches):
    """Real batches, except the ones drawn for the given draws carry a NaN pixel."""

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


def poisoned(config, draws: set[int]) -> PoisonedBatches:
    return PoisonedBatches(load_content_images(config.data.content, config.data.image_size), 2, draws)


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
    metrics = pd.read_csv(output.metrics_csv)
    assert list(metrics["step"]) == list(range(1, 41))  # each step once: the abandoned stretch is not there
    assert metrics["loss/total"].notna().all() and math.isfinite(metrics["loss/total"].max())
    assert metrics.loc[metrics["step"] > 20, "lr"].max() == pytest.approx(5e-4)
    assert load_file(str(output.model))  # the model was written
    assert json.loads((output.folder / "run.json").read_text())["recoveries"][0]["attempt"] == 1


def test_recoveries_compound_from_the_runs_settings_and_the_clip_never_loosens(tmp_path):
    """With one checkpoint kept, the second and third attempts go back to a checkpoint written
    after the first recovery, at its lower learning rate: that lr must not be compounded again.
    With clipping off, the clip a recovery turns on comes from the good steps and only tightens."""
    config = long_config(
        tmp_path, "train.keep_checkpoints=1", "train.clip_norm=null", "recovery.max_attempts=3"
    )
    with pytest.raises(TrainingHalted) as halted:  # draws past 30 keep coming back poisoned
        train_from_config(config, batches=poisoned(config, {23, 36, 41, 47, 53, 59}))
    events = halted.value.recoveries
    assert [e["attempt"] for e in events] == [1, 2, 3]
    assert [e["resumed_from_step"] for e in events] == [
        20,
        30,
        30,
    ]  # back to checkpoints written after attempt 1
    assert [e["lr"][1] for e in events] == pytest.approx(
        [1e-3 * 0.5, 1e-3 * 0.25, 1e-3 * 0.125]
    )  # 0.5 ** attempt
    clips = [e["clip_norm"][1] for e in events]
    assert clips == sorted(clips, reverse=True) and len(set(clips)) == 3  # tighter at each attempt
    shown = describe_recovery(events[0])  # what a person reads: three figures, not 42774.126953125
    assert f"lr 0.001 -> 0.0005, clip off -> {clips[0]:.3g}" in shown and str(clips[0]) not in shown
    metrics = pd.read_csv(halted.value.output.metrics_csv)
    good = metrics.loc[metrics["step"] <= 20, "grad_norm/total"]  # the steps checkpoint 20 covers
    assert events[0]["clip_base"] == pytest.approx(float(good.tail(50).median()))
    assert clips == pytest.approx([events[0]["clip_base"] * 0.5**k for k in (1, 2, 3)])
    autopsy = json.loads(halted.value.output.autopsy_json.read_text())
    assert [a["attempt"] for a in autopsy["recoveries"]] == [1, 2, 3]  # the failed run lists its attempts


def test_a_spike_that_always_comes_back_ends_after_max_attempts_with_every_autopsy(tmp_path, capsys):
    args = ["train", "--config", str(DEMO), "--set", f"run_dir={tmp_path}"]
    extra = (*LONG, "train.steps=20", "train.lr=1e6", "train.clip_norm=null", "recovery.max_attempts=2")
    for override in extra:
        args += ["--set", override]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "gave up after 2 recoveries" in err and "parameter_blowup" in err
    assert "attempt 1: halted at step" in err and "attempt 2: halted at step" in err  # each attempt listed
    folder = folder_of(load_config(DEMO, [f"run_dir={tmp_path}", *extra]))
    autopsy = json.loads((folder / "autopsy.json").read_text())
    assert autopsy["cause"] == "parameter_blowup"
    attempts = autopsy["recoveries"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert all(a["autopsy"]["cause"] and a["autopsy"]["step"] == a["halted_at_step"] for a in attempts)
    assert [a["lr"][1] for a in attempts] == pytest.approx([5e5, 2.5e5])  # compounded per attempt
    assert not (folder / "model.safetensors").exists()


def test_with_the_guards_off_a_run_that_goes_nan_writes_no_model_and_no_bad_checkpoint(tmp_path, capsys):
    """Before: exit 0, "final total loss nan", every tensor of the model and of its 'good'
    checkpoints NaN; stylize then painted every image black."""
    extra = (*LONG, "train.steps=20", "guard.enabled=false", "train.lr=1e30", "recovery.max_attempts=1")
    args = ["train", "--config", str(DEMO), "--set", f"run_dir={tmp_path}"]
    for override in extra:
        args += ["--set", override]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "the guards were off" in err
    folder = folder_of(load_config(DEMO, [f"run_dir={tmp_path}", *extra]))
    assert not (folder / "model.safetensors").exists()
    saved = list((folder / "checkpoints").glob("*.pt"))
    assert saved and all(not nonfinite_tensors(torch.load(p, weights_only=True)["model"]) for p in saved)
    assert json.loads((folder / "run.json").read_text())["state"] == "halted"


def test_a_broken_newest_checkpoint_falls_back_to_the_one_before_and_stale_temporaries_go(tmp_path, caplog):
    config = long_config(tmp_path, "train.steps=30")
    with pytest.raises(KeyboardInterrupt):
        train_from_config(config, callbacks=[StopAt(25)])
    folder = folder_of(config)
    assert json.loads((folder / "run.json").read_text())["state"] == "interrupted"
    newest = folder / "checkpoints" / "step-00000020.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut short
    stale = folder / "checkpoints" / ".step-00000030.4242.tmp.pt"  # a kill during a write left it
    stale.write_bytes(b"\0" * 4096)
    foreign = folder / "checkpoints" / "step-latest.pt"  # not a name stylepipe writes: never read
    foreign.write_bytes(b"mine")
    output = train_from_config(config)
    assert output.resumed_from == 10
    assert any("step-00000020.pt: it cannot be read" in why for why in output.skipped)
    assert not stale.exists() and foreign.read_bytes() == b"mine"
    assert list(pd.read_csv(output.metrics_csv)["step"]) == list(range(1, 31))


# ---------------------------------------------------------------- the mirror is untrusted input


class FakeMirror:
    """A mirror in memory that records every name it is asked for."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.asked: list[str] = []

    def upload(self, path, name):
        self.files[name] = Path(path).read_bytes()

    def download(self, name, folder):
        self.asked.append(name)
        if name not in self.files:
            return None
        (Path(folder) / name).write_bytes(self.files[name])
        return Path(folder) / name


def _mirrored(tmp_path, state, slot="a.safetensors", sha=None) -> FakeMirror:
    import hashlib

    body = write_state(tmp_path / "copy.safetensors", state).read_bytes()
    pointer = {"slot": slot, "step": state["step"], "sha256": sha or hashlib.sha256(body).hexdigest()}
    return FakeMirror({slot: body, MIRROR_POINTER: json.dumps(pointer).encode()})


def test_a_mirrored_checkpoint_is_used_only_when_it_is_whole_and_one_of_this_runs(tmp_path):
    from stylepipe.train.checkpoints import STATE_KEYS

    settings = {"train.lr": 0.001}
    state = {key: None for key in STATE_KEYS} | {"step": 20, "settings": settings, "recoveries": [],
                                                "model": {"w": torch.ones(2)}, "history": []}  # fmt: skip
    good = _mirrored(tmp_path, state)
    fetched, why = fetch_mirrored(good, settings)
    assert why is None and fetched["step"] == 20 and torch.equal(fetched["model"]["w"], torch.ones(2))
    assert fetch_mirrored(FakeMirror({}), settings) == (None, None)  # nothing mirrored

    traversal = _mirrored(tmp_path, state)
    traversal.files[MIRROR_POINTER] = json.dumps({"slot": "../../evil.safetensors", "step": 20,
                                                  "sha256": "0" * 64}).encode()  # fmt: skip
    pickled = _mirrored(tmp_path, state)
    torch.save({"step": 20}, tmp_path / "p.pt")
    pickled.files["a.safetensors"] = (tmp_path / "p.pt").read_bytes()
    import hashlib

    pickled.files[MIRROR_POINTER] = json.dumps({"slot": "a.safetensors", "step": 20, "sha256": hashlib.sha256(
        pickled.files["a.safetensors"]).hexdigest()}).encode()  # fmt: skip
    garbled = _mirrored(tmp_path, state)
    garbled.files[MIRROR_POINTER] = b"{not json"
    missing_tensor = _mirrored(tmp_path, state)
    body = missing_tensor.files["a.safetensors"]
    assert b'\\"$tensor\\": \\"0\\"' in body  # the tree, as JSON inside the header's JSON
    missing_tensor.files["a.safetensors"] = body.replace(b'\\"$tensor\\": \\"0\\"', b'\\"$tensor\\": \\"9\\"')
    missing_tensor.files[MIRROR_POINTER] = json.dumps({"slot": "a.safetensors", "step": 20, "sha256": hashlib.sha256(
        missing_tensor.files["a.safetensors"]).hexdigest()}).encode()  # fmt: skip
    other_settings = _mirrored(tmp_path, {**state, "settings": {"train.lr": 0.01}})
    cut_short = _mirrored(tmp_path, state, sha="1" * 64)
    nan_model = _mirrored(tmp_path, {**state, "model": {"w": torch.tensor([1.0, math.nan])}})
    cases = {"../../evil.safetensors": traversal, "is not a state written by stylepipe": pickled,
             "cannot be read": garbled, "not a state written by stylepipe": missing_tensor,
             "written with other settings: train.lr (0.01 -> 0.001)": other_settings,
             "does not match the SHA-256": cut_short, "not finite": nan_model}  # fmt: skip
    for fragment, mirror in cases.items():
        fetched, why = fetch_mirrored(mirror, settings)
        assert fetched is None and fragment in why, (fragment, why)
        assert "\n" not in why
        assert set(mirror.asked) <= {MIRROR_POINTER, *MIRROR_SLOTS}  # never a name read from the pointer


def test_the_registry_takes_no_model_that_is_not_finite(tmp_path):
    from mlflow import MlflowClient
    from safetensors.torch import save_file

    from stylepipe.nets import TransformerNet
    from stylepipe.registry import RegistryError, log_model

    state = {k: v.clone() for k, v in TransformerNet().state_dict().items()}
    state["encoder_in.1.weight"][0] = math.inf
    save_file(state, str(tmp_path / "inf.safetensors"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri()))
    with pytest.raises(RegistryError, match="hold NaN or Inf"):
        log_model(uri, run.info.run_id, tmp_path / "inf.safetensors", {})
    assert (
        not client.list_artifacts(run.info.run_id)
        and client.get_run(run.info.run_id).info.status == "RUNNING"
    )


def test_the_mlflow_mirror_takes_only_plain_file_names():
    from stylepipe.tracking import RunArtifacts

    mirror = RunArtifacts(client=None, run_id="x")  # refused before the store is asked anything
    for name in ("../evil.safetensors", "a/b.safetensors", "..", ""):
        with pytest.raises(ValueError, match="not a plain file name"):
            mirror.download(name, Path("/tmp"))


# ---------------------------------------------------------------- the final model of a study


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


def _interrupted_final_run(config, monkeypatch) -> str:
    """A final run killed at step 23 (checkpoints 0, 10, 20, mirrored); its MLflow run id."""
    import optuna

    from stylepipe import stages
    from stylepipe.search import candidate

    with monkeypatch.context() as patched:
        patched.setattr(candidate, "RandomBatches",
                        lambda images, batch_size, seed: DyingBatches(images, batch_size, at=23))  # fmt: skip
        with pytest.raises(KeyboardInterrupt), StudySession(config) as session:
            stages.train_final(config, SAFEST, session)
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    [record] = [v for k, v in study.user_attrs.items() if k.startswith("final_run:")]
    return record["run_id"]


FINAL = (
    "final.steps=30",
    "train.checkpoint_every=10",
    "train.check_every=5",
    "tracking.log_every=1",
)


def test_a_final_run_that_died_resumes_on_a_machine_without_its_checkpoints(tmp_path, prepared, monkeypatch):
    """The final run's checkpoints are mirrored to its MLflow run: a retry on another machine
    (here: the same stores, the run folder gone) resumes it in the same run."""
    from mlflow import MlflowClient

    from stylepipe import stages

    config = search_config(tmp_path, prepared, *FINAL, "tracking.registered_model=moved")
    first = _interrupted_final_run(config, monkeypatch)
    client = MlflowClient(tracking_uri=config.tracking_uri)
    assert client.get_run(first).info.status == "FAILED"

    # its checkpoints here cut short, and no copy to fetch: refused, saying how to start over
    [folder] = (tmp_path / "final").iterdir()
    for saved in (folder / "checkpoints").glob("*.pt"):
        saved.write_bytes(b"cut short")
    unmirrored = config.with_overrides({"final.mirror_checkpoints": False})
    with (
        pytest.raises(RunStateError, match=f"remove {folder} to start the final run over"),
        StudySession(unmirrored) as session,
    ):
        stages.train_final(unmirrored, SAFEST, session)
    assert (
        len(client.search_runs([client.get_run(first).info.experiment_id])) == 2
    )  # no new run: study, final

    shutil.rmtree(tmp_path / "final")  # another machine: none of this one's files

    with StudySession(config) as session:
        final = stages.train_final(config, SAFEST, session)
    assert final.run_id == first and final.resumed_from == 20 and not final.reused
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.tags["stylepipe.resumed_at_step"] == "20"
    assert run.data.tags["stylepipe.state"] == "finished" and "failure" not in run.data.tags
    steps = [m.step for m in client.get_metric_history(first, "loss/total")]
    assert sorted(steps) == list(range(1, 31))  # each step once
    assert {f.path for f in client.list_artifacts(first, "checkpoint")} == {
        "checkpoint/a.safetensors", "checkpoint/b.safetensors", "checkpoint/latest.json"}  # fmt: skip

    # finished: the stage again trains nothing and rewrites nothing
    before = (run.data.tags, run.data.metrics, run.info.end_time)
    with StudySession(config) as session:
        again = stages.train_final(config, SAFEST, session)
    assert again.reused and again.run_id == first and again.model_sha256 == final.model_sha256
    after = client.get_run(first)
    assert (after.data.tags, after.data.metrics, after.info.end_time) == before


def test_a_mirrored_copy_that_cannot_be_used_is_said_and_the_abandoned_run_is_ended(
    tmp_path,
    prepared,
    monkeypatch,
):
    """Before: a pickle in the slot was a traceback, and the old final run stayed RUNNING forever."""
    import hashlib

    from mlflow import MlflowClient

    from stylepipe import stages

    config = search_config(tmp_path, prepared, *FINAL, "tracking.registered_model=tampered")
    first = _interrupted_final_run(config, monkeypatch)
    shutil.rmtree(tmp_path / "final")
    client = MlflowClient(tracking_uri=config.tracking_uri)
    evil = tmp_path / "evil" / "a.safetensors"
    evil.parent.mkdir()
    torch.save({"step": 20}, evil)  # a pickle where the copy was
    client.log_artifact(first, str(evil), "checkpoint")
    pointer = tmp_path / "evil" / "latest.json"
    pointer.write_text(json.dumps({"slot": "a.safetensors", "step": 20,
                                   "sha256": hashlib.sha256(evil.read_bytes()).hexdigest()}))  # fmt: skip
    client.log_artifact(first, str(pointer), "checkpoint")

    with StudySession(config) as session:
        final = stages.train_final(config, SAFEST, session)
    assert final.run_id != first and final.resumed_from is None  # started over, in a new run
    abandoned = client.get_run(first)
    assert abandoned.info.status == "KILLED"
    assert abandoned.data.tags["failure"].startswith("abandoned: its checkpoint copy cannot be used: a.safetensors "
                                                     "is not a state written by stylepipe")  # fmt: skip


def test_the_final_model_recovers_from_a_spike_and_the_mlflow_run_shows_it(tmp_path, prepared, monkeypatch):
    from mlflow import MlflowClient

    from stylepipe import stages
    from stylepipe.search import candidate

    config = search_config(tmp_path, prepared, *FINAL, "tracking.registered_model=spiky",
                           "final.system_metrics_every_s=0.2")  # fmt: skip
    monkeypatch.setattr(candidate, "RandomBatches",
                        lambda images, batch_size, seed: PoisonedBatches(images, batch_size, {17}))  # fmt: skip
    with StudySession(config) as session:
        final = stages.train_final(config, SAFEST, session)
    assert final.recoveries == 1
    client = MlflowClient(tracking_uri=config.tracking_uri)
    run = client.get_run(final.run_id)
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
    weakened = final.safest.certificate.weakened
    assert weakened == "its 30-step final run needed 1 recoveries"
    # and so is the next run's warm start (safest.json is written by the report stage)
    assert json.loads((tmp_path / "last_safest.json").read_text())["certificate"]["weakened"] == weakened
    # how far the model moves images toward the style, on the run and on its registered version
    metrics = run.data.metrics
    for measure in ("texture", "palette"):
        before, after = metrics[f"final/style_{measure}_inputs"], metrics[f"final/style_{measure}_outputs"]
        assert metrics[f"final/style_{measure}_ratio"] == pytest.approx(after / before)
    # MLflow's own system metrics, sampled while it trained
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    registered = stages.register(config, final)
    version = client.get_model_version("spiky", registered["version"])
    assert version.tags["recoveries"] == "1" and version.tags["certificate"].endswith(f"weakened: {weakened}")
    assert "1 recovery" in version.description and weakened in version.description
    assert version.tags["style"].startswith(f"texture x{metrics['final/style_texture_ratio']:.2f}, palette x")
    assert stages.register(config, final)["version"] == registered["version"]  # registered once
    # and the next scheduled run re-checks it at a lower learning rate first
    assert stages.previous_safest(config)["lr"] == pytest.approx(1e-3 * config.recovery.lr_factor)


@pytest.mark.slow
def test_a_killed_final_run_resumes_in_the_same_mlflow_run(tmp_path, prepared):
    from mlflow import MlflowClient

    overrides = search_overrides(tmp_path, prepared, "search.n_trials=2", "search.space.lr=[1e-4,3e-4]",
                                 "search.top_k=1", "search.replay_seeds=0", "final.steps=80",
                                 "train.checkpoint_every=10", "train.check_every=5", "tracking.log_every=1",
                                 "tracking.registered_model=resumed-style")  # fmt: skip
    config = load_config(DEMO, overrides)
    victim = subprocess.Popen(search_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "final").glob(f"{config.study_name}-*/checkpoints/step-00000010.pt")):
        assert victim.poll() is None and time.monotonic() < deadline, (
            "the search ended before it could be killed"
        )
        time.sleep(0.05)
    time.sleep(KILL_DELAYS.uniform(0.0, 1.5))
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert main(search_command(overrides)[1:]) == 0  # the same command again (in this process)

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
