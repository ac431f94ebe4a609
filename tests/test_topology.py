"""The production topology on loopback, end to end: `stylepipe stack` (PostgreSQL, an MLflow
server with proxied artifacts, a Prefect server, a process work pool and its worker,
optuna-dashboard), a scheduled deployment run by the pool's worker, and search workers in
folders that share nothing but the services. The same commands as the README's
"Going to production" and "Many workers"."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from PIL import Image

from stylepipe.ops import stack as stack_tools
from stylepipe.records import BROKE
from stylepipe.search.dashboard import IMPORTANCE_ID, MAP_ID
from tests.helpers import DEMO, POSTGRES, needs_postgres

pytestmark = [pytest.mark.slow, needs_postgres]

BIN = Path(sys.executable).parent
TINY = [
    # No edge test and the loss network up to relu2_2: these tests are about the services, and
    # each costs its whole pipeline (the edge test on the stack's PostgreSQL: test_workers.py).
    "search.edge_steps=0", "loss.style_layers=[relu1_2,relu2_2]",
    "data.image_size=32", "prepare.image_size=32", "prepare.workers=1", "prepare.val_fraction=0.25",
    "train.steps=8", "train.batch_size=2", "train.warmup_steps=0", "train.check_every=4", "train.device=cpu",
    "search.eval_every=4", "search.space.lr=[1e-3,1e-2]", "search.top_k=1", "search.replay_seeds=0",
    "search.max_val_images=4", "search.confirm_steps=8", "final.steps=8",
]  # fmt: skip
MODEL = "topology-style"


def drop_databases(admin_url: str, names: list[str]) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for name in names:
            conn.execute(sqlalchemy.text(f'drop database if exists "{name}" with (force)'))
    engine.dispose()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """`stylepipe stack up` in a scratch folder, on databases of its own; everything stopped
    and dropped afterwards, and checked to be gone."""
    prefix = f"sp_topo_{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("stack")
    started = subprocess.run([str(BIN / "stylepipe"), "stack", "up", "--folder", str(folder), "--prefix", prefix],
                             text=True, capture_output=True, timeout=400,
                             env={**os.environ, stack_tools.ADMIN_ENV: POSTGRES})  # fmt: skip
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        running = stack_tools.load(folder)
        for line in ("MLflow UI:", "Prefect UI:", "optuna-dashboard:"):
            assert line in started.stdout
        yield running
    finally:
        pids = [s.pid for s in stack_tools.load(folder).services] if (folder / "stack.json").is_file() else []
        stopped = subprocess.run([str(BIN / "stylepipe"), "stack", "down", "--folder", str(folder)],
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        drop_databases(POSTGRES, [f"{prefix}_{kind}" for kind in ("optuna", "mlflow", "prefect")])
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and _not_zombie(pid)]
        assert not alive, f"still running after stack down: {alive}"


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def _env(services, **extra) -> dict[str, str]:
    return {**os.environ, **services.env(), "PREFECT_LOGGING_LEVEL": "WARNING", **extra}


def _stylepipe(*args, cwd, env, timeout=600, program="stylepipe") -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / program), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _deploy(services, overrides: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """`stylepipe-flow deploy` of the demo with ``overrides`` to the stack's pool."""
    deploy = ["deploy", "--config", str(DEMO), "--pool", services.pool]
    for override in overrides:
        deploy += ["--set", override]
    return _stylepipe(*deploy, cwd=cwd, env=env, program="stylepipe-flow", timeout=180)


def _flow_run(api: str, deployment_id: str, overrides: list[str], timeout: float = 500) -> dict:
    """Create a flow run of the deployment now (not waiting for the cron) and wait for its end."""
    with httpx.Client(base_url=api, timeout=30) as client:
        created = client.post(f"/deployments/{deployment_id}/create_flow_run",
                              json={"parameters": {"config_path": str(DEMO), "overrides": overrides}})  # fmt: skip
        created.raise_for_status()
        return _wait(client, created.json()["id"], timeout)


def _started_worker(api: httpx.Client, name: str, deadline: float) -> tuple[dict, str]:
    """The search_worker flow run named ``name`` and its worker id (host:pid), from its run log."""
    while time.monotonic() < deadline:
        runs = api.post("/flow_runs/filter", json={"flows": {"name": {"any_": ["search_worker"]}}}).json()
        for run in runs:
            if run["name"] == name:
                logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}}}).json()
                joined = [log["message"].split()[1] for log in logs if " joins study " in log["message"]]
                if joined:
                    return run, joined[0]
        time.sleep(1)
    raise AssertionError(f"no flow run {name} started")


