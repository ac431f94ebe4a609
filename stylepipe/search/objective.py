"""One trial: train a candidate configuration, report validation quality, explain NaN.

Quality (docs/design.md) is measured on the held-out validation split with the study's fixed
reference weights, from the content and style losses computed the same way for every
trial, so a trial cannot look better by shrinking its own loss weights. Lower is better.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import optuna
import torch
import torch.nn.functional as F

from stylepipe import events
from stylepipe.config import Config
from stylepipe.data.shard import is_prepared, load_split
from stylepipe.data.sources import RandomBatches
from stylepipe.errors import StylepipeError, failure_text
from stylepipe.nets.losses import PerceptualLoss
from stylepipe.nets.transformer import TransformerNet
from stylepipe.search.space import LrRanges, apply, suggest
from stylepipe.stores import first_line, redact_url, scrub
from stylepipe.threads import ALONE, Cores
from stylepipe.tracking import RunLogger, Tracker, TrackingError
from stylepipe.train import Callback, Trainer, TrainingHalted, TrainResult, TrainState, resolve_device
from stylepipe.train.guards import Autopsy
from stylepipe.train.recipe import build_criterion


class SearchError(StylepipeError):
    """The search cannot start or finish; the message says why."""


@dataclass
class StudyData:
    """What every trial of a study shares: built once, not per trial."""

    config: Config
    criterion: PerceptualLoss
    train_images: torch.Tensor
    val_images: torch.Tensor
    device: torch.device
    _smaller: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def train_images_at(self, size: int) -> torch.Tensor:
        """The training images at ``size`` px (trials may train smaller than the shard, the final
        model at its full size); the shard's own when ``size`` is not smaller. Made once."""
        if size >= self.train_images.shape[-1]:
            return self.train_images
        if size not in self._smaller:
            shrunk = F.interpolate(
                self.train_images.float(), size=(size, size), mode="bilinear", antialias=True
            )
            self._smaller[size] = shrunk.round().clamp(0, 255).to(torch.uint8)
        return self._smaller[size]


def check_prepared(folder: str) -> None:
    """Refuse, before any study or run exists, a content source that is not a prepared folder."""
    if not is_prepared(folder):
        raise SearchError(
            f"data.content={folder!r} is not a prepared folder; run `stylepipe prepare SOURCE OUT` "
            "and set data.content to OUT (the search needs its validation split)"
        )


def load_study_data(config: Config) -> StudyData:
    """The shard's splits (on the GPU when training runs there) and the loss network."""
    folder = config.data.content
    check_prepared(folder)
    device = resolve_device(config.train.device)
    train = load_split(folder, "train")
    val = load_split(folder, "val")[: config.search.max_val_images]
    if len(train) == 0 or len(val) == 0:
        raise SearchError(
            f"{folder}: {len(train)} training and {len(val)} validation images; both are needed "
            "(add images or change prepare.val_fraction)"
        )
    if device.type == "cuda":
        train, val = train.to(device), val.to(device)
    return StudyData(config, build_criterion(config, device), train, val, device)


@torch.no_grad()
def evaluate_quality(model: TransformerNet, data: StudyData) -> float:
    """Reference-weighted content + style loss of the model on the validation images."""
    search = data.config.search
    was_training = model.training
    model.eval()
    weighted = torch.zeros((), device=data.device)  # summed on the device: one sync at the end
    for batch in torch.split(data.val_images, search.val_batch_size):
        images = batch.to(data.device).float().div(255)
        terms = data.criterion(model(images), images)
        per_image = (
            search.reference_content_weight * terms.content + search.reference_style_weight * terms.style
        )
        weighted += per_image * len(batch)
    model.train(was_training)
    return float(weighted) / len(data.val_images)


class QualityReporter(Callback):
    """Evaluates quality at the first check past each multiple of ``eval_every`` steps and at the
    last step (the same steps whether or not a run was resumed); reports to Optuna, may prune.
    ``logger`` receives the ``val/quality`` rows."""

    def __init__(
        self,
        data: StudyData,
        eval_every: int,
        trial: optuna.Trial | None = None,
        logger: Callback | None = None,
    ):
        self.data = data
        self.eval_every = eval_every
        self.trial = trial
        self.logger = logger
        self.last_check = 0
        self.history: list[tuple[int, float]] = []

    def on_train_start(self, state: TrainState) -> None:
        self.last_check = state.step

    def on_check(self, state: TrainState) -> None:
        step, last = state.step, self.last_check
        self.last_check = step
        if step // self.eval_every == last // self.eval_every and step != state.steps:
            return
        quality = evaluate_quality(state.model, self.data)
        self.history.append((step, quality))
        if self.logger is not None:
            self.logger.on_metrics([{"step": step, "val/quality": quality}])
        if self.trial is not None:
            self.trial.report(quality, step)
            # At the last step there is no compute left to save: the trial completes.
            final = step == state.steps
            if not final and math.isfinite(quality) and self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: quality {quality:.4g} behind the median")

    @property
    def final(self) -> float | None:
        return self.history[-1][1] if self.history else None


