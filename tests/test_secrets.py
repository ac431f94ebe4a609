"""A store password given to stylepipe never reaches a file, an artifact, a parameter or a log.

The end-to-end test runs a search and a whole pipeline against the real PostgreSQL (which
accepts any password here) with a password in both store URLs, then reads back everything
they left: every file under the run folders (the MLflow artifact store and Prefect's
database among them), every MLflow parameter and tag, every Optuna attribute, and what the
commands printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from stylepipe.config import Config, load_config
from stylepipe.stores import redact_url
from tests.helpers import DEMO, needs_postgres

PASSWORD = "S3cretPW-stylepipe"
BIN = Path(sys.executable).parent


def test_every_dump_of_the_settings_masks_a_store_password_and_memory_keeps_it(monkeypatch):
    url = f"postgresql://optuna:{PASSWORD}@db.example:5432/optuna"
    config = load_config(
        DEMO, [f"search.storage={url}", f"tracking.uri=https://me:{PASSWORD}@mlflow.example"]
    )
    assert config.storage_url == url  # what the process connects with
    for dumped in (
        config.model_dump_json(),
        json.dumps(config.model_dump(mode="json")),
        str(config.model_dump()),
    ):
        assert PASSWORD not in dumped and "optuna:***@db.example" in dumped and "me:***@mlflow" in dumped
    assert config.with_overrides({"train.lr": 0.5}).storage_url == url  # overrides keep it in memory

    # A masked dump read back needs the password from the environment, and says so.
    monkeypatch.delenv("STYLEPIPE_SEARCH_STORAGE", raising=False)
    monkeypatch.delenv("STYLEPIPE_TRACKING_URI", raising=False)
    with pytest.raises(Exception, match="masked.*STYLEPIPE_SEARCH_STORAGE") as refused:
        Config.model_validate_json(config.model_dump_json())
    assert PASSWORD not in str(refused.value)
    monkeypatch.setenv("STYLEPIPE_SEARCH_STORAGE", url)
    monkeypatch.setenv("STYLEPIPE_TRACKING_URI", f"https://me:{PASSWORD}@mlflow.example")
    assert Config.model_validate_json(config.model_dump_json()).storage_url == url


def test_a_settings_error_shows_the_url_masked(capsys):
    from stylepipe.cli import main

    code = main(["train", "--config", str(DEMO), "--set", f"search.storage=u:{PASSWORD}@h/db"])  # no scheme
    assert code == 2
    err = capsys.readouterr().err
    assert "search.storage" in err and "expected a URL" in err and PASSWORD not in err


def test_an_unreachable_tracking_server_is_named_without_its_password(tmp_path, monkeypatch):
    from stylepipe.tracking import Tracker, TrackingError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://me:{PASSWORD}@127.0.0.1:1"
    with pytest.raises(TrackingError) as err:
        Tracker(url, "x")
    assert PASSWORD not in str(err.value) and "me:***@127.0.0.1:1" in str(err.value)


def _with_password(url: str) -> str:
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{PASSWORD}@{host}"


TINY = ["data.image_size=32", "prepare.image_size=32", "search.confirm_steps=4", "train.steps=4", "train.batch_size=2", "train.check_every=2", "train.device=cpu",
        "search.n_trials=2", "search.eval_every=2", "search.space.lr=[1e-3,1e-2]", "search.top_k=1",
        "search.replay_seeds=0", "search.max_val_images=4", "final.steps=2",
        "search.edge_steps=10", "search.edge_probes=2",  # the shortest edge test: its runs are checked too
        "loss.style_layers=[relu1_2,relu2_2]", "tracking.registered_model=secret-style"]  # fmt: skip


@pytest.mark.slow
@needs_postgres
def test_a_password_in_the_store_urls_is_in_no_file_artifact_parameter_or_log(tmp_path, prepared, databases):
    optuna_url, mlflow_url = (_with_password(url) for url in databases)
    env = {**os.environ, "STYLEPIPE_OFFLINE": "1"}
    for inherited in ("PREFECT_API_URL", "PREFECT_HOME"):  # Prefect's database goes into the run folder
        env.pop(inherited, None)
    common = ["--config", str(DEMO), "--set", f"search.storage={optuna_url}", "--set", f"tracking.uri={mlflow_url}",
              "--set", f"data.content={prepared}"]  # fmt: skip
    for override in TINY:
        common += ["--set", override]
    piped = subprocess.run([str(BIN / "stylepipe-flow"), "run", *common, "--set", f"run_dir={tmp_path / 'flow'}"],
                           capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert piped.returncode == 0, piped.stdout + piped.stderr
    # The search command on the study the flow finished: its summary, as printed after a search
    # (the live search's lines are the library's loggers, which the flow run printed and logged).
    (study,) = [name for name in optuna.get_all_study_names(optuna_url) if ":" not in name]
    searched = subprocess.run([str(BIN / "stylepipe"), "search", "--quiet", *common, "--set",
                               f"run_dir={tmp_path / 'flow'}", "--set", f"search.study_name={study}"],
                              capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert searched.returncode == 0, searched.stdout + searched.stderr
    assert "finished before with these settings" in searched.stdout, searched.stdout
    assert "secret-style@safest" in searched.stdout and "secret-style@safest" in piped.stdout

    printed = searched.stdout + searched.stderr + piped.stdout + piped.stderr
    assert PASSWORD not in printed
    assert redact_url(optuna_url) in piped.stdout  # the summary names the storage, masked

    # every file: settings dumps, safetensors metadata, the MLflow artifact store, Prefect's database
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    names = {path.name for path in files} | {part for path in files for part in path.parts}
    assert {"model.safetensors", "prefect.db", "mlartifacts"} <= names, sorted(names)
    leaked = [str(path) for path in files if PASSWORD.encode() in path.read_bytes()]
    assert leaked == []

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    runs = [run for experiment in client.search_experiments() for run in
            client.search_runs([experiment.experiment_id], max_results=1000)]  # fmt: skip
    assert len(runs) > 4 and client.search_model_versions("name='secret-style'")
    # every row of every table of both databases: params, tags, attributes, model versions
    for url in (optuna_url, mlflow_url):
        assert _rows_holding(url, PASSWORD) == []


def _rows_holding(url: str, text: str) -> list[str]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    found = []
    with engine.connect() as connection:
        for table in sqlalchemy.inspect(engine).get_table_names():
            for row in connection.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')):
                if text in str(tuple(row)):
                    found.append(f"{table}: {row}")
    engine.dispose()
    return found
