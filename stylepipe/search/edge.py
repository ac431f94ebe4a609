"""The stability edges: where training breaks, one learning rate per clipping mode, found once
before a study's first trial (docs/design.md, "Stability edge").

A *probe* is a run trained the way trials and the user's run train: the config's own settings (the
study's baseline), from initialisation, with a seed and its warm-up, at one constant learning rate
after it. For each clipping mode the study's trials train in (off; on at the baseline's clip norm,
or the space's tightest), ``search.edge_probes`` probes with the config's seed bisect log-lr
between the ends of ``search.space.lr``; then the bound (edge / ``search.edge_margin``) is trained
with the next seeds, which the certificate's replays train too, and where one breaks, that lr is
the edge. The lowest lr that broke is that mode's edge, the highest that trained below it is
``passed``; trials of that mode then sample lr up to the bound. Near the edge, whether a run
breaks depends on its seed (with the seed's case's settings and clipping at 0.1, seed 1 broke at
lr 0.0017 where seeds 0 and 2 trained up to 0.0047): the bound holds for every seed it was
trained with, which is what a person reads it as.

Why not a ramp (fastai's ``lr_find``, what stylepipe ran before): by the time a rising lr reaches
1e-3 the network has trained at gentler rates and tolerates far more than one that starts there.
On the demo a 100-step ramp put the edge at 0.0148, where cold runs break from 0.002.

The probes are judged by the test's own guard, whatever the config's ``guard`` says (a setting of
its must not move the edge): non-finite values from the first step, and divergence (loss
``divergence_factor`` x its running minimum, a gradient spike) from ``SETTLE_STEPS`` past the
warm-up. Adam's first steps move every weight by about lr whatever the gradient: on the demo, runs
at lr 0.0015 with clipping jump 20-fold at step 2 and settle to a better quality than at 0.001 by
step 10, while runs at 0.003 without clipping stay up. Each probe trains a trial's length, at
most ``search.edge_steps`` steps past the warm-up: cold breaks show early, and the edge is checked
against full runs in the tests and in ``make bench-edge``.

Each mode's edge is recorded on the study as soon as it is found, so a study stopped during the
test goes on with the mode it had not finished; a study whose trials began without an edge keeps
its whole lr range; a study an older stylepipe made keeps its ramp edge and its range.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import optuna

from stylepipe.config import Config, GuardConfig, SearchSpace
from stylepipe.errors import failure_text
from stylepipe.records import Edge, Edges, Probe, clipping
from stylepipe.search.attributes import StudyRecord, StudyState
from stylepipe.search.candidate import run_candidate
from stylepipe.search.safest import confirm_horizon
from stylepipe.search.space import LrRanges
from stylepipe.search.storage import Lock, study_lock
from stylepipe.search.study_data import StudyData
from stylepipe.stores import scrub
from stylepipe.tracking import Tracker
from stylepipe.train import Callback

log = logging.getLogger(__name__)

# Steps past the warm-up before the test's divergence check starts (non-finite values are caught
# from the first step): Adam's first-step transient settles within them (see the module doc).
SETTLE_STEPS = 10
SEEDS = 3  # the bound is confirmed with the seeds after the config's own, up to this many in all


def clip_modes(config: Config) -> dict[str, float | None]:
    """The clipping modes the study's trials train in, each with the clip norm its edge is found
    at: "off" (None) when trials may train without clipping; "on" at the baseline's clip norm
    when it clips, else the space's tightest."""
    space = config.search.space
    modes: dict[str, float | None] = {}
    if space.clip_norm is None or space.allow_no_clip:
        modes["off"] = None
    if space.clip_norm is not None:
        modes["on"] = config.train.clip_norm or space.clip_norm[0]
    return modes


def probe_steps(config: Config) -> int:
    """A probe's horizon: a trial's length, at most ``search.edge_steps`` past the warm-up."""
    return min(config.train.steps, config.train.warmup_steps + config.search.edge_steps)


def bound_steps(config: Config) -> int:
    """The horizon the bound is trained at: the certificate's replays' (they train the candidates
    with these seeds that long), at most ``search.edge_steps`` past the warm-up, at least a probe's."""
    cap = config.train.warmup_steps + config.search.edge_steps
    return max(probe_steps(config), min(confirm_horizon(config), cap))


