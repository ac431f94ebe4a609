"""A Prefect flow that runs one search worker, for work pools that start many.

Deploy it to a process (or Kubernetes, Docker...) work pool and start as many flow runs
as you want workers; they share the study through the PostgreSQL storage URL:

    prefect work-pool create stylepipe-gpu --type process
    prefect worker start --pool stylepipe-gpu          # on each GPU machine
    stylepipe-flow deploy-worker --config configs/coco256.yaml --pool stylepipe-gpu
    prefect deployment run search_worker/coco256 --param storage=postgresql://...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from stylepipe.config import load_config
from stylepipe.ops.workers import run_worker


@flow(name="search_worker")
def search_worker(config_path: str, storage: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Join the study in ``storage`` as one worker; the last one to finish confirms the safest."""
    config = load_config(config_path, [*(overrides or []), f"search.storage={storage}"])
    result = run_worker(config)
    return {k: v for k, v in result.items() if k in ("trials_run", "finished_study")}


def deploy(config_path: str, pool: str) -> None:
    """Register ``search_worker/<config name>`` on the Prefect server, for the work pool ``pool``."""
    config = load_config(config_path)
    root = Path(__file__).resolve().parents[1]
    search_worker.from_source(source=str(root), entrypoint="flows/worker.py:search_worker").deploy(
        name=config.name,
        work_pool_name=pool,
        parameters={"config_path": str(Path(config_path).resolve())},
    )
