"""What the MLflow registry says about each version, read with the MLflow client: its
description, the history of its aliases' moves, and a rollback of the champion."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from stylepipe.champion import register
from stylepipe.cli import main
from stylepipe.config import load_config
from stylepipe.files import file_sha256
from stylepipe.nets import TransformerNet
from stylepipe.records import Edge, Edges, FinalRun
from stylepipe.registry import ALIAS_HISTORY_TAG, Registry, log_model
from stylepipe.search.attributes import StudyRecord
from stylepipe.train.model_file import save_model
from tests.helpers import DEMO, SAFEST

MODEL = "registry-style"


def settings(tmp_path: Path) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", f"tracking.registered_model={MODEL}"]


def final_run(config, client: MlflowClient, folder: Path, seed: int) -> FinalRun:
    """A final run as final.py leaves it: its model logged to a finished MLflow run."""
    torch.manual_seed(seed)
    weights = save_model(TransformerNet(), folder / str(seed) / "model.safetensors")  # its name in final.py
    experiment = client.get_experiment_by_name("registry") or client.get_experiment(
        client.create_experiment("registry", artifact_location=(folder / "artifacts").as_uri())
    )
    run = client.create_run(experiment.experiment_id)
    model_uri = log_model(config.tracking_uri, run.info.run_id, weights, {})
    return FinalRun(run_id=run.info.run_id, model=str(weights), model_uri=model_uri,
                    model_sha256=file_sha256(weights), quality=0.25 + seed, recoveries=1, steps=8,
                    safest=SAFEST, folder=str(folder), data_fingerprint=f"d474{seed}")  # fmt: skip


def study_with_edge() -> optuna.Study:
    study = optuna.create_study(study_name="nightly-1")
    StudyRecord(study).record_edges(Edges(modes=["on"], on=Edge(
        kind="cold", lr=0.02, passed=0.01, cause="divergence", outcome="diverged", step=10, steps=30,
        low=1e-4, high=1.0, clip_norm=10.0)))  # fmt: skip
    return study


@pytest.fixture
def two_versions(tmp_path):
    """Versions 1 and 2 registered by two studies, as the pipeline registers them."""
    config = load_config(DEMO, [*settings(tmp_path), "search.study_name=nightly-1"])
    (tmp_path / "run").mkdir()
    client = MlflowClient(tracking_uri=config.tracking_uri)
    first = register(config, final_run(config, client, tmp_path, 0), SimpleNamespace(study=study_with_edge()))
    second_config = config.with_overrides({"search.study_name": "nightly-2"})
    second = register(second_config, final_run(config, client, tmp_path, 1), None)
    assert (first["version"], second["version"]) == ("1", "2")
    return config, client


def history(client: MlflowClient) -> list[dict]:
    return json.loads(client.get_registered_model(MODEL).tags[ALIAS_HISTORY_TAG])["moves"]


def test_each_version_says_in_its_description_what_it_is_and_why_it_can_be_trusted(two_versions):
    _, client = two_versions
    described = client.get_model_version(MODEL, "1").description
    for shown in ("study `nightly-1` (trial 0)", "| lr | 0.001 |", "| clip_norm | 10 |",
                  f"**Certificate**: {SAFEST.certificate.text}.",
                  "**Stability edge**: clipping at 10: lr 0.02 (diverged: divergence",
                  "1 recovery", "fingerprint `d4740`", "**Quality**: 0.25 (final model)"):  # fmt: skip
        assert shown in described, (shown, described)
    # the model's own page says what its aliases mean and where their history is
    assert "`alias_history`" in client.get_registered_model(MODEL).description
    # a study that ran no edge test says so, rather than leaving the line out
    assert "**Stability edge**: not measured" in client.get_model_version(MODEL, "2").description


def test_every_move_of_an_alias_is_recorded_and_a_rollback_is_one_of_them(two_versions, tmp_path, capsys):
    config, client = two_versions
    registry = Registry(config.tracking_uri, MODEL)
    registry.move_alias("champion", "1", "nightly-1", "version 1 is now the champion; there was none")
    registry.move_alias("champion", "2", "nightly-2", "quality 0.2 beats the champion's 0.3")
    assert registry.move_alias("champion", "2", "nightly-2", "again") is None  # no move, no record

    assert main(["rollback", "1", "--why", "version 2 smears faces", "--set", settings(tmp_path)[0],
                 "--set", settings(tmp_path)[1]]) == 0  # fmt: skip
    assert "@champion: version 2 -> version 1" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"

    moves = [(m["alias"], m["from_version"], m["to_version"], m["study"]) for m in history(client)]
    assert moves == [
        ("safest", None, "1", "nightly-1"),
        ("safest", "1", "2", "nightly-2"),
        ("champion", None, "1", "nightly-1"),
        ("champion", "1", "2", "nightly-2"),
        ("champion", "2", "1", None),  # by hand
    ]
    assert all(m["at"].endswith("+00:00") for m in history(client))
    assert history(client)[-1]["why"] == "version 2 smears faces"
    # on both versions of the last move
    tags = {v: client.get_model_version(MODEL, v).tags for v in ("1", "2")}
    assert (
        "from version 2 to version 1 by a rollback: version 2 smears faces"
        in tags["1"]["stylepipe.alias.champion.since"]
    )
    assert "to version 1 by a rollback" in tags["2"]["stylepipe.alias.champion.until"]
    assert "from version 1 to version 2 by study nightly-2" in tags["2"]["stylepipe.alias.safest.since"]

    # the champion again: nothing moves, nothing is recorded
    assert (
        main(["rollback", "@champion", "--set", settings(tmp_path)[0], "--set", settings(tmp_path)[1]]) == 0
    )
    assert "nothing moved" in capsys.readouterr().out and len(history(client)) == 5


def test_a_rollback_to_a_version_that_is_missing_or_not_finite_is_refused_in_one_line(
    two_versions, tmp_path, capsys
):
    config, client = two_versions
    Registry(config.tracking_uri, MODEL).move_alias("champion", "2", "nightly-2", "first champion")
    args = ["--set", settings(tmp_path)[0], "--set", settings(tmp_path)[1]]
    assert main(["rollback", "9", *args]) == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith("error:") and "has no version 9" in said and "\n" not in said

    # version 1's weights now hold an Inf, recorded as registered (another tool's registration)
    folder = Path(client.get_model_version_download_uri(MODEL, "1").removeprefix("file://"))
    weights = folder / "artifacts" / "model.safetensors"
    state = {k: v.clone() for k, v in TransformerNet().state_dict().items()}
    state["encoder_in.1.weight"][0] = math.inf
    save_file(state, str(weights))
    client.set_model_version_tag(MODEL, "1", "weights_sha256", file_sha256(weights))
    assert main(["rollback", "1", *args]) == 2
    said = capsys.readouterr().err.strip()
    assert "NaN or Inf" in said and "\n" not in said
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert len(history(client)) == 3  # safest twice, champion once: the refusals moved nothing


def test_an_alias_moved_by_a_process_that_died_before_recording_it_is_recorded_by_the_next(two_versions):
    config, client = two_versions
    client.set_registered_model_alias(MODEL, "safest", "1")  # moved; the record never written
    move = Registry(config.tracking_uri, MODEL).move_alias("safest", "1", "nightly-1", "registered again")
    assert move.from_version == "2" and "recorded after the move" in move.why
    assert history(client)[-1]["to_version"] == "1"
