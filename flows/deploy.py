"""The scheduled deployment of ``style_pipeline``: a cron schedule from the settings.

Two ways to run it, on the Prefect server named by PREFECT_API_URL:

* ``stylepipe-flow deploy --config ... --pool POOL`` registers it for a work pool, whose
  workers (``prefect worker start --pool POOL``, on the GPU machines) run its flow runs. This
  is production: the deployment outlives the shell that made it. It is Prefect's Python
  deployment API, the same server objects as ``prefect deploy`` with a ``prefect.yaml``; the
  cron and parameters come from the stylepipe settings, so there is one place to edit them.
* ``stylepipe-flow serve --config ...`` (``make serve``) registers it and runs its flow runs
  in that one process until stopped: no work pool, for one machine.
"""

from __future__ import annotations

from pathlib import Path

from prefect.client.schemas.schedules import CronSchedule

from flows.pipeline import style_pipeline
from stylepipe.config import load_config


def build_deployment(config_path: str, overrides: list[str] | None = None):
    """A RunnerDeployment of the pipeline with the config's cron schedule (not yet applied)."""
    config = load_config(config_path, overrides)
    schedule = config.schedule
    schedules = [CronSchedule(cron=schedule.cron, timezone=schedule.timezone)] if schedule.cron else []
    return style_pipeline.to_deployment(
        name=schedule.deployment,
        schedules=schedules,
        parameters={"config_path": config_path, "overrides": overrides or []},
        description=f"stylepipe on a schedule ({schedule.cron or 'manual runs only'})",
        tags=["stylepipe", config.name],
    )


def deploy(config_path: str, pool: str, overrides: list[str] | None = None, source: str | None = None) -> str:
    """Register the deployment for the work pool ``pool``; its id. ``source`` is where workers
    fetch the flow's code: this checkout (default, one machine), or a git URL."""
    root = Path(__file__).resolve().parents[1]
    runner = build_deployment(config_path, overrides)
    remote = style_pipeline.from_source(
        source=source or str(root), entrypoint="flows/pipeline.py:style_pipeline"
    )
    return str(
        remote.deploy(
            name=runner.name,
            work_pool_name=pool,
            schedules=runner.schedules,
            parameters=runner.parameters,
            description=runner.description,
            tags=runner.tags,
            print_next_steps=False,
        )
    )


def serve(config_path: str, overrides: list[str] | None = None) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(config_path, overrides))