def probe_config(config: Config, lr: float, clip_norm: float | None, steps: int | None = None) -> Config:
    """The baseline's settings as a probe trains them: ``lr`` after the config's own warm-up,
    ``clip_norm``, for ``steps`` (a probe's), every step checked by the test's own guard."""
    steps = steps or probe_steps(config)
    # at least the last step is checked, however short the probe
    guard = GuardConfig(divergence_warmup=min(config.train.warmup_steps + SETTLE_STEPS, steps))
    return config.with_overrides(
        {
            "train.lr": lr,
            "train.clip_norm": clip_norm,
            "train.steps": steps,
            "train.check_every": 1,
            "guard": guard.model_dump(mode="json"),
        }
    )


def run_probe(
    config: Config,
    data: StudyData,
    lr: float,
    clip_norm: float | None,
    seed: int,
    callbacks: Sequence[Callback] = (),
    steps: int | None = None,
) -> Probe:
    """Train one probe; a guard's halt is its outcome."""
    settings = probe_config(config, lr, clip_norm, steps).with_overrides({"train.seed": seed})
    run = run_candidate(settings, data, callbacks)
    horizon = settings.train.steps
    if run.autopsy is not None:
        return Probe(
            lr=lr,
            seed=seed,
            outcome=run.outcome,
            step=run.autopsy.step,
            horizon=horizon,
            cause=run.autopsy.cause,
        )
    # finite to the end, or a non-finite quality at it: broken, as a trial would be
    cause = None if run.outcome == "complete" else "unknown"
    return Probe(lr=lr, seed=seed, outcome=run.outcome, step=horizon, horizon=horizon, cause=cause)


class _Offset(Callback):
    """Passes a probe's step rows on with its steps after those of the probes before it, so one
    MLflow run holds every probe of a mode, one after the other."""

    def __init__(self, inner: Callback, offset: int):
        self.inner, self.offset = inner, offset

    def on_metrics(self, rows: list[dict[str, float]]) -> None:
        self.inner.on_metrics([{**row, "step": row["step"] + self.offset} for row in rows])


def find_edge(
    config: Config, data: StudyData, clip_norm: float | None, callbacks: Sequence[Callback] = ()
) -> Edge:
    """One mode's edge: ``search.edge_probes`` probes with the config's seed bisect log-lr across
    ``search.space.lr`` (the ends themselves are not trained: the low end is taken to train, the
    high end to break); then its bound is confirmed with the other seeds (``confirm_bound``)."""
    low, high = config.search.space.lr
    trains, breaks = math.log(low), math.log(high)
    probes: list[Probe] = []

    def probe(lr: float, seed: int, steps: int | None = None) -> Probe:
        offset = sum(p.step for p in probes)  # one MLflow run holds every probe of the mode
        done = run_probe(config, data, lr, clip_norm, seed, [_Offset(cb, offset) for cb in callbacks], steps)
        probes.append(done)
        clip = clipping(clip_norm)
        verdict = f"broke at step {done.step} ({done.outcome}: {done.cause})" if done.broke else "trained"
        log.info("edge test (%s): lr %.3g, seed %d, %s", clip, lr, seed, verdict)
        return done

    for _ in range(config.search.edge_probes):
        lr = math.exp((trains + breaks) / 2)
        if probe(lr, config.train.seed).broke:
            breaks = math.log(lr)
        else:
            trains = math.log(lr)
    confirm_bound(config, probes, probe)
    return _edge_of(config, clip_norm, probes)


def confirm_bound(config: Config, probes: list[Probe], probe: Callable[..., Probe]) -> None:
    """Train the bound (the lowest lr that broke / ``search.edge_margin``) with each of the next
    ``SEEDS - 1`` seeds, for ``bound_steps``: the certificate's replays train the candidates with
    these seeds that long, and near the edge whether a run breaks depends on its seed (and some
    break late). One that breaks there makes that lr the edge, and the new bound is confirmed the
    same way, until a bound holds or falls below the range."""
    low, margin = config.search.space.lr[0], config.search.edge_margin
    while margin is not None:
        broke = [p.lr for p in probes if p.broke]
        if not broke or min(broke) / margin <= low:
            return
        bound = min(broke) / margin
        seeds = [config.train.seed + i for i in range(1, SEEDS)]
        if not any(probe(bound, seed, bound_steps(config)).broke for seed in seeds):  # to the first break
            return


