"""Many workers on one study in the real PostgreSQL; crashes survived; clear storage errors.

The PostgreSQL tests read the server's URL from STYLEPIPE_TEST_POSTGRES_URL (set by
.ci/run). Unset: they are skipped, saying so. Set but unreachable: they fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from stylepipe.config import load_config
from stylepipe.search.storage import (
    EndKilledRunThenRetry,
    SqliteStore,
    SqliteWorkerLock,
    StorageError,
    open_storage,
)
from tests.helpers import DEMO, POSTGRES, another_process_holds_sqlite, needs_postgres

WORKER = [str(Path(sys.executable).parent / "stylepipe"), "worker", "--quiet", "--config", str(DEMO)]
TINY = [
    "data.image_size=32",
    "train.batch_size=2",
    "train.warmup_steps=0",
    "train.device=cpu",
    "search.space.lr=[1e-3,1e-2]",
    "search.eval_every=4",
    "search.top_k=1",
    "search.replay_seeds=0",
    "search.max_val_images=4",
    "search.confirm_steps=8",
    "final.train=false",
    "search.edge_steps=10",  # the shortest edge test: these tests are about other things
    "search.edge_probes=2",
    "loss.style_layers=[relu1_2,relu2_2]",  # the loss network up to relu2_2: about workers, not style
]


def worker_args(
    run_dir: Path, prepared_dir: Path, optuna_url: str, mlflow_url: str, *extra: str
) -> list[str]:
    overrides = [
        f"run_dir={run_dir}",
        f"data.content={prepared_dir}",
        f"tracking.uri={mlflow_url}",
        *TINY,
        *extra,
    ]
    args = [*WORKER, "--storage", optuna_url]
    for override in overrides:
        args += ["--set", override]
    return args


def config_for(run_dir, prepared_dir, optuna_url, mlflow_url, *extra):
    overrides = [f"run_dir={run_dir}", f"data.content={prepared_dir}", f"tracking.uri={mlflow_url}",
                 f"search.storage={optuna_url}", *TINY, *extra]  # fmt: skip
    return load_config(DEMO, overrides)


def mlflow_trial_runs(config):
    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return runs, [r for r in runs if r.data.tags.get("stylepipe.role") == "trial"]


@pytest.mark.slow
@needs_postgres
def test_worker_processes_and_a_search_share_one_study_and_finish_it_once(tmp_path, prepared, databases):
    """Three processes on one study: ``stylepipe worker --processes 2`` (two trials at a time on
    one device) beside a ``stylepipe search``, each of which may finish the study. Exactly n
    trials, one MLflow run each, one edge test; whatever the timing, the study finished once:
    each replay run once, one final model, one registered version."""
    optuna_url, mlflow_url = databases
    # trials long enough (~1 s) that the first process to start cannot take them all
    extra = ("search.n_trials=6", "train.steps=16", "train.check_every=4", "final.train=true",
             "final.steps=4", "tracking.registered_model=once-style")  # fmt: skip
    args = worker_args(tmp_path, prepared, optuna_url, mlflow_url, *extra)
    search = [str(Path(sys.executable).parent / "stylepipe"), "search", "--quiet", "--config", str(DEMO)]
    for override in (f"search.storage={optuna_url}", *args[args.index("--set") + 1 :: 2]):
        search += ["--set", override]
    # three processes on this machine's cores: one torch thread each, or they spin against each other
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for command in (args + ["--processes", "2"], search)
    ]
    outputs = [p.communicate(timeout=420)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert "2 worker processes done; exit codes [0, 0]" in outputs[0]
    # the search prints the study's result, whichever process finished it
    assert "registered model: models:/once-style@safest (version 1)" in outputs[1], outputs[1]

    config = config_for(tmp_path, prepared, optuna_url, mlflow_url, *extra)
    study = optuna.load_study(study_name=config.study_name, storage=optuna_url)
    counted = [
        t
        for t in study.trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(counted) == 6
    # each trial's stability, as the sampler reads it back from PostgreSQL
    assert all(
        (t.constraints["stability"] <= 0) == (t.user_attrs["outcome"] in ("complete", "pruned"))
        for t in counted
    )
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))

    runs, trial_runs = mlflow_trial_runs(config)
    by_trial = sorted(int(r.data.tags["trial"]) for r in trial_runs)
    assert by_trial == numbers  # exactly one MLflow run per trial
    ran = {r.data.tags["stylepipe.worker"] for r in trial_runs}
    assert len(ran) == 3, ran  # every process ran trials, both of --processes 2 among them
    # one edge test for the study: the first worker ran it, the others read its edges
    roles = [r.data.tags.get("stylepipe.role") for r in runs]
    assert roles.count("edge") == 2  # clipping off, and on
    assert "stability_edges" in study.user_attrs
    assert all(r.info.status != "RUNNING" for r in runs)
    assert roles.count("study") == 1
    # the study was finished once, in one of the three processes
    verdicts = study.user_attrs["safety"]
    assert verdicts and roles.count("replay") == sum(len(v["replays"]) for v in verdicts)
    assert roles.count("final") == 1
    client = MlflowClient(tracking_uri=mlflow_url)
    assert [str(v.version) for v in client.search_model_versions("name='once-style'")] == ["1"]


@pytest.mark.slow
@needs_postgres
def test_a_killed_worker_s_trial_is_failed_retried_and_its_run_not_left_running(
    tmp_path,
    prepared,
    databases,
):
    optuna_url, mlflow_url = databases
    # A small learning rate: the victim's trial must still be training when it is killed, not
    # halted by the divergence guard a dozen steps in (lr 1e-2 at batch 2 can do that).
    extra = ("search.n_trials=2", "train.steps=60", "train.check_every=5", "search.eval_every=20",
             "search.space.lr=[1e-4,3e-4]", "search.heartbeat_interval=1", "search.grace_period=3",
             "search.pruner_startup_trials=10")  # fmt: skip
    config = config_for(tmp_path, prepared, optuna_url, mlflow_url, *extra)
    args = worker_args(tmp_path, prepared, optuna_url, mlflow_url, *extra)
    victim = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    running = []
    while not running:
        assert time.monotonic() < deadline, "the first worker never started a trial"
        assert victim.poll() is None, "the first worker exited before it could be killed"
        time.sleep(1)
        try:
            study = optuna.load_study(study_name=config.study_name, storage=optuna_url)
        except KeyError:
            continue
        running = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                   if "mlflow_run_id" in t.user_attrs]  # fmt: skip
    time.sleep(1)  # inside training (60 steps take several seconds)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    killed = running[0]
    # The first trial is the baseline: the config's lr 1e-3, outside this space (its retry once
    # crashed the survivor, since Optuna refuses to re-create a trial outside its space).
    assert killed.user_attrs.get("baseline") and not 1e-4 <= killed.params["lr"] <= 3e-4

    from stylepipe.cli import main

    assert main(args[1:]) == 0  # the survivor: another worker (this process)

    study = optuna.load_study(study_name=config.study_name, storage=optuna_url)
    stale = study.trials[killed.number]
    assert stale.state == optuna.trial.TrialState.FAIL, (stale.state, stale.user_attrs)
    retried = [t for t in study.trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
               == killed.number]  # fmt: skip
    assert retried and retried[0].params == killed.params and retried[0].state.is_finished()
    counted = [
        t
        for t in study.trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(counted) == 2

    client = MlflowClient(tracking_uri=mlflow_url)
    dead_run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "KILLED"
    runs, _ = mlflow_trial_runs(config)
    assert all(r.info.status != "RUNNING" for r in runs)


def test_a_stale_baseline_outside_the_space_is_requeued_with_its_own_settings():
    study = optuna.create_study()
    study.enqueue_trial({"lr": 1e-3}, user_attrs={"baseline": True})
    trial = study.ask()
    with pytest.warns(UserWarning, match="out of range"):
        assert trial.suggest_float("lr", 1e-4, 3e-4, log=True) == 1e-3
    stale = study.trials[0]  # still RUNNING: its worker died

    EndKilledRunThenRetry(tracking_uri="unused", max_retry=1)(study, stale)

    (requeued,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert requeued.params == {"lr": 1e-3} and requeued.user_attrs["baseline"]
    again = study.ask()
    assert again.number == requeued.number and again.suggest_float("lr", 1e-4, 3e-4, log=True) == 1e-3


@pytest.mark.slow
@needs_postgres
def test_wrong_credentials_name_the_url_without_its_password(tmp_path):
    base = POSTGRES.split("://", 1)[1].split("@", 1)[1]
    url = f"postgresql://nosuchuser:s3cret-pw@{base}"
    config = load_config(DEMO, [f"run_dir={tmp_path}", f"search.storage={url}"])
    with pytest.raises(StorageError) as err:
        open_storage(config)
    message = str(err.value)
    assert "s3cret-pw" not in message and "nosuchuser:***@" in message
    assert "nosuchuser" in message


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("postgresq://user:hunter2@127.0.0.1/db", "postgresq"),  # a typo in the scheme
        ("postgresql://user:hunter2@127.0.0.1:1/db", "127.0.0.1:1"),  # nothing listens there
    ],
)
def test_bad_or_unreachable_storage_is_a_clear_error_without_the_password(tmp_path, url, fragment):
    config = load_config(DEMO, [f"run_dir={tmp_path}", f"search.storage={url}"])
    with pytest.raises(StorageError) as err:
        open_storage(config)
    assert fragment in str(err.value) and "hunter2" not in str(err.value)


def test_a_second_process_on_sqlite_is_refused_and_one_process_may_nest_the_lock(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with another_process_holds_sqlite(url), pytest.raises(StorageError, match="SQLite serves one worker"):
        SqliteWorkerLock(url).__enter__()
    try_it = ("import sys\nfrom stylepipe.search.storage import EndKilledRunThenRetry, SqliteWorkerLock, StorageError\ntry:\n"
              "    SqliteWorkerLock(sys.argv[1]).__enter__()\nexcept StorageError:\n    print('refused')")  # fmt: skip
    with SqliteWorkerLock(url):
        with SqliteWorkerLock(url):  # stages nest it in one process
            pass
        still_held = subprocess.run([sys.executable, "-c", try_it, url], capture_output=True, text=True)
        assert still_held.stdout.strip() == "refused"  # the inner exit did not release it
    released = subprocess.run([sys.executable, "-c", try_it, url], capture_output=True, text=True)
    assert released.stdout.strip() == "" and released.returncode == 0


def test_several_worker_processes_on_sqlite_are_refused_before_any_work(tmp_path, capsys):
    from stylepipe.cli import main

    code = main(["worker", "--config", str(DEMO), "--processes", "3", "--set", f"run_dir={tmp_path}"])
    assert code == 2
    assert "SQLite, which serves one worker" in capsys.readouterr().err
    assert not (tmp_path / "optuna.db").exists()


def test_worker_command_reports_an_unreachable_storage_without_a_traceback(tmp_path, prepared, capsys):
    from stylepipe.cli import main

    url = "postgresql://user:hunter2@127.0.0.1:1/db"
    code = main(["worker", "--config", str(DEMO), "--storage", url, "--set", f"run_dir={tmp_path}",
                 "--set", f"data.content={prepared}", "--set", "data.image_size=32"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "hunter2" not in err


def test_a_peer_s_trial_finishing_while_this_worker_counts_does_not_start_one_too_many(tmp_path, monkeypatch):
    """Finished and running trials are counted from one read. Counted from two, a peer's trial
    that finished between them was in neither count, and a sixth trial of five started (three
    workers on a loaded machine). Here the peer finishes right after this worker's first read."""
    from stylepipe.search import study as study_module

    config = load_config(DEMO, [f"run_dir={tmp_path}", f"search.storage=sqlite:///{tmp_path / 'optuna.db'}",
                                "search.n_trials=2", "search.heartbeat_interval=1"])  # fmt: skip
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.0))
    peers = study.ask()  # another worker's trial, running
    # Peers run only on a shared store (on SQLite a RUNNING trial is a dead process's): so here.
    monkeypatch.setattr(SqliteStore, "running_is_orphaned", False)
    in_gate, peer_done = [], []

    class Gate(study_module.NoLock):
        def acquire(self) -> None:
            super().acquire()
            in_gate.append(True)

    real_get_trials = optuna.Study.get_trials

    def get_trials(self, *args, **kwargs):
        trials = real_get_trials(self, *args, **kwargs)
        if in_gate and not peer_done:
            peer_done.append(True)
            self.tell(peers, 2.0)
        return trials

    class Objective:
        fatal = None
        calls = 0

        def __call__(self, trial):
            self.calls += 1
            return 3.0

    monkeypatch.setattr(study_module, "study_lock", lambda config, name: Gate())
    monkeypatch.setattr(optuna.Study, "get_trials", get_trials)
    objective = Objective()
    ran = study_module.run_trials(config, study, objective, progress=False)

    assert peer_done and ran == 0 and objective.calls == 0
    assert len(real_get_trials(study, states=study_module.COUNTED)) == 2