def spikiness(metrics: list[dict[str, float]]) -> float:
    """Largest gradient norm over the median one: how close a run came to exploding."""
    norms = [row["grad_norm/total"] for row in metrics if math.isfinite(row["grad_norm/total"])]
    if not norms:
        return math.inf
    median = statistics.median(norms)
    return max(norms) / median if median > 0 else math.inf


@dataclass
class CandidateRun:
    outcome: str  # complete | nan | diverged
    quality: float | None
    autopsy: Autopsy | None
    metrics: list[dict[str, float]] = field(default_factory=list)
    model: TransformerNet | None = None
    recoveries: list[dict] = field(default_factory=list)  # a long run's recoveries from halts
    qualities: list[tuple[int, float]] = field(default_factory=list)  # (step, quality) as evaluated

    def quality_at(self, step: int) -> float | None:
        """The first quality evaluated at or after ``step``, when it is finite."""
        found = next((q for at, q in self.qualities if at >= step), None)
        return found if found is not None and math.isfinite(found) else None

    @property
    def spikiness(self) -> float:
        return spikiness(self.metrics)


def candidate_trainer(
    config: Config,
    data: StudyData,
    callbacks: Sequence[Callback],
    lr_schedule: Callable[[int], float] | None = None,
) -> Trainer:
    """A trainer of one configuration on the study's training images, seeded by its settings."""
    batches = RandomBatches(
        data.train_images_at(config.data.image_size), config.train.batch_size, seed=config.train.seed
    )
    torch.manual_seed(config.train.seed)
    return Trainer(
        config,
        data.criterion,
        batches,
        model=TransformerNet(),
        device=data.device,
        callbacks=list(callbacks),
        lr_schedule=lr_schedule,
    )


def train_candidate(
    trainer: Trainer, fit: Callable[[], TrainResult], reporter: QualityReporter, data: StudyData
) -> CandidateRun:
    """Train with ``fit``; a guard's halt becomes an outcome, not an exception. A run that trained
    no step (a long run resumed at its last step) is evaluated here."""
    try:
        result = fit()
    except TrainingHalted as halted:
        return CandidateRun(
            halted.autopsy.outcome, None, halted.autopsy, trainer.history, qualities=reporter.history
        )
    quality = reporter.final if reporter.final is not None else evaluate_quality(result.model, data)
    finite = quality is not None and math.isfinite(quality)
    return CandidateRun(
        "complete" if finite else "nan",
        quality if finite else None,
        None,
        result.metrics,
        result.model,
        qualities=reporter.history,
    )


def run_candidate(
    config: Config,
    data: StudyData,
    callbacks: Sequence[Callback] = (),
    trial: optuna.Trial | None = None,
    logger: RunLogger | None = None,
    eval_every: int | None = None,
) -> CandidateRun:
    """Train one configuration of the search (a trial, a replay); a guard's halt becomes an
    outcome. Quality is evaluated every ``eval_every`` steps and at the last (default: a trial's
    ``search.eval_every``, else only the last). ``optuna.TrialPruned`` (from the pruner) and any
    other exception propagate."""
    if eval_every is None:
        eval_every = config.search.eval_every if trial is not None else config.train.steps
    reporter = QualityReporter(data, eval_every, trial, logger)
    trainer = candidate_trainer(config, data, [*callbacks, reporter])
    return train_candidate(trainer, trainer.fit, reporter, data)