def _edge_of(config: Config, clip_norm: float | None, probes: list[Probe]) -> Edge:
    low, high = config.search.space.lr
    broke = [p for p in probes if p.broke]
    edge = min(broke, key=lambda p: p.lr) if broke else None
    trained = [p.lr for p in probes if not p.broke and (edge is None or p.lr < edge.lr)]
    return Edge(
        kind="cold",
        lr=edge.lr if edge else None,
        cause=edge.cause if edge else None,
        outcome=edge.outcome if edge else None,
        step=edge.step if edge else probe_steps(config),
        steps=probe_steps(config),
        low=low,
        high=high,
        clip_norm=clip_norm,
        passed=max(trained, default=None),
        probes=probes,
    )


def lr_ranges(space: SearchSpace, edges: Edges | None, margin: float | None) -> LrRanges:
    """The lr range trials sample, by their clipping: up to the bound of their own mode's edge;
    the clipped edge holds for clip norms up to the one it was found at (a ramp edge, which an
    older stylepipe found, bounds every trial as it did)."""
    ranges = {}
    for mode in ("off", "on"):
        edge = edges.of_mode(mode) if edges is not None else None
        bound = edge.bound(margin) if edge is not None else None
        ranges[mode] = space.lr if bound is None else (space.lr[0], bound)
    clipped = edges.on if edges is not None and edges.ramp is None else None
    return LrRanges(off=ranges["off"], on=ranges["on"], on_up_to=clipped.clip_norm if clipped else None)


def _mode_line(edge: Edge, margin: float | None) -> str:
    clip = clipping(edge.clip_norm)
    if edge.kind == "ramp":
        return _ramp_line(edge, margin)
    if edge.lr is None:
        return (
            f"{clip}: none, no run from initialisation broke up to lr {edge.passed or edge.high:.3g} "
            f"({len(edge.probes)} runs of {edge.steps} steps): its whole lr range is searched"
        )
    found = (
        f"{clip}: lr {edge.lr:.3g} ({edge.outcome}: {edge.cause}, at step {edge.step} of {edge.steps}; "
        + (f"trained at {edge.passed:.3g})" if edge.passed is not None else "every run broke)")
    )
    bound = edge.bound(margin)
    if bound is not None:
        return f"{found}, trials sample lr up to {bound:.3g} (the edge / {margin:g})"
    if margin is None:
        return f"{found}, search.edge_margin is off: its whole lr range is searched"
    return f"{found}, within {margin:g}x of the range's low end: its whole lr range is searched"


def _ramp_line(edge: Edge, margin: float | None) -> str:
    bound = edge.bound(margin)
    kept = f"trials sample lr up to {bound:.3g}" if bound is not None else "the whole lr range is searched"
    found = (
        "none" if edge.lr is None else f"lr {edge.lr:.3g} ({edge.outcome}: {edge.cause}, at step {edge.step})"
    )
    return (
        f"{found}, found by an older stylepipe's lr ramp, which overstates where a run from "
        f"initialisation breaks; kept for this study: {kept}"
    )


def edge_line(edges: Edges | None, margin: float | None, why_none: str = "") -> str:
    """The stage's line: each mode's edge, its cause, and what it bounds."""
    if edges is None or not edges.found():
        return f"stability edge: none ({why_none})" if why_none else "stability edge: none"
    return "stability edge: " + "; ".join(_mode_line(edge, margin) for edge in edges.found())


