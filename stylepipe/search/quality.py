"""Quality (docs/design.md): the held-out validation split's content and style losses weighted
by the study's fixed reference weights, the same for every trial, so that a trial cannot look
better by shrinking its own loss weights. Lower is better."""

from __future__ import annotations

import math
import statistics

import optuna
import torch

from stylepipe.nets.transformer import TransformerNet
from stylepipe.search.study_data import StudyData
from stylepipe.train import Callback, TrainState


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
