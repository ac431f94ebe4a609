"""Tracking's own promises: which step rows reach MLflow, and how the SQLite stores are opened."""

from __future__ import annotations

import math
import sqlite3

import optuna
import sqlalchemy
from mlflow import MlflowClient

from stylepipe.search.quality import QualityReporter
from stylepipe.search.storage import open_storage
from stylepipe.stores import sqlite_path
from stylepipe.tracking import RunLogger, Tracker
from stylepipe.train import TrainState


def journal_mode(path) -> str:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA journal_mode").fetchone()[0]


def test_thinned_step_metrics_keep_step_one_every_nth_and_every_non_finite_row(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("thin")).info.run_id
    logger = RunLogger(client, run_id, every=10)
    rows = [{"step": s, "loss/total": 1.0 / s, "grad_norm/total": 2.0} for s in range(1, 26)]
    rows[12]["loss/total"] = math.nan  # step 13
    logger.on_metrics(rows[:14])
    logger.on_metrics(rows[14:])
    logger.on_metrics([{"step": 7, "val/quality": 0.5}])  # evaluations are never thinned
    logger.flush()

    assert logger.errors == []
    steps = [m.step for m in client.get_metric_history(run_id, "loss/total")]
    # 14 and 25 end their chunks: the trainer sends a chunk per check, so a chunk's last row
    # is the run's last step or the step a guard halted at
    assert sorted(steps) == [1, 10, 13, 14, 20, 25]
    assert math.isnan(next(m.value for m in client.get_metric_history(run_id, "loss/total") if m.step == 13))
    assert [m.step for m in client.get_metric_history(run_id, "val/quality")] == [7]


def test_a_lost_write_is_said_on_the_run_and_in_the_log(tmp_path, caplog):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("lost")).info.run_id
    logger = RunLogger(client, run_id)
    logger.log_params({"lr": 0.1})
    logger.log_params({"lr": 0.2})  # MLflow refuses to change a logged parameter
    logger.flush()
    assert len(logger.errors) == 1
    tag = client.get_run(run_id).data.tags["stylepipe.tracking_errors"]
    assert tag.startswith("1 writes lost")
    assert "incomplete" in caplog.text
    assert client.get_run(run_id).data.params == {"lr": "0.1"}


def test_every_row_is_kept_when_log_every_is_one(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("all")).info.run_id
    logger = RunLogger(client, run_id, every=1)
    logger.on_metrics([{"step": s, "loss/total": float(s)} for s in range(1, 8)])
    logger.flush()
    assert [m.step for m in client.get_metric_history(run_id, "loss/total")] == list(range(1, 8))


def test_project_sqlite_stores_use_a_write_ahead_log_and_others_are_left_alone(tmp_path, tiny):
    config = tiny(f"search.storage=sqlite:///{tmp_path / 'study.db'}",
                  f"tracking.uri=sqlite:///{tmp_path / 'runs.db'}")  # fmt: skip
    storage = open_storage(config)
    optuna.create_study(storage=storage, study_name="wal")
    tracker = Tracker(config.tracking_uri, "wal")
    tracker.client.create_run(tracker.experiment_id)
    # Someone else's SQLite database in the same process keeps SQLite's default journal.
    other = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with other.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")

    assert journal_mode(tmp_path / "study.db") == "wal"
    assert journal_mode(tmp_path / "runs.db") == "wal"
    assert journal_mode(tmp_path / "other.db") == "delete"
    normal, full = 1, 2  # PRAGMA synchronous values; it is a per-connection setting
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == normal
    with other.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == full
    # and both stores still read back what was written
    assert optuna.load_study(study_name="wal", storage=config.storage_url).study_name == "wal"
    assert len(tracker.client.search_runs([tracker.experiment_id])) == 1


def test_sqlite_urls_are_read_as_sqlalchemy_reads_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///runs/optuna.db") == str(tmp_path / "runs" / "optuna.db")
    assert sqlite_path("sqlite+pysqlite:////abs/x.db") == "/abs/x.db"
    assert sqlite_path("sqlite:///a%20b/x.db") == str(tmp_path / "a b" / "x.db")
    assert sqlite_path("sqlite:///file:/abs/u.db?uri=true") == "/abs/u.db"
    for elsewhere in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:m?mode=memory&uri=true",
                      "postgresql://postgres@127.0.0.1/test"):  # fmt: skip
        assert sqlite_path(elsewhere) is None, elsewhere


def test_a_trial_behind_the_median_is_pruned_midway_but_not_at_its_last_step(monkeypatch):
    import stylepipe.search.quality as quality

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0))
    for _ in range(3):  # finished trials that reached quality 0.1 at steps 4 and 8
        study.add_trial(optuna.trial.create_trial(value=0.1, intermediate_values={4: 0.1, 8: 0.1}))
    monkeypatch.setattr(quality, "evaluate_quality", lambda model, data: 0.9)  # far behind them

    midway = QualityReporter(data=None, eval_every=4, trial=study.ask())
    try:
        midway.on_check(TrainState(model=None, step=4, steps=8))
    except optuna.TrialPruned:
        pruned_midway = True
    else:
        pruned_midway = False
    assert pruned_midway

    last = study.ask()
    reporter = QualityReporter(data=None, eval_every=8, trial=last)
    reporter.on_check(TrainState(model=None, step=8, steps=8))  # no compute left to save: no prune
    assert reporter.final == 0.9
    assert study.get_trials()[-1].intermediate_values == {8: 0.9}


def test_browser_links_to_runs_and_artifacts_carry_no_credentials_and_a_local_store_gives_no_image(tmp_path):
    server = Tracker.__new__(Tracker)  # only the URL is read: nothing is asked of a server
    server.uri, server.experiment_id = "http://bob:s3cret@[::1]:5000/mlflow/", "3"
    image, link = server.artifact_links("abc", "stability_map.png")
    assert image == "http://[::1]:5000/mlflow/get-artifact?path=stability_map.png&run_uuid=abc"
    assert link == "http://[::1]:5000/mlflow/#/experiments/3/runs/abc/artifacts/stability_map.png"
    assert server.runs_table_url().startswith("http://[::1]:5000/mlflow/#/experiments/3/runs?")
    local = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "links", tmp_path / "artifacts")
    run = local.study_run("links")
    image, link = local.artifact_links(run, "stability_map.png")
    assert image is None and link == f"{(tmp_path / 'artifacts').as_uri()}/{run}/artifacts/stability_map.png"
    assert local.client.get_run(run).info.artifact_uri + "/stability_map.png" == link  # MLflow's own layout


def test_system_metrics_of_a_resumed_run_go_on_after_its_last_sample(tmp_path):
    import time

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "sysmetrics", tmp_path / "artifacts")
    run = tracker.child_run(tracker.study_run("sysmetrics"), "final model", "final", {}, {}).run_id
    for _ in range(2):  # trained, killed, resumed by a new process: the same run, sampled again
        with tracker.system_metrics(run, 0.1):
            time.sleep(0.5)
    steps = [m.step for m in tracker.client.get_metric_history(run, "system/cpu_utilization_percentage")]
    assert len(steps) >= 4 and sorted(steps) == list(range(len(steps)))  # no step sampled twice
    with tracker.system_metrics(run, None):  # off: nothing more
        time.sleep(0.3)
    assert len(tracker.client.get_metric_history(run, "system/cpu_utilization_percentage")) == len(steps)