def study_edge(
    config: Config,
    study: optuna.Study,
    data: Callable[[], StudyData],
    tracker: Tracker,
    parent: Callable[[], str],
) -> tuple[Edges | None, str]:
    """The study's edges and their line: read back when recorded, else found now (once, under the
    study's lock, before any trial began), each mode recorded on the study as soon as it is found,
    and on its MLflow parent run (``parent``: opened only when there is something to write)."""
    margin = config.search.edge_margin
    if config.search.edge_steps == 0:
        return None, edge_line(None, margin, "the edge test is off: search.edge_steps=0")
    record = StudyRecord(study)
    with study_lock(config, Lock.EDGE):
        edges = record.edges
        if edges is not None and edges.complete:
            return edges, edge_line(edges, margin) + " (recorded on the study: not found again)"
        waiting = optuna.trial.TrialState.WAITING
        if edges is None and any(t.state != waiting for t in study.get_trials(deepcopy=False)):
            return None, edge_line(None, margin, "the study's trials began without an edge test")
        modes = clip_modes(config)
        if record.state == StudyState.FINDING_EDGE:  # its process died: under this lock, no one runs it
            kept = [e.mode for e in edges.found()] if edges is not None else []
            log.warning(
                "the edge test was cut short before: it runs again from the start of %s",
                f"the mode it had not finished (kept: clipping {', '.join(kept)})"
                if kept
                else "its first mode",
            )
            tracker.end_orphaned_runs(
                parent(), ("edge",), "its process stopped (killed or lost) during the edge test"
            )
        record.set_state(StudyState.FINDING_EDGE)
        edges = edges or Edges(modes=list(modes))
        for mode, clip_norm in modes.items():
            if edges.of_mode(mode) is not None:
                continue
            edge = _find_and_log(config, data, tracker, parent(), clip_norm)
            edges = edges.with_mode(edge)
            record.record_edges(edges)
        tracker.log_edges(parent(), edges)
        return edges, edge_line(edges, margin)


def _find_and_log(
    config: Config,
    data: Callable[[], StudyData],
    tracker: Tracker,
    parent_run_id: str,
    clip_norm: float | None,
) -> Edge:
    """One mode's edge, its probes one after the other in an MLflow run of its own."""
    low, high = config.search.space.lr
    clip = clipping(clip_norm)
    log.info(
        "stability edge, %s: %d runs from initialisation bisect lr %.3g to %.3g, %d steps each at most",
        clip,
        config.search.edge_probes,
        low,
        high,
        probe_steps(config),
    )
    logger = tracker.child_run(
        parent_run_id,
        f"edge test | {clip}",
        "edge",
        {
            "lr_low": low,
            "lr_high": high,
            "probes": config.search.edge_probes,
            "steps": probe_steps(config),
            "clip_norm": clip_norm,
        },
        {"stylepipe.study": config.study_name},
        log_every=1,
    )
    try:
        edge = find_edge(config, data(), clip_norm, [logger])
    except BaseException as err:  # KeyboardInterrupt too: never leave the run RUNNING
        failure = scrub(failure_text(err), config.storage_url, config.tracking_uri)
        tracker.finish_run(
            logger.run_id, "failed", logger=logger, failure=failure, title=f"edge test | {clip} | failed"
        )
        raise
    outcome = "no break" if edge.lr is None else f"broke at lr {edge.lr:.3g}"
    tracker.finish_run(
        logger.run_id,
        edge.outcome or "complete",
        edge.cause,
        logger=logger,
        title=f"edge test | {clip} | {outcome}",
    )
    return edge


def user_mode(config: Config) -> str:
    return "off" if config.train.clip_norm is None else "on"


def edge_markdown(edges: Edges | None, margin: float | None, config: Config) -> str | None:
    """The summary's paragraph on the edges, and where the user's own lr stands against the edge of
    the user's own clipping mode (nothing is claimed where no run showed it)."""
    if edges is None or not edges.found():
        return None
    text = f"**Stability edge**: {edge_line(edges, margin).removeprefix('stability edge: ')}."
    lr, mode = config.train.lr, user_mode(config)
    mine = edges.of_mode(mode)
    if mine is None:
        clip = "off" if mode == "off" else f"at {config.train.clip_norm:g}"
        return f"{text} Your clipping ({clip}) is not a mode this study's trials train in: no edge for your lr {lr:.3g}."
    if mine.kind == "cold" and mine.clip_norm != config.train.clip_norm:
        return (
            f"{text} Your clip norm {config.train.clip_norm:g} is not the one the edge was found at "
            f"({mine.clip_norm:g}): no claim about your lr {lr:.3g}."
        )
    versus = mine.versus(lr)
    return f"{text} {versus[0].upper()}{versus[1:]}."
