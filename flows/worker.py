"""A Prefect flow that runs one search worker, for work pools that start many.

The scheduled pipeline starts ``search.workers - 1`` of them itself (flows/fanout.py); they can
also be started by hand, on a study in PostgreSQL:

    prefect work-pool create stylepipe-gpu --type process
    prefect worker start --pool stylepipe-gpu          # on each GPU machine
    stylepipe-flow deploy --config configs/coco256.yaml --pool stylepipe-gpu   # both deployments
    prefect deployment run search_worker/coco256 --param storage=postgresql://...

A worker whose process dies (a lost machine, an OOM kill) ends Crashed, which Prefect does not
retry by itself: its ``on_crashed`` hook starts a replacement on the same pool, up to
``MAX_ATTEMPTS`` in all. Its unfinished trial or replay is taken over through heartbeats.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.deployments import run_deployment

from flows.telemetry import told
from stylepipe.config import load_config
from stylepipe.ops.workers import run_worker
from stylepipe.search.worker_id import worker_id

log = logging.getLogger("stylepipe.fanout")

MAX_ATTEMPTS = 3


def _replace_crashed_worker(flow, flow_run, state) -> None:
    """on_crashed: the same worker again, on the same pool (the study goes on without it)."""
    attempt = int(flow_run.parameters.get("attempt", 1))
    if flow_run.deployment_id is None or attempt >= MAX_ATTEMPTS:
        return
    run = run_deployment(
        flow_run.deployment_id,
        parameters={**flow_run.parameters, "attempt": attempt + 1},
        timeout=0,
        as_subflow=False,
        flow_run_name=f"{flow_run.name} (attempt {attempt + 1})",
    )
    log.warning("worker %s crashed (%s): replaced by flow run %s", flow_run.name, state.message, run.name)


@flow(name="search_worker", retries=1, retry_delay_seconds=10, on_crashed=[_replace_crashed_worker])
def search_worker(
    config_path: str,
    storage: str,
    overrides: list[str] | None = None,
    study_name: str | None = None,
    finish: bool = True,
    attempt: int = 1,
) -> dict[str, Any]:
    """Join the study in ``storage`` as one worker: trials, then the certificate's replays; the
    last to leave finishes the study, unless ``finish`` is False (the pipeline finishes it)."""
    extra = [f"search.storage={storage}", *([f"search.study_name={study_name}"] if study_name else [])]
    config = load_config(config_path, [*(overrides or []), *extra])
    with told():
        log.info("worker %s joins study %s", worker_id(), config.study_name)
        result = run_worker(config, finish=finish)
    return {
        k: v for k, v in result.items() if k in ("trials_run", "replays_run", "finished_study", "fetched")
    }


def deploy(config_path: str, pool: str, source: str | None = None) -> str:
    """Register ``search_worker/<config name>`` on the Prefect server, for the work pool ``pool``."""
    config = load_config(config_path)
    root = Path(__file__).resolve().parents[1]
    remote = search_worker.from_source(source=source or str(root), entrypoint="flows/worker.py:search_worker")
    return str(
        remote.deploy(
            name=config.name,
            work_pool_name=pool,
            parameters={"config_path": str(Path(config_path).resolve())},
            tags=["stylepipe", config.name],
            print_next_steps=False,
        )
    )
