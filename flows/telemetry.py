"""What the flows tell Prefect besides task states: stylepipe's events as Prefect events that a
user's automation can act on, and the library's log lines in the run logs the Prefect UI shows.

Events (their resource is the study, or the registered model for a promotion):

    stylepipe.trial.diverged    a trial went NaN or diverged (cause, lr, step)
    stylepipe.study.certified   a study's safest configuration passed its certificate
    stylepipe.model.promoted    a registered version became the champion (version, alias)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from prefect.context import get_run_context
from prefect.events import emit_event
from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

from stylepipe import events

LIBRARY_LOGGER = "stylepipe"


def study_resource(study: str) -> dict[str, str]:
    return {"prefect.resource.id": f"stylepipe.study.{study}", "prefect.resource.name": study}


def model_resource(model: str) -> dict[str, str]:
    return {"prefect.resource.id": f"stylepipe.model.{model}", "prefect.resource.name": model}


def to_prefect(name: str, fields: dict[str, Any]) -> None:
    """One stylepipe event as a Prefect event (``stylepipe.<name>``)."""
    if name == events.MODEL_PROMOTED:
        resource = model_resource(fields["model"])
        related = [{**study_resource(fields["study"]), "prefect.resource.role": "study"}]
    else:
        resource, related = study_resource(fields["study"]), []
    emit_event(event=f"stylepipe.{name}", resource=resource, related=related, payload=fields)


def _in_a_run(record: logging.LogRecord) -> bool:
    """A line logged outside any flow or task run (a library thread of its own) has no run log."""
    try:
        get_run_context()
    except MissingContextError:
        return False
    return True


@contextmanager
def library_logs_in_run_logs() -> Iterator[None]:
    """Inside, the library's INFO lines also go to the Prefect run logs (of the flow run, and of
    the task run that logged them). Only Prefect's API handler is added: the console shows each
    line once. (Prefect's ``logging.extra_loggers`` setting does the same, but only
    when set before Prefect configures its logging, which a work pool's runs have done.)"""
    logger = logging.getLogger(LIBRARY_LOGGER)
    handler = APILogHandler()
    handler.addFilter(_in_a_run)
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def told() -> Iterator[None]:
    """Both, for the length of a flow run."""
    with ExitStack() as stack:
        stack.enter_context(library_logs_in_run_logs())
        stack.enter_context(events.listening(to_prefect))
        yield