@needs_postgres
def test_workers_opening_an_empty_study_at_the_same_instant_enqueue_one_baseline(
    tmp_path, databases, monkeypatch
):
    """Each worker reads the study empty before either enqueues (a barrier holds the first one
    read until the second has read too, or for 3 s): the lock makes the second read wait."""
    import threading

    from stylepipe.search import study as study_module

    optuna_url, _ = databases
    config = load_config(
        DEMO, [f"run_dir={tmp_path}", f"search.storage={optuna_url}", "search.study_name=race"]
    )
    optuna.create_study(study_name="race", storage=optuna_url)
    barrier = threading.Barrier(2)
    real_get_trials = optuna.Study.get_trials

    def get_trials(self, *args, **kwargs):
        trials = real_get_trials(self, *args, **kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=3)  # both have read, or the other waits on the lock
        return trials

    monkeypatch.setattr(optuna.Study, "get_trials", get_trials)
    workers = [threading.Thread(target=study_module.enqueue_first_trials,
                                args=(optuna.load_study(study_name="race", storage=optuna_url), config))
               for _ in range(2)]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    monkeypatch.undo()
    trials = optuna.load_study(study_name="race", storage=optuna_url).get_trials()
    assert [t.user_attrs.get("baseline") for t in trials] == [True]
