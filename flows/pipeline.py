"""The ``style_pipeline`` flow: pipeline.py's stages in their order, each a Prefect task with the
retries and cache key its entry gives, run by chain.py as the commands run them. Thin: every
task is one call to a stage. With ``search.workers`` > 1 it starts that many workers less one on
its work pool (fanout.py), which share the search and the replays.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from flows import fanout
from flows.telemetry import told
from stylepipe import chain, pipeline, stages
from stylepipe.config import Config, load_config
from stylepipe.errors import StylepipeError
from stylepipe.ops.cores import MACHINE
from stylepipe.pipeline import Context, Phase, Stage
from stylepipe.report import picture_markdown, safest_rows


class _UsersMistakeInOneLine(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback, to the console and to the
    server. A user's mistake (a ``StylepipeError``, whose message says what to change) is
    logged without it: one line, as the command line says it. A bug keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StylepipeError):
            record.exc_info = record.exc_text = None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):  # the run loggers' records start here
    logging.getLogger(_name).addFilter(_UsersMistakeInOneLine())


def _settings(config_json: str) -> Config:
    return Config.model_validate_json(config_json)


def _retry_unless_users_mistake(task, task_run, state) -> bool:
    """Retry I/O hiccups, not a user's mistake (an empty folder fails the same way thrice)."""
    try:
        state.result()
    except StylepipeError:
        return False
    except BaseException:
        return True
    return True


def _task_of(stage: Stage) -> Task:
    """The stage as a Prefect task: its own retries, cache, logs and state in the UI."""

    def run_stage(
        config_json: str, done: dict[str, Any], warm_start: dict | None, takes_final_ahead: bool = True
    ) -> Any:
        context = Context(_settings(config_json), cores=MACHINE, warm_start=warm_start, done=done)
        context.takes_final_ahead = takes_final_ahead
        return stage.run(context)

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return f"stylepipe-{stage.name}-{stage.cache_key(_settings(parameters['config_json']))}"

    caching = {"cache_key_fn": cache_key} if stage.cache_key else {"cache_policy": NO_CACHE}
    return task(
        run_stage,
        name=stage.name,
        retries=stage.retries,
        retry_delay_seconds=5 if stage.retries else 0,
        retry_condition_fn=_retry_unless_users_mistake,
        **caching,
    )


def as_tasks() -> chain.Runner:
    """A runner of pipeline.py's stages, each as a Prefect task run (built from the list as it
    is when the flow runs)."""
    tasks = {stage.name: _task_of(stage) for stage in pipeline.STAGES}

    def run(stage: Stage, context: Context) -> Any:
        config_json = context.config.model_dump_json()
        return tasks[stage.name](
            config_json, dict(context.done), context.warm_start, context.takes_final_ahead
        )

    return run


@flow(name="style_pipeline", log_prints=True)
def style_pipeline(
    config_path: str = "configs/demo.yaml", overrides: list[str] | None = None, study_name: str | None = None
) -> dict[str, Any]:
    """Run the whole pipeline once. Each run is its own study, warm-started from the last safest;
    with ``search.workers`` > 1, searched and certified by that many workers of its work pool."""
    logger = get_run_logger()
    config = load_config(config_path, overrides)
    deployment = fanout.check(config, config_path)  # before any work: its workers can be started
    # Named after the flow run's expected start: a retry of this flow run (Prefect's Retry on a
    # crashed run) finds its study, resumes its trials and its final model's checkpoints.
    stamp = (flow_run.get_scheduled_start_time() or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    config = config.with_overrides({"search.study_name": study_name or f"{config.name}-{stamp}"})
    config, _ = chain.inputs_here(config)  # a data.content in the artifact store, read from there

    # told: the library's lines in the run logs, its events as Prefect events. counted: this flow
    # run is one of the machine's workers, so the workers it starts here share the cores with it.
    with told(), MACHINE.counted():
        runner = as_tasks()
        context = Context(config, cores=MACHINE)
        chain.run_phase(Phase.PREPARE, context, runner)
        prepared = context.done[pipeline.PREPARE]
        context.config = config = config.with_overrides({"data.content": prepared["prepared"]})

        context.warm_start = stages.previous_safest(config)
        if context.warm_start:
            logger.info("warm start: enqueuing the previous safest configuration %s", context.warm_start)
        # The workers start before the edge test: a process takes seconds to be picked up and
        # to start, and they wait for the edge (the study's edge lock) rather than run it again.
        shared = fanout.workers_overrides(overrides or [], prepared, pipeline.PUBLISH in context.done)
        workers = fanout.start_workers(config, deployment, config_path, shared)
        context.takes_final_ahead = not workers  # the workers it started train the final ahead
        chain.run_phase(Phase.STUDY, context, runner)
        fanout.cancel_unstarted(workers)  # nothing is left for a worker that never started
        finished = chain.finish(context, runner)  # under the study's finish lock, as the commands
        fanout.wait_for_workers(workers)
    # The flow run's page: the summary with the stability map, the map as an image (where the
    # artifact store is an MLflow server the browser can reach), the safest configuration.
    image, link = finished["stability_map_image_url"], finished["stability_map_link"]
    summary = finished["summary_markdown"] + "\n\n" + picture_markdown("Stability map", image, link)
    create_markdown_artifact(summary, key="stylepipe-summary", description="stylepipe run summary")
    if image:
        create_image_artifact(image, key="stylepipe-stability-map", description="the study's stability map")
    create_table_artifact(
        safest_rows(finished["safest"], finished["nothing_safe"]),
        key="stylepipe-safest",
        description="the safest configuration and its certificate",
    )
    create_table_artifact(
        finished["top_trials"], key="stylepipe-top-trials", description="the best complete trials"
    )
    if finished["safest"] is None:
        logger.warning("no safe configuration: nothing is registered and the champion stays")
    elif finished["promotion"] is not None:
        logger.info("promotion: %s", finished["promotion"]["why"])
    return {"prepared": prepared, "edge": context.done[pipeline.EDGE], **finished}
