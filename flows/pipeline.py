"""The ``style_pipeline`` flow: prepare -> search -> confirm safest -> train final ->
register -> promote -> report. Thin: every task is one call into the library.

Retries only where the work is I/O (reading images, the registry); never for training,
where a NaN is an answer, not a glitch. ``prepare`` is cached by its input's content.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext

from stylepipe import report
from stylepipe.config import Config, load_config
from stylepipe.data.prepare import source_fingerprint
from stylepipe.pipeline import prepare_stage, previous_safest, source_dir
from stylepipe.search.promotion import promote_if_better
from stylepipe.search.study import SearchSession, confirm, run_trials, summarise, train_final_model


def _settings(config_json: str) -> Config:
    return Config.model_validate_json(config_json)


def _prepare_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Same source content (paths, sizes, times) and same settings: same prepared shard."""
    config = _settings(parameters["config_json"])
    settings = json.dumps(config.prepare.model_dump(mode="json"), sort_keys=True)
    digest = hashlib.sha256(f"{source_fingerprint(source_dir(config))}|{settings}|{config.run_dir}".encode())
    return f"stylepipe-prepare-{digest.hexdigest()}"


@task(name="prepare", retries=2, retry_delay_seconds=5, cache_key_fn=_prepare_cache_key)
def prepare_task(config_json: str) -> dict[str, Any]:
    return prepare_stage(_settings(config_json))


@task(name="search")
def search_task(config_json: str, warm_start: dict | None) -> dict[str, Any]:
    with SearchSession(_settings(config_json)) as session:
        ran = run_trials(session, progress=False, warm_start_params=warm_start)
        return {"trials_run": ran, "study": session.study.study_name}


@task(name="confirm safest")
def confirm_task(config_json: str) -> dict | None:
    with SearchSession(_settings(config_json)) as session:
        return confirm(session)


@task(name="train final and register")
def train_final_task(config_json: str, safest: dict) -> dict[str, Any]:
    with SearchSession(_settings(config_json)) as session:
        return train_final_model(session, safest)


@task(name="promote", retries=2, retry_delay_seconds=5)
def promote_task(config_json: str, version: str) -> dict[str, Any]:
    return promote_if_better(_settings(config_json), version)


@task(name="report")
def report_task(config_json: str, safest: dict | None, model: dict | None, promotion: dict | None) -> dict:
    with SearchSession(_settings(config_json)) as session:
        result = summarise(session, safest, model)
    trials = result.trials
    summary = report.pipeline_markdown(trials, safest, model, promotion)
    create_markdown_artifact(summary, key="stylepipe-summary", description="stylepipe run summary")
    top = report.top_trials(trials, k=10)
    create_table_artifact(json.loads(top.to_json(orient="records")), key="stylepipe-top-trials",
                          description="the best complete trials")  # fmt: skip
    return {"stability_map": str(result.stability_map), "safest_json": str(result.safest_path)}


@flow(name="style_pipeline", log_prints=True)
def style_pipeline(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
                   study_name: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the whole pipeline once. Each run is its own study, warm-started from the last safest."""
    logger = get_run_logger()
    config = load_config(config_path, overrides)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    config = config.with_overrides({"search.study_name": study_name or f"{config.name}-{stamp}"})

    prepared = prepare_task(config.model_dump_json())
    config = config.with_overrides({"data.content": prepared["prepared"]})
    config_json = config.model_dump_json()

    warm = previous_safest(config)
    if warm:
        logger.info("warm start: enqueuing the previous safest configuration %s", warm)
    search = search_task(config_json, warm)
    safest = confirm_task(config_json)
    model = promotion = None
    if safest is None:
        logger.warning("no safe configuration: nothing is registered and the champion stays")
    else:
        model = train_final_task(config_json, safest)
        promotion = promote_task(config_json, model["version"])
        logger.info("promotion: %s", promotion["why"])
    paths = report_task(config_json, safest, model, promotion)
    return {"study": search["study"], "prepared": prepared, "safest": safest, "model": model,
            "promotion": promotion, **paths}  # fmt: skip
