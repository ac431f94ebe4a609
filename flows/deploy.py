"""The scheduled deployment of ``style_pipeline``: a cron schedule from the settings.

``stylepipe serve --config ...`` (or ``make serve``) registers the deployment on the
Prefect server named by PREFECT_API_URL and runs its scheduled flow runs until stopped.
"""

from __future__ import annotations

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


def serve(config_path: str, overrides: list[str] | None = None) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(config_path, overrides))
