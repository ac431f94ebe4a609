"""Fan-out: a scheduled flow run with ``search.workers: N`` starts N - 1 ``search_worker`` flow
runs on its own work pool (``run_deployment``), works as one worker itself, and waits for the
others. They share the study's trials and its certificate's replays through the PostgreSQL
study (search/replays.py); one of them trains the best candidate's final model while the others
replay (speculative.py); registering it stays with the flow run that started them. Each worker
has a run folder of its own, ``<run_dir>/workers/<number>`` on its machine.

The workers get the study's name and its storage URL with the password masked: each machine
gives the password by its environment (STYLEPIPE_SEARCH_STORAGE, or PGPASSWORD), as for any
run of the deployment.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling

from stylepipe.config import Config
from stylepipe.errors import StylepipeError
from stylepipe.ops.workers import check_fan_out
from stylepipe.stores import redact_url

log = logging.getLogger("stylepipe.fanout")

WORKER_FLOW = "search_worker"
NOT_STARTED = (StateType.SCHEDULED, StateType.PENDING)
POLL_S = 5.0


class FanOutError(StylepipeError):
    """The flow run cannot start its workers; the message says what to do."""


def worker_deployment(config: Config) -> str:
    """The search_worker deployment a pipeline of this config starts: ``search_worker/<name>``."""
    return f"{WORKER_FLOW}/{config.name}"


def _pool_of_this_run(config: Config, config_path: str) -> str:
    context = FlowRunContext.get()
    pool = context.flow_run.work_pool_name if context is not None else None
    if pool is None:
        raise FanOutError(
            f"search.workers={config.search.workers} starts workers on the work pool of the flow run, and this "
            "one was started outside a work pool: deploy the pipeline to a pool (stylepipe-flow deploy "
            f"--config {config_path} --pool POOL) and run it there, or set search.workers=1"
        )
    return pool


def check(config: Config, config_path: str) -> str | None:
    """Before any work: the workers' deployment, when this flow run can start them (None with
    ``search.workers: 1``); a ``FanOutError`` saying what to do when it cannot."""
    if config.search.workers < 2:
        return None
    check_fan_out(config)
    pool = _pool_of_this_run(config, config_path)
    name = worker_deployment(config)
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            deployment = None
    if deployment is None or deployment.work_pool_name != pool:
        where = "is missing" if deployment is None else f"is on work pool {deployment.work_pool_name}"
        raise FanOutError(
            f"the deployment {name} {where}: add it to work pool {pool} with "
            f"stylepipe-flow deploy --config {config_path} --pool {pool}"
        )
    return name


def workers_overrides(overrides: list[str], prepared: dict, published: bool) -> list[str]:
    """The settings the workers get: the flow run's own overrides and, where they need it, the
    folder it prepared. Published (the prepare phase's end), the images reach them through the
    study's MLflow run: no folder of this machine is one of their settings. Not published
    (data.publish: never), the folder prepared here, on a disk they must share. A data.content
    that needed no preparation (a prepared folder, an artifact URL) reaches them as it was given."""
    handed = "skipped" in prepared or published
    return [*overrides, *([] if handed else [f"data.content={prepared['prepared']}"])]


def start_workers(
    config: Config, deployment: str | None, config_path: str, overrides: list[str]
) -> list[UUID]:
    """Start ``search.workers`` - 1 runs of ``deployment`` (what ``check`` found; None: none to
    start) on the same study; their flow-run ids. A retry of this flow run gets the same runs
    back (their idempotency keys), not new ones."""
    if deployment is None:
        return []
    helpers = config.search.workers - 1
    parent = FlowRunContext.get().flow_run
    runs = []
    for number in range(2, helpers + 2):
        # Its own run folder, on whichever machine runs it: no folder of the pipeline's is one of
        # its paths (its final runs and checkpoints are its own; what it needs travels by MLflow).
        own = f"run_dir={Path(config.run_dir) / 'workers' / str(number)}"
        run = run_deployment(
            deployment,
            parameters={
                "config_path": config_path,
                "storage": redact_url(config.storage_url),
                "overrides": [*overrides, own],
                "study_name": config.study_name,
                "finish": False,
            },
            timeout=0,
            flow_run_name=f"{config.study_name} worker {number}",
            idempotency_key=f"{parent.id}:worker-{number}",
            tags=["stylepipe", config.name],
        )
        log.info(
            "started worker %d of %d: flow run %s of %s", number, config.search.workers, run.name, deployment
        )
        runs.append(run.id)
    return runs


def cancel_unstarted(runs: list[UUID]) -> None:
    """The search and its replays are done: a worker still waiting for a machine has nothing
    left to do, and is cancelled."""
    if not runs:
        return
    with get_client(sync_client=True) as client:
        for run_id in runs:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.type in NOT_STARTED:
                client.set_flow_run_state(run_id, Cancelling(message="the study's work was done without it"))
                log.warning(
                    "worker %s never started (no free worker on its pool): cancelled, nothing was left to do",
                    run.name,
                )


def wait_for_workers(runs: list[UUID], timeout_s: float = 600.0) -> dict[str, str]:
    """Wait for the workers' flow runs to end; their final states by name. One that died was
    replaced by its hook; its unfinished trial or replay was taken over through heartbeats."""
    if not runs:
        return {}
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for run_id in runs:
            while True:
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
            states[run.name] = run.state.name if run.state is not None else "unknown"
            log.info("worker %s: %s", run.name, states[run.name])
    return states
