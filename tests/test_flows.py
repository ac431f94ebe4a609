"""The Prefect flow end to end on tiny settings, against Prefect's test harness."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path

import pytest

# Prefect reads its settings once, at import: point its home at a scratch folder first.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="stylepipe-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from mlflow import MlflowClient  # noqa: E402
from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.schedules import CronSchedule  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.flow_engine import run_flow  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.deploy import build_deployment  # noqa: E402
from flows.pipeline import style_pipeline  # noqa: E402
from stylepipe import pipeline  # noqa: E402
from stylepipe.config import load_config  # noqa: E402
from tests.helpers import DEMO, a_stage_added_after_confirm  # noqa: E402

pytestmark = pytest.mark.slow  # Prefect's test server and whole pipeline runs

TINY = [
    "search.edge_steps=10",  # the shortest edge test: these tests are about other things
    "search.edge_probes=2",
    "data.image_size=32",
    "prepare.image_size=32",
    "prepare.workers=1",
    "prepare.val_fraction=0.25",
    "train.steps=8",
    "train.batch_size=2",
    "train.warmup_steps=0",
    "train.check_every=4",
    "train.device=cpu",
    "search.n_trials=3",
    "search.eval_every=4",
    "search.space.lr=[1e-3,1e-2]",
    "search.top_k=1",
    "search.replay_seeds=0",
    "search.max_val_images=4",
    "search.confirm_steps=8",
    "final.steps=8",
    "tracking.registered_model=flow-style",
    "schedule.cron=15 4 * * 1",
]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def first_run(harness, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline")
    # The config's own lr (the baseline, trial 0) diverges: an event; the search's trials do not.
    overrides = [*TINY, f"run_dir={run_dir}", "train.lr=50"]
    # with one more stage in pipeline.py's list, which the flow must run in its place (checked below)
    with a_stage_added_after_confirm() as added_stage_saw:
        state = style_pipeline(str(DEMO), overrides, study_name="first", return_state=True)
    return run_dir, overrides, state, added_stage_saw


def _artifacts(flow_run_id):
    async def read():
        async with get_client() as client:
            found = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            return await client.read_artifacts(artifact_filter=found)

    return {a.key: a for a in asyncio.run(read())}


def _task_states(flow_run_id) -> dict[str, str]:
    async def read():
        async with get_client() as client:
            found = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
            return await client.read_task_runs(task_run_filter=found)

    return {run.name.rsplit("-", 1)[0]: run.state.name for run in asyncio.run(read())}


def test_the_flow_completes_registers_a_champion_and_leaves_artifacts(first_run):
    run_dir, overrides, state, _ = first_run
    assert state.is_completed()
    result = state.result()
    assert result["safest"] is not None and result["model"]["version"] == "1"
    assert (
        result["promotion"]["promoted"]
        and result["promotion"]["why"] == "version 1 is now the champion; there was none"
    )
    assert Path(result["stability_map"]).is_file() and (run_dir / "prepared" / "report.md").is_file()
    # the stability edge is a task of its own, before the search; its line is in the result
    assert _task_states(state.state_details.flow_run_id)["stability edge"] == "Completed"
    assert result["edge"]["line"].startswith("stability edge: ")
    config = load_config(DEMO, overrides)
    client = MlflowClient(tracking_uri=config.tracking_uri)
    assert str(client.get_model_version_by_alias("flow-style", "champion").version) == "1"
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert "Safest configuration" in artifacts["stylepipe-summary"].data
    # the stability map: a local artifact store is a link (an MLflow server's: test_topology.py)
    assert "[Stability map](file://" in artifacts["stylepipe-summary"].data
    assert "stylepipe-stability-map" not in artifacts
    safest = {row["setting"]: row["value"] for row in json.loads(artifacts["stylepipe-safest"].data)}
    assert safest["trial"] == str(result["safest"].trial)
    assert safest["certificate"] == result["safest"].certificate.text and "lr" in safest
    assert artifacts["stylepipe-top-trials"].type == "table"
    assert '"lr"' in artifacts["stylepipe-top-trials"].data


def test_a_stage_added_to_the_list_runs_in_the_flow_as_a_task_in_order_under_the_finish_lock(first_run):
    _, _, state, added_stage_saw = first_run

    async def task_runs():
        async with get_client() as client:
            found = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            return await client.read_task_runs(task_run_filter=found)

    names = [
        run.name.rsplit("-", 1)[0]
        for run in sorted(asyncio.run(task_runs()), key=lambda r: r.expected_start_time)
    ]
    before = [pipeline.PREPARE, pipeline.EDGE, pipeline.SEARCH, pipeline.REPLAYS, pipeline.CONFIRM]
    after = [pipeline.TRAIN_FINAL, pipeline.REGISTER, pipeline.PROMOTE, pipeline.REPORT, pipeline.RECORD]
    assert names == [*before, "dummy", *after]
    assert added_stage_saw == [(before, True)]


def _read_back(read, ready, timeout: float = 20.0):
    """Prefect stores run logs and events a few seconds after they are sent: ask until ``ready``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = asyncio.run(read())
        if ready(found) or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_the_libraries_lines_are_in_the_run_logs_and_its_events_in_prefect(first_run):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.events.filters import EventFilter, EventNameFilter

    _, _, state, _ = first_run
    flow_run_id = state.state_details.flow_run_id
    result = state.result()

    async def logs():
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    found = _read_back(
        logs, lambda found: any(r.message == f"trial {result['safest'].trial}: safe" for r in found)
    )
    ours = [r for r in found if r.name.startswith("stylepipe")]
    messages = [r.message for r in ours]
    assert f"trial {result['safest'].trial}: safe" in messages  # the certificate's verdict
    assert any(m.startswith("stability edge: ") for m in messages)  # the edge test's line
    assert all(r.task_run_id is not None for r in ours)  # each in the log of the task that said it
    assert logging.getLogger("stylepipe").handlers == []  # handed back after the run

    async def events():
        async with get_client() as client:
            page = await client.read_events(
                EventFilter(event=EventNameFilter(prefix=["stylepipe."])), limit=50
            )
            return [e for e in page.events if e.payload.get("study") == "first"]

    seen = _read_back(events, lambda found: {e.event for e in found} >= {
        "stylepipe.trial.diverged", "stylepipe.study.certified", "stylepipe.model.promoted"})  # fmt: skip
    by_name = {e.event: e for e in seen}
    diverged = by_name["stylepipe.trial.diverged"]
    assert diverged.resource.id == "stylepipe.study.first" and diverged.payload["lr"] == 50
    assert diverged.payload["trial"] == 0 and diverged.payload["cause"]
    certified = by_name["stylepipe.study.certified"]
    assert certified.payload["trial"] == result["safest"].trial
    assert certified.payload["certificate"] == result["safest"].certificate.text
    promoted = by_name["stylepipe.model.promoted"]
    assert promoted.resource.id == "stylepipe.model.flow-style"
    assert promoted.payload["version"] == "1" and promoted.payload["alias"] == "champion"
    assert {r.id for r in promoted.related} >= {"stylepipe.study.first", f"prefect.flow-run.{flow_run_id}"}


