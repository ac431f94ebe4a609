"""The stability edge: where training breaks, found once, before a study's first trial.

A range test, like fastai's ``lr_find`` (about 100 steps, the learning rate raised
geometrically), but stopped by the guards instead of a loss threshold, so its halt has a cause.
It trains the config's own settings (the study's baseline) with the lr raised from the low to
the high end of ``search.space.lr``: no warm-up, every step checked, and clipping off when the
space lets trials train without it. The lr of the step a guard halts it at is the study's edge
(``records.Edge``); trials then sample lr up to edge / ``search.edge_margin``.

The edge is recorded on the study, so a resumed or warm-started study reuses it; a study whose
trials began without one (an earlier stylepipe) keeps its whole lr range.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import optuna

from stylepipe.config import Config, SearchSpace
from stylepipe.errors import failure_text
from stylepipe.records import Edge
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.objective import StudyData, candidate_trainer
from stylepipe.search.storage import StudyLock
from stylepipe.stores import scrub
from stylepipe.tracking import Tracker
from stylepipe.train import Callback, TrainingHalted

log = logging.getLogger(__name__)


def range_test_config(config: Config) -> Config:
    """The baseline's settings as the range test trains them: from the space's lowest lr, for
    ``search.edge_steps`` steps, no warm-up, checked every step, clipping off when trials may
    train without it (else the baseline's clip norm, or the loosest the space offers)."""
    space = config.search.space
    clip_norm = config.train.clip_norm
    if space.clip_norm is None or space.allow_no_clip:
        clip_norm = None
    elif clip_norm is None:
        clip_norm = space.clip_norm[1]
    return config.with_overrides(
        {
            "train.lr": space.lr[0],
            "train.clip_norm": clip_norm,
            "train.warmup_steps": 0,
            "train.check_every": 1,
            "train.steps": config.search.edge_steps,
        }
    )


def find_edge(config: Config, data: StudyData, callbacks: Sequence[Callback] = ()) -> Edge:
    """Run the range test (``config`` is the study's; the test's own settings are made here)."""
    test = range_test_config(config)
    low, high = config.search.space.lr
    steps = test.train.steps
    no_halt = Edge(lr=None, step=steps, low=low, high=high, steps=steps, clip_norm=test.train.clip_norm)
    factor = no_halt.factor
    trainer = candidate_trainer(test, data, callbacks, lr_schedule=lambda index: factor**index)
    try:
        trainer.fit()
    except TrainingHalted as halted:
        autopsy = halted.autopsy
        lr = low * factor ** (autopsy.step - 1)  # the lr of the step it halted at
        return no_halt.model_copy(
            update={"lr": lr, "step": autopsy.step, "cause": autopsy.cause, "outcome": autopsy.outcome}
        )
    return no_halt


def sampled_space(space: SearchSpace, edge: Edge | None, margin: float | None) -> SearchSpace:
    """The space trials sample: lr up to the edge's bound when there is one."""
    bound = edge.bound(margin) if edge is not None else None
    if bound is None:
        return space
    return space.model_copy(update={"lr": (space.lr[0], bound)})


def edge_line(edge: Edge | None, margin: float | None, why_none: str = "") -> str:
    """The stage's line: the edge, its cause, and what it bounds."""
    if edge is None:
        return f"stability edge: none ({why_none})" if why_none else "stability edge: none"
    if edge.lr is None:
        return (
            f"stability edge: none; the range test trained every lr from {edge.low:.3g} to {edge.high:.3g} "
            f"({edge.steps} steps) without a halt: the whole lr range is searched"
        )
    found = f"stability edge: lr {edge.lr:.3g} ({edge.outcome}: {edge.cause}, at step {edge.step} of {edge.steps})"
    bound = edge.bound(margin)
    if bound is not None:
        return f"{found}; trials sample lr up to {bound:.3g} (the edge / {margin:g})"
    if margin is None:
        return f"{found}; search.edge_margin is off: the whole lr range is searched"
    return f"{found}; within {margin:g}x of the range's low end: the whole lr range is searched"


def study_edge(
    config: Config,
    study: optuna.Study,
    data: Callable[[], StudyData],
    tracker: Tracker,
    parent_run_id: str,
) -> tuple[Edge | None, str]:
    """The study's edge and its line: read back when recorded, else found now (once, under the
    study's lock, before any trial began) and recorded on the study and its MLflow parent run."""
    margin = config.search.edge_margin
    if config.search.edge_steps == 0:
        return None, edge_line(None, margin, "the range test is off: search.edge_steps=0")
    record = StudyRecord(study)
    with StudyLock(config, "edge"):
        edge = record.edge
        if edge is not None:
            return edge, edge_line(edge, margin) + " (recorded on the study: not run again)"
        waiting = optuna.trial.TrialState.WAITING
        if any(t.state != waiting for t in study.get_trials(deepcopy=False)):
            return None, edge_line(None, margin, "the study's trials began without a range test")
        low, high = config.search.space.lr
        steps = config.search.edge_steps
        if record.state == "finding its edge":  # its process died: under this lock, no one runs it
            log.warning(
                "the range test was cut short before (no edge recorded): it runs again from its start"
            )
            tracker.end_orphaned_runs(
                parent_run_id, ("edge",), "its process stopped (killed or lost) during the range test"
            )
        record.set_state("finding its edge")
        log.info("stability edge: the range test trains lr %.3g to %.3g over %d steps", low, high, steps)
        clip_norm = range_test_config(config).train.clip_norm
        logger = tracker.child_run(
            parent_run_id,
            "range test",
            "edge",
            {"lr_low": low, "lr_high": high, "steps": steps, "clip_norm": clip_norm},
            {"stylepipe.study": config.study_name},
            log_every=1,
        )
        try:
            edge = find_edge(config, data(), [logger])
        except BaseException as err:  # KeyboardInterrupt too: never leave the run RUNNING
            failure = scrub(failure_text(err), config.storage_url, config.tracking_uri)
            tracker.finish_run(
                logger.run_id, "failed", logger=logger, failure=failure, title="range test | failed"
            )
            raise
        outcome = "no halt" if edge.lr is None else f"halted at lr {edge.lr:.3g}"
        tracker.finish_run(
            logger.run_id,
            edge.outcome or "complete",
            edge.cause,
            logger=logger,
            title=f"range test | {outcome}",
        )
        tracker.log_edge(parent_run_id, edge)
        record.record_edge(edge)
        return edge, edge_line(edge, margin)


def edge_markdown(edge: Edge | None, margin: float | None, user_lr: float) -> str | None:
    """The summary's paragraph on the edge, and where the user's own lr stands against it."""
    if edge is None:
        return None
    if edge.lr is None:
        return f"**Stability edge**: none. {edge_line(edge, margin).removeprefix('stability edge: none; ')}."
    bound = edge.bound(margin)
    sampled = (
        f"trials sampled lr up to {bound:.3g}" if bound is not None else "the whole lr range was searched"
    )
    versus = edge.versus(user_lr)
    return (
        f"**Stability edge**: lr {edge.lr:.3g} ({edge.outcome}: {edge.cause}, at step {edge.step} of the "
        f"{edge.steps}-step range test); {sampled}. {versus[0].upper()}{versus[1:]}."
    )
