"""The ``style_pipeline`` flow: prepare -> stability edge -> search -> certificate replays, then the
study finished in chain.py's order (confirm safest -> train final -> register -> promote -> record
-> report). Thin: every task is one call to a stage in ``stylepipe.stages``. With
``search.workers`` > 1 it starts that many workers less one on its work pool (fanout.py), which
share the search and the replays.

Retries where the work is I/O (reading images, the registry) and for the final training,
which resumes from its checkpoints; never for a user's mistake, nor for a NaN, which is an
answer, not a glitch. ``prepare`` is cached by its input's content.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from flows import fanout
from flows.telemetry import told
from stylepipe import chain, stages
from stylepipe.config import Config, load_config
from stylepipe.errors import StylepipeError
from stylepipe.ops.cores import MACHINE
from stylepipe.records import FinalRun, Safest
from stylepipe.search.storage import StudyLock


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


def _prepare_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Same source content (paths, sizes, times) and same settings: same prepared shard."""
    return f"stylepipe-prepare-{stages.prepare_fingerprint(_settings(parameters['config_json']))}"


@task(
    name="prepare",
    retries=2,
    retry_delay_seconds=5,
    cache_key_fn=_prepare_cache_key,
    retry_condition_fn=_retry_unless_users_mistake,
)
def prepare_task(config_json: str) -> dict[str, Any]:
    return stages.prepare(_settings(config_json), cores=MACHINE)


@task(name="stability edge", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_users_mistake)
def edge_task(config_json: str) -> dict[str, Any]:
    return stages.edge(_settings(config_json))


@task(name="search")
def search_task(config_json: str, warm_start: dict | None) -> dict[str, Any]:
    return stages.search(_settings(config_json), warm_start, cores=MACHINE)


@task(name="certificate replays")
def replays_task(config_json: str) -> dict[str, Any]:
    return stages.replays(_settings(config_json), cores=MACHINE)


@task(name="confirm safest")
def confirm_task(config_json: str) -> Safest | None:
    return stages.confirm(_settings(config_json))


@task(name="record finished")
def record_task(config_json: str, safest: Safest | None, model: dict | None) -> dict:
    return stages.record_finished(_settings(config_json), safest, model)


@task(name="train final", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_users_mistake)
def train_final_task(config_json: str, safest: Safest) -> FinalRun:
    return stages.train_final(_settings(config_json), safest)


@task(name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_users_mistake)
def register_task(config_json: str, final: FinalRun) -> dict[str, Any]:
    return stages.register(_settings(config_json), final)


@task(name="promote", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_users_mistake)
def promote_task(config_json: str, version: str) -> dict[str, Any]:
    return stages.promote(_settings(config_json), version)


@task(name="report")
def report_task(config_json: str, safest: Safest | None, model: dict | None, promotion: dict | None) -> dict:
    reported = stages.report(_settings(config_json), safest, model, promotion)
    create_markdown_artifact(
        reported["summary_markdown"], key="stylepipe-summary", description="stylepipe run summary"
    )
    create_table_artifact(
        reported["top_trials"], key="stylepipe-top-trials", description="the best complete trials"
    )
    return reported


STEP_TASKS = {
    "confirm": confirm_task,
    "train final": train_final_task,
    "register": register_task,
    "promote": promote_task,
    "record": record_task,
    "report": report_task,
}


def as_task(step: str, config: Config, *args: Any) -> Any:
    """chain.finish's steps, each a Prefect task run (its own retries, logs and state in the UI)."""
    return STEP_TASKS[step](config.model_dump_json(), *args)


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

    # told: the library's lines in the run logs, its events as Prefect events. counted: this flow
    # run is one of the machine's workers, so the workers it starts here share the cores with it.
    with told(), MACHINE.counted():
        prepared = prepare_task(config.model_dump_json())
        config = config.with_overrides({"data.content": prepared["prepared"]})
        config_json = config.model_dump_json()

        warm = stages.previous_safest(config)
        if warm:
            logger.info("warm start: enqueuing the previous safest configuration %s", warm)
        # The workers start before the edge test: a process takes seconds to be picked up and
        # to start, and they wait for the edge (the study's edge lock) rather than run it again.
        shared = [*(overrides or []), f"data.content={prepared['prepared']}"]
        workers = fanout.start_workers(config, deployment, config_path, shared)
        edge = edge_task(config_json)  # its line is logged by the stage
        search = search_task(config_json, warm)
        replays_task(config_json)
        fanout.cancel_unstarted(workers)  # nothing is left for a worker that never started
        with StudyLock(config, "finish"):  # whoever finishes a study holds it (chain.py), the flow too
            finished = chain.finish(config, as_task)
        fanout.wait_for_workers(workers)
    if finished["safest"] is None:
        logger.warning("no safe configuration: nothing is registered and the champion stays")
    elif finished["promotion"] is not None:
        logger.info("promotion: %s", finished["promotion"]["why"])
    return {"prepared": prepared, "edge": edge, **finished, "study": search["study"]}