def _final_ahead_on(storage, client: MlflowClient, study: str, worker: str, deadline: float) -> str:
    """The MLflow run of the final trained ahead on ``worker``, once a checkpoint past its start
    was mirrored to it (its metric rows are committed with each checkpoint)."""
    while time.monotonic() < deadline:
        try:
            units = optuna.load_study(study_name=f"{study}:final", storage=storage).trials
        except KeyError:  # not queued yet
            units = []
        running = [
            u
            for u in units
            if u.state == optuna.trial.TrialState.RUNNING and u.user_attrs.get("worker") == worker
        ]
        records = optuna.load_study(study_name=study, storage=storage).user_attrs
        run_ids = [v["run_id"] for k, v in records.items() if k.startswith("final_run:") and v.get("run_id")]
        if running and run_ids:
            steps = [m.step for m in client.get_metric_history(run_ids[0], "loss/total")]
            if steps and max(steps) >= 16:
                return run_ids[0]
        time.sleep(0.5)
    raise AssertionError(f"no final was trained ahead on the started worker {worker}")


def test_the_scheduled_deployment_runs_on_the_pool_and_the_next_run_warm_starts_fans_out_and_survives_a_killed_worker(
    services, tmp_path
):
    """Two flow runs of the deployment on the stack's pool, in folders of their own (two machines).
    The first finds a safest configuration; the second warm-starts from it through the registry
    with search.workers=2: the pipeline's flow run starts a search_worker flow run on its pool,
    both run trials, the started worker trains the best candidate's final while the pipeline
    replays, and it is killed (SIGKILL) mid-final and replaced by its hook; the final is finished
    elsewhere from its mirrored checkpoint, in the same MLflow run, once, and one version is
    registered from it. Then what users see of it in Prefect, optuna-dashboard and the registry.
    (A replay whose worker died is run again by another: test_replays.py.)"""
    env = _env(services)
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    model, study = f"{MODEL}-flow", "ahead"
    # The config's own lr (the baseline) blows up, so the safest is a trial of the search's own.
    common = [*TINY, "search.space.lr=[1e-4,1e-3]", "train.lr=50", f"tracking.registered_model={model}"]
    first_settings = [*common, "search.n_trials=3", f"run_dir={first_dir}"]
    second_settings = [*common, "search.workers=2", "search.n_trials=6", "train.steps=40", "search.confirm_steps=40",
                       "final.steps=80", "train.checkpoint_every=8", "search.heartbeat_interval=1",
                       "search.grace_period=4", f"run_dir={second_dir}"]  # fmt: skip
    _deploy(services, first_settings, tmp_path, env)
    storage = optuna.storages.RDBStorage(services.optuna_url)  # one connection pool for the polls
    registry = MlflowClient(tracking_uri=services.tracking_uri)

    with httpx.Client(base_url=services.prefect_api_url, timeout=30) as api:
        deployment = api.get("/deployments/name/style_pipeline/nightly").json()
        assert deployment["work_pool_name"] == services.pool
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]

        first = _flow_run(services.prefect_api_url, deployment["id"], first_settings)
        assert first["state_type"] == "COMPLETED", first["state"]
        assert not (first_dir / "mlartifacts").exists()  # artifacts went through the server
        recorded = json.loads(
            registry.get_model_version_by_alias(model, "safest").tags["stylepipe.safest_settings"]
        )

        created = api.post(f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": {
            "config_path": str(DEMO), "overrides": second_settings, "study_name": study}})  # fmt: skip
        created.raise_for_status()
        pipeline_id = created.json()["id"]
        deadline = time.monotonic() + 400
        started, worker = _started_worker(api, f"{study} worker 2", deadline)
        assert started["parent_task_run_id"]  # a subflow of the pipeline's flow run
        ahead = _final_ahead_on(storage, registry, study, worker, deadline)
        os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
        second = _wait(api, pipeline_id, 500)
        assert second["state_type"] == "COMPLETED", second["state"]
        workers = api.post("/flow_runs/filter", json={"flows": {"name": {"any_": ["search_worker"]}}}).json()
        states = {w["name"]: w["state_type"] for w in workers if w["name"].startswith(f"{study} worker")}
        assert states[f"{study} worker 2"] == "CRASHED", states
        assert f"{study} worker 2 (attempt 2)" in states, states  # its replacement, started by its hook

    # The warm start: the second machine has no last_safest.json; it read the registry.
    (earlier_name,) = [
        n for n in optuna.get_all_study_names(storage) if n.startswith("demo-") and ":" not in n
    ]
    earlier, later = (optuna.load_study(study_name=n, storage=storage) for n in (earlier_name, study))
    assert not [t for t in earlier.trials if t.user_attrs.get("warm_start")]
    warm = [t for t in later.trials if t.user_attrs.get("warm_start")]
    assert len(warm) == 1 and warm[0].params["lr"] == pytest.approx(recorded["params"]["lr"]), warm

    # The fan-out: both workers ran trials; the final trained ahead was finished elsewhere, once.
    counted = later.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(counted) == 6
    experiment = registry.get_experiment_by_name(study)
    trials = registry.search_runs([experiment.experiment_id], "tags.`stylepipe.role` = 'trial'")
    assert len({r.data.tags["stylepipe.worker"] for r in trials}) == 2  # both ran trials
    assert worker in {r.data.tags["stylepipe.worker"] for r in trials}  # the started worker's too
    units = optuna.load_study(study_name=f"{study}:final", storage=storage).trials
    assert [u.state for u in units] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert units[1].user_attrs["worker"] != worker  # finished elsewhere
    (final,) = registry.search_runs([experiment.experiment_id], "tags.`stylepipe.role` = 'final'")
    assert final.info.run_id == ahead and final.info.status == "FINISHED"  # the same MLflow run
    steps = [m.step for m in registry.get_metric_history(ahead, "loss/total")]
    assert max(steps) == 80 and len(steps) == len(set(steps))  # resumed, no step logged twice
    versions = {v.version: v for v in registry.search_model_versions(f"name = '{model}'")}
    assert sorted(versions) == ["1", "2"] and versions["2"].run_id == ahead
    # the worker's run folder is its own: the pipeline's holds the final only as fetched
    assert (second_dir / "workers" / "2" / "final").is_dir()

    # What users see of it, through each server's API. Prefect: the library's lines in the run
    # logs and its events; the flow run's stability map, an image the MLflow server serves; its
    # safest configuration, a table.
    safest = later.user_attrs["safest"]
    with httpx.Client(base_url=services.prefect_api_url, timeout=30) as api:
        deadline = time.monotonic() + 30
        while True:
            logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [pipeline_id]}}}).json()
            events = api.post("/events/filter", json={"filter": {"event": {"prefix": ["stylepipe."]}},
                                                      "limit": 50}).json()["events"]  # fmt: skip
            certified = [e for e in events if e["event"] == "stylepipe.study.certified"
                         and e["resource"]["prefect.resource.id"] == f"stylepipe.study.{study}"]  # fmt: skip
            if (
                certified
                and any(log["message"].startswith("trial ") for log in logs)
                or time.monotonic() > deadline
            ):
                break
            time.sleep(1)
        found = api.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [pipeline_id]}}}
        ).json()
    assert certified and certified[0]["payload"]["trial"] == safest["trial"]
    assert f"trial {safest['trial']}: safe" in [log["message"] for log in logs]
    by_key = {a["key"]: a for a in found}
    assert by_key["stylepipe-stability-map"]["type"] == "image"
    picture = httpx.get(by_key["stylepipe-stability-map"]["data"], timeout=30)
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    assert by_key["stylepipe-stability-map"]["data"] in by_key["stylepipe-summary"]["data"]
    rows = {r["setting"]: r["value"] for r in json.loads(by_key["stylepipe-safest"]["data"])}
    assert rows["trial"] == str(safest["trial"]) and rows["certificate"]
    # optuna-dashboard: the two plots on the study page; the baseline (lr 50) broke: infeasible
    with httpx.Client(base_url=services.dashboard_url, timeout=30) as board:
        summaries = board.get("/api/studies").json()["study_summaries"]
        study_id = next(s["study_id"] for s in summaries if s["study_name"] == study)
        detail = board.get(f"/api/studies/{study_id}", params={"after": 0}).json()
    assert {g["id"] for g in detail["plotly_graph_objects"]} == {MAP_ID, IMPORTANCE_ID}
    outcomes = {
        t["number"]: {a["key"]: a["value"] for a in t["user_attrs"]}["outcome"] for t in detail["trials"]
    }
    assert any(outcomes[t["number"]] in BROKE for t in detail["trials"])
    for t in detail["trials"]:
        assert t["constraints"] and (max(t["constraints"]) > 0) == (outcomes[t["number"]] in BROKE), t
    # MLflow: each version describes itself; a rollback is one more recorded move of @champion
    assert f"study `{study}`" in registry.get_model_version(model, "2").description
    other = "1" if registry.get_model_version_by_alias(model, "champion").version == "2" else "2"
    rolled = _stylepipe("rollback", other, "--why", "checking the rollback", "--config", str(DEMO),
                        "--set", f"tracking.registered_model={model}", cwd=tmp_path, env=env)  # fmt: skip
    assert f"-> version {other}" in rolled.stdout
    moves = json.loads(registry.get_registered_model(model).tags["alias_history"])["moves"]
    assert [(m["alias"], m["to_version"]) for m in moves][-1] == ("champion", other)
    assert moves[-1]["why"] == "checking the rollback" and moves[-1]["study"] is None
    assert any(m["alias"] == "safest" and m["to_version"] == "2" and m["study"] == study for m in moves)
    promoted = [
        m for m in moves if m["alias"] == "champion" and m["study"] == earlier_name
    ]  # the first run's
    assert promoted and promoted[0]["to_version"] == "1" and "there was none" in promoted[0]["why"]