def test_a_second_run_through_the_deployment_warm_starts_and_keeps_a_better_champion(first_run):
    """The deployment carries the config's cron; a run through it (as the schedule would start
    one) warm-starts from the first run's safest and leaves the better champion in place."""
    import optuna

    run_dir, overrides, _, _ = first_run
    previous = load_config(DEMO, overrides)
    safest_before = (run_dir / "last_safest.json").read_text()
    # A final model trained for one step cannot beat the 8-step champion on the same images.
    second = [*overrides, "final.steps=1"]
    name = f"style_pipeline/{previous.schedule.deployment}"
    deployment_id = build_deployment(str(DEMO), second).apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name(name)

    deployment = asyncio.run(read())
    assert deployment.id == deployment_id
    schedule = deployment.schedules[0].schedule
    assert isinstance(schedule, CronSchedule) and schedule.cron == "15 4 * * 1"
    flow_run = run_deployment(name, parameters={"study_name": "second"}, timeout=0)
    assert flow_run.deployment_id == deployment_id
    state = run_flow(style_pipeline, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
    assert state.is_completed()
    result = state.result()
    # the images did not change: prepare is a cache hit, not a second decode
    assert _task_states(flow_run.id)["prepare"] == "Cached"
    study = optuna.load_study(study_name="second", storage=previous.storage_url)
    enqueued = json.loads(safest_before)["params"]
    warm = [t for t in study.trials if t.user_attrs.get("warm_start")]
    assert len(warm) == 1 and warm[0].params["lr"] == pytest.approx(enqueued["lr"])  # the warm start
    assert result["model"]["version"] == "2"
    promotion = result["promotion"]
    assert not promotion["promoted"] and promotion["champion_before"] == "1"
    assert promotion["quality"] > promotion["champion_quality"]
    client = MlflowClient(tracking_uri=previous.tracking_uri)
    assert str(client.get_model_version_by_alias("flow-style", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("flow-style", "safest").version) == "2"


def test_a_finished_study_run_again_by_the_flow_reports_it_and_other_settings_are_refused(first_run):
    """``stylepipe-flow run --study NAME`` on a finished study: its recorded result, nothing
    trained, registered or rewritten; with other settings, a failed flow run naming them."""
    run_dir, overrides, _, _ = first_run
    config = load_config(DEMO, overrides)
    client = MlflowClient(tracking_uri=config.tracking_uri)
    versions = sorted(v.version for v in client.search_model_versions("name='flow-style'"))
    safest = run_dir / "safest.json"
    written = (safest.read_bytes(), safest.stat().st_mtime_ns)

    again = style_pipeline(str(DEMO), overrides, study_name="first", return_state=True)
    assert again.is_completed(), again.message
    assert again.result()["recorded_before"] is True
    other = style_pipeline(str(DEMO), [*overrides, "train.lr=0.02"], study_name="first", return_state=True)
    assert other.is_failed() and "train.lr (" in other.message, other.message

    assert sorted(v.version for v in client.search_model_versions("name='flow-style'")) == versions
    assert (safest.read_bytes(), safest.stat().st_mtime_ns) == written


def test_a_temporary_server_that_does_not_start_is_one_line_and_a_non_zero_exit(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1", "STYLEPIPE_OFFLINE": "1"}
    for inherited in ("PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(inherited, None)
    command = [str(Path(sys.executable).parent / "stylepipe-flow"), "run", "--config", str(DEMO),
               "--set", f"run_dir={tmp_path}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    assert "error: Prefect's temporary server did not start within 1 s" in done.stderr


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_users_mistake_inside_a_flow_is_logged_in_one_line_without_a_traceback(harness, tmp_path):
    (tmp_path / "empty").mkdir()
    seen = _Records()
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(seen)
    try:
        state = style_pipeline(str(DEMO), [*TINY, f"run_dir={tmp_path / 'run'}", f"data.content={tmp_path / 'empty'}"],
                               study_name="mistake", return_state=True)  # fmt: skip
    finally:
        for logger in loggers:
            logger.removeHandler(seen)
    assert state.is_failed() and "empty" in state.message
    errors = [r for r in seen.records if r.levelno >= logging.ERROR]
    assert errors and all(r.exc_info is None for r in errors), [r.getMessage() for r in errors]
    assert any("empty" in r.getMessage() for r in errors)


def test_a_bug_inside_a_flow_keeps_its_traceback_in_the_log():
    import flows.pipeline

    (keep,) = [
        f
        for f in logging.getLogger("prefect.flow_runs").filters
        if type(f).__name__ == "_UsersMistakeInOneLine"
    ]
    for error, kept in (
        (RuntimeError("a bug"), True),
        (flows.pipeline.StylepipeError("your mistake"), False),
    ):
        record = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed", None,
                                   (type(error), error, None))  # fmt: skip
        assert keep.filter(record) and (record.exc_info is not None) == kept


def test_a_pool_without_the_worker_deployment_is_one_line_naming_the_command(harness, monkeypatch):
    """A flow run on a pool where `stylepipe-flow deploy` was not run: said before any work."""
    from flows import fanout

    monkeypatch.setattr(fanout, "_pool_of_this_run", lambda config, path: "gpu")  # a run of pool gpu
    # a config name of its own: the test below deploys search_worker/demo
    config = load_config(
        DEMO, ["name=nowhere", "search.workers=3", "search.storage=postgresql://u@db:5432/optuna"]
    )
    with pytest.raises(fanout.FanOutError) as refused:
        fanout.check(config, "configs/demo.yaml")
    assert str(refused.value) == (
        "the deployment search_worker/nowhere is missing: add it to work pool gpu with "
        "stylepipe-flow deploy --config configs/demo.yaml --pool gpu"
    )
    assert "\n" not in str(refused.value)


def test_a_flow_run_starts_its_workers_once_with_the_password_masked_and_cancels_the_unstarted(
    harness, monkeypatch
):
    """The workers of one flow run: started again by a retry of it, the same flow runs come back
    (their idempotency keys); their parameters carry the storage with its password masked; once
    the work is done, those no machine picked up are cancelled."""
    from prefect import flow
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType

    from flows import fanout, worker

    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(name="idle", type="process"), overwrite=True
        )  # no worker polls it
    worker.deploy(str(DEMO), "idle")
    monkeypatch.setattr(fanout, "_pool_of_this_run", lambda config, path: "idle")
    config = load_config(DEMO, ["search.workers=3", "search.study_name=idle-study",
                                "search.storage=postgresql://u:s3cret@db:5432/optuna"])  # fmt: skip

    @flow
    def starts_twice():
        deployment = fanout.check(config, str(DEMO))
        first = fanout.start_workers(config, deployment, str(DEMO), ["train.steps=8"])
        again = fanout.start_workers(config, deployment, str(DEMO), ["train.steps=8"])  # as a retry would
        fanout.cancel_unstarted(first)
        return first, again

    first, again = starts_twice()
    assert len(first) == 2 and first == again
    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(run_id) for run_id in first]
    assert [r.name for r in runs] == ["idle-study worker 2", "idle-study worker 3"]
    assert all(r.work_pool_name == "idle" for r in runs)
    parameters = runs[0].parameters
    assert parameters["storage"] == "postgresql://u:***@db:5432/optuna" and "s3cret" not in json.dumps(
        parameters
    )
    assert parameters["study_name"] == "idle-study" and parameters["finish"] is False
    assert all(r.state.type in (StateType.CANCELLED, StateType.CANCELLING) for r in runs), [
        r.state for r in runs
    ]
