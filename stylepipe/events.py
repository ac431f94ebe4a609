"""What happened, for whoever listens: a diverged trial, a certified study, a promoted model.

The library publishes plain events (a name and JSON-friendly fields); it knows no listener. The
Prefect flows subscribe and send each on as a Prefect event (flows/telemetry.py), which a user's
automation can act on. A listener that fails is logged, never allowed to stop the work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []

TRIAL_DIVERGED = "trial.diverged"  # study, trial, outcome (nan | diverged), cause, lr, step
STUDY_CERTIFIED = "study.certified"  # study, trial, quality, params, certificate
MODEL_PROMOTED = "model.promoted"  # model, version, alias, study, why


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """``listener`` hears every event published inside."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def publish(name: str, **fields: Any) -> None:
    for listener in list(_listeners):
        try:
            listener(name, fields)
        except Exception as err:  # telemetry must not stop a study
            log.warning("could not send event %s: %s", name, err)