def _wait(api: httpx.Client, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.get(f"/flow_runs/{run_id}").json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not end within {timeout} s")


def test_workers_sharing_only_the_services_finish_one_study_whose_model_loads_anywhere(
    services,
    prepared,
    tmp_path,
):
    """Machine a has the prepared images and the style image; machine b has neither, only the
    same settings, whose paths do not exist there: it fetches the study's images by hash."""
    study = "shared"
    # The config's own lr (the baseline, trial 0) blows up: a pruned trial with its autopsy.
    overrides = [*TINY, "search.n_trials=4", f"search.study_name={study}", "train.lr=50",
                 f"tracking.registered_model={MODEL}", "run_dir=run", "data.content=prepared",
                 "data.style_image=style.png"]  # fmt: skip
    args = ["worker", "--quiet", "--config", str(DEMO)]
    for override in overrides:
        args += ["--set", override]
    folders = [tmp_path / "machine-a", tmp_path / "machine-b"]
    shutil.copytree(prepared, folders[0] / "prepared")
    Image.fromarray((np.random.default_rng(1).random((48, 48, 3)) * 255).astype(np.uint8)).save(
        folders[0] / "style.png"
    )
    folders[1].mkdir()

    def start(folder: Path) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "stylepipe"), *args], cwd=folder, env=_env(services),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    workers = [start(folders[0])]
    storage = optuna.storages.RDBStorage(services.optuna_url)  # one connection pool for the polls
    deadline = time.monotonic() + 300
    while True:  # machine a publishes the images before its first trial; then b joins
        assert time.monotonic() < deadline and workers[0].poll() is None, workers[0].communicate()[0]
        if (
            study in optuna.get_all_study_names(storage)
            and "inputs" in optuna.load_study(study_name=study, storage=storage).user_attrs
        ):
            break
        time.sleep(0.5)
    workers.append(start(folders[1]))
    outputs = []
    for worker in workers:
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output
        outputs.append(output)

    # b's view holds no path of a's: it fetched the shard and the style image by their hashes,
    # once, from the study's MLflow run through the server, into its own run folder.
    assert sorted(p.name for p in folders[1].iterdir()) == ["run"]
    fetched = [
        line for line in outputs[1].splitlines() if line.startswith("fetched from the study's artifact store")
    ]
    assert fetched == [
        "fetched from the study's artifact store, by hash: manifest.parquet, shard.npy, style.png"
    ]
    assert "fetched from" not in outputs[0]
    inputs = optuna.load_study(study_name=study, storage=services.optuna_url).user_attrs["inputs"]
    shard_sha = hashlib.sha256((prepared / "shard.npy").read_bytes()).hexdigest()
    assert inputs["shard"]["sha256"] == shard_sha
    cached = folders[1] / "run" / "inputs" / inputs["manifest"]["sha256"] / "shard.npy"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == shard_sha

    counted = optuna.load_study(study_name=study, storage=services.optuna_url).get_trials(
        states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    assert len(counted) == 4
    client = MlflowClient(tracking_uri=services.tracking_uri)
    published = client.list_artifacts(inputs["run_id"], f"inputs/{shard_sha}")
    assert [f.path for f in published] == [f"inputs/{shard_sha}/shard.npy"]  # by its hash, through the server
    experiment = client.get_experiment_by_name(study)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.stylepipe-trials"])  # the runs table's columns
    assert {"tags.`outcome`", "tags.`cause`", "params.`lr`", "metrics.`final/quality`"} <= set(
        view["selectedColumns"]
    )
    runs = client.search_runs([experiment.experiment_id], "tags.`stylepipe.role` = 'trial'")
    assert {r.info.run_id for r in runs} >= {t.user_attrs["mlflow_run_id"] for t in counted}
    for run in runs:
        assert client.get_metric_history(run.info.run_id, "loss/total"), run.info.run_name
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    pruned = [r for r in runs if r.data.tags.get("outcome") not in (None, "complete")]
    assert pruned, [r.data.tags for r in runs]
    # The runs table shows each trial's outcome and settings in its name, without opening it.
    assert all(
        f"trial {r.data.tags['trial']} | " in r.info.run_name and " | lr " in r.info.run_name for r in runs
    )
    assert pruned[0].data.tags["cause"] in pruned[0].info.run_name
    autopsy = client.download_artifacts(pruned[0].info.run_id, "autopsy.json", str(tmp_path))
    assert json.loads(Path(autopsy).read_text())["cause"] == pruned[0].data.tags["cause"]
    for folder in folders:
        assert not (folder / "run" / "mlartifacts").exists()
    assert client.get_model_version_by_alias(MODEL, "safest")

    # A third machine with nothing but the server's address.
    third = tmp_path / "machine-c"
    third.mkdir()
    image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(third / "photo.png")
    load = (f"import mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/{MODEL}@safest'); "
            "out = m.predict(np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)); "
            "print(out.shape, bool(np.isfinite(out).all()))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", load], cwd=third, env=_env(services), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "(1, 3, 32, 32) True" in done.stdout, done.stdout + done.stderr
    _stylepipe("stylize", "--model", f"models:/{MODEL}@safest", "photo.png", "styled.png", cwd=third,
               env=_env(services))  # fmt: skip
    assert Image.open(third / "styled.png").size == (48, 40)
    assert sorted(p.name for p in third.iterdir()) == ["photo.png", "styled.png"]

    # optuna-dashboard, on the same PostgreSQL study, shows the pruned trials and their cause.
    with httpx.Client(base_url=services.dashboard_url, timeout=30) as board:
        found = [s for s in board.get("/api/studies").json()["study_summaries"] if s["study_name"] == study]
        detail = board.get(f"/api/studies/{found[0]['study_id']}", params={"after": 0}).json()
    causes = {
        t["number"]: a["value"] for t in detail["trials"] for a in t["user_attrs"] if a["key"] == "cause"
    }
    shown = [t for t in detail["trials"] if t["number"] in causes]
    assert shown and all(t["state"] == "Pruned" for t in shown), shown  # the baseline, at least
    assert all(causes[t["number"]] in t["note"]["body"] for t in shown), [t["note"] for t in shown]


def test_a_trial_survives_the_mlflow_server_restarting_and_loses_no_step(services, prepared, tmp_path):
    """Last in this module: it restarts the stack's MLflow server."""
    study = "restart"
    overrides = [*TINY, "search.n_trials=1", f"search.study_name={study}", "train.steps=150",
                 "tracking.log_every=1", "final.train=false", "run_dir=run",
                 f"data.content={prepared}"]  # fmt: skip
    args = [str(BIN / "stylepipe"), "worker", "--quiet", "--config", str(DEMO)]
    for override in overrides:
        args += ["--set", override]
    worker = subprocess.Popen(args, cwd=tmp_path, env=_env(services), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    client = MlflowClient(tracking_uri=services.tracking_uri)
    deadline = time.monotonic() + 300
    while True:  # until the trial's run has logged some steps
        assert time.monotonic() < deadline and worker.poll() is None, worker.communicate()[0]
        experiment = client.get_experiment_by_name(study)
        runs = [] if experiment is None else client.search_runs(
            [experiment.experiment_id], "tags.`stylepipe.role` = 'trial'")  # fmt: skip
        if runs and client.get_metric_history(runs[0].info.run_id, "loss/total"):
            break
        time.sleep(1)
    stack_tools.restart(services.folder, "mlflow")
    assert worker.poll() is None, "the trial ended before the server went down: make it longer"
    output, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, output

    trial = optuna.load_study(study_name=study, storage=services.optuna_url).trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "stylepipe.tracking_errors" not in run.data.tags, run.data.tags
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/total"))
    assert steps == list(range(1, 151)) or steps == list(range(150)), (steps[:3], steps[-3:], len(steps))