def worker_id() -> str:
    """Which machine and process ran a trial (several workers may share one study)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_title(number: int, params: dict, outcome: str) -> str:
    """A trial's MLflow run name once it ended: what a person scans the runs table for, without
    opening each run ("trial 4 | diverged: exploding_gradients | lr 0.21 | clip 10")."""
    clip = params.get("clip_norm")
    return f"trial {number} | {outcome} | lr {params['lr']:.3g} | clip {'off' if clip is None else f'{clip:.3g}'}"


# The trial's stability, as an Optuna 5 constraint the sampler reads (TPE ranks an infeasible
# trial below every feasible one): <= 0 stayed finite (complete, or pruned for its quality);
# > 0 went NaN or diverged, in (1, 2], the earlier the larger.
STABILITY = "stability"


def stability(finite: bool, step: int = 0, steps: int = 1) -> float:
    if finite:
        return -1.0
    return 1.0 + (steps - min(max(step, 0), steps)) / steps


class Objective:
    """Optuna's objective: one MLflow run per trial, NaN trials pruned with their autopsy."""

    def __init__(
        self,
        data: StudyData,
        tracker: Tracker,
        parent_run_id: str,
        cores: Cores = ALONE,
        lr_ranges: LrRanges | None = None,
    ):
        self.data = data
        self.space = data.config.search.space
        self.lr_ranges = lr_ranges  # below the stability edge of each clipping mode (search/edge.py)
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.cores = cores
        self.fatal: TrackingError | None = None  # set when this worker must stop (see __call__)

    def _constrain(self, trial: optuna.Trial, value: float) -> None:
        if self.data.config.search.constraints:
            trial.set_constraint(STABILITY, value)

    def __call__(self, trial: optuna.Trial) -> float:
        # Workers on this machine come and go: count them again, so this trial gets its share
        # of the cores (ops/cores.py, when the commands share them).
        self.cores.set_threads()
        base = self.data.config
        params = suggest(trial, self.space, self.lr_ranges)
        config = apply(base, params)
        try:
            logger = self.tracker.child_run(
                self.parent_run_id,
                f"trial {trial.number}",
                "trial",
                params,
                {"trial": trial.number, "stylepipe.study": base.study_name, "stylepipe.worker": worker_id()},
                log_every=base.tracking.log_every,
            )
        except Exception as err:  # the tracking store went away (after MLflow's own retries)
            # Nothing trained, nothing lost: the trial ends FAIL (not counted) and this worker
            # stops, rather than failing one trial after another until the store is back.
            self.fatal = TrackingError(
                f"trial {trial.number} could not start its MLflow run at {redact_url(base.tracking_uri)}: "
                f"{first_line(err, base.tracking_uri)}. "
                "The study is intact (the trial is marked failed and not counted); run the same command "
                "when the tracking server is back"
            )
            trial.set_user_attr("outcome", "failed")
            trial.set_user_attr("failure", str(self.fatal)[:2000])
            raise self.fatal from None
        run_id = logger.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            run = run_candidate(config, self.data, [logger], trial, logger)
        except optuna.TrialPruned:  # for its quality: it stayed finite, a feasible trial
            self._constrain(trial, stability(finite=True))
            trial.set_user_attr("outcome", "pruned")
            self.tracker.finish_run(
                run_id, "pruned", logger=logger, title=run_title(trial.number, params, "pruned")
            )
            raise
        except BaseException as err:  # KeyboardInterrupt too: never leave the run RUNNING
            trial.set_user_attr("outcome", "failed")
            failure = scrub(failure_text(err), base.storage_url, base.tracking_uri)
            trial.set_user_attr("failure", failure[:2000])
            self.tracker.finish_run(
                run_id,
                "failed",
                logger=logger,
                failure=failure,
                title=run_title(trial.number, params, "failed"),
            )
            raise

        if run.outcome != "complete":
            autopsy = run.autopsy
            step = autopsy.step if autopsy else int(run.metrics[-1]["step"]) if run.metrics else 0
            cause = autopsy.cause if autopsy else "unknown"
            self._constrain(trial, stability(finite=False, step=step, steps=config.train.steps))
            trial.set_user_attr("outcome", run.outcome)
            trial.set_user_attr("cause", cause)
            trial.set_user_attr("nan_step", step)
            trial.set_user_attr("first_nonfinite", autopsy.first_nonfinite if autopsy else "val/quality")
            if autopsy is not None:
                # optuna-dashboard shows a trial's note first, above its attributes. (Imported
                # here: it pulls in scikit-learn, a second of every worker's start.)
                from optuna_dashboard import save_note

                trial.set_user_attr("autopsy", autopsy.to_dict())
                save_note(trial, f"**{run.outcome} at step {step}: {cause}**\n\n{autopsy.explain()}")
            events.publish(
                events.TRIAL_DIVERGED,
                study=base.study_name,
                trial=trial.number,
                outcome=run.outcome,
                cause=cause,
                lr=params["lr"],
                step=step,
            )
            # NaN at that step, then pruned: the sampler learns the region is bad (docs/design.md).
            trial.report(float("nan"), step)
            self.tracker.finish_run(
                run_id,
                run.outcome,
                cause,
                autopsy,
                logger=logger,
                title=run_title(trial.number, params, f"{run.outcome}: {cause}"),
            )
            raise optuna.TrialPruned(f"{run.outcome} at step {step}: {cause}")

        self._constrain(trial, stability(finite=True))
        trial.set_user_attr("outcome", "complete")
        trial.set_user_attr("spikiness", run.spikiness)
        self.tracker.finish_run(
            run_id,
            "complete",
            metrics={"final/quality": run.quality},
            logger=logger,
            title=run_title(trial.number, params, f"complete, quality {run.quality:.4g}"),
        )
        return run.quality
