"""Training one candidate configuration of the search (a trial, a replay, an edge probe, the
final model's run): a guard's halt becomes an outcome, with its autopsy, not an exception."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import optuna
import torch

from stylepipe.config import Config
from stylepipe.data.sources import RandomBatches
from stylepipe.nets.transformer import TransformerNet
from stylepipe.search.quality import QualityReporter, evaluate_quality, spikiness
from stylepipe.search.study_data import StudyData
from stylepipe.tracking import RunLogger
from stylepipe.train import Callback, Trainer, TrainingHalted, TrainResult
from stylepipe.train.guards import Autopsy


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
