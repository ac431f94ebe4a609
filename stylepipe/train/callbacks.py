"""Callbacks: how the trainer talks to the outside world without knowing it.

The trainer calls these hooks; tracking (MLflow), search (Optuna) and the CLI
plug in by subclassing ``Callback``. Metrics arrive in chunks of ``check_every``
rows, never one blocking call per step. A hook may raise to stop training (a
pruner does); the exception propagates to whoever called ``Trainer.fit``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from stylepipe.train.guards import Autopsy


@dataclass
class TrainState:
    """What a callback sees of a run: the model being trained, the last step done, the total."""

    model: nn.Module
    step: int
    steps: int


class Callback:
    def on_train_start(self, state: TrainState) -> None:
        """Before the first step."""

    def on_metrics(self, rows: list[dict[str, float]]) -> None:
        """A chunk of per-step metric rows (each has a ``step`` key), oldest first."""

    def on_check(self, state: TrainState) -> None:
        """After each finiteness check that passed; may evaluate, and may raise to stop."""

    def on_halt(self, autopsy: Autopsy) -> None:
        """A guard stopped training; ``TrainingHalted`` is raised right after."""

    def on_train_end(self, state: TrainState) -> None:
        """Training finished every step."""


class CSVMetricsWriter(Callback):
    """Appends every metric row to a CSV file as the chunks arrive (survives a crash)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._writer: csv.DictWriter | None = None
        self._file: Any = None

    def on_metrics(self, rows: list[dict[str, float]]) -> None:
        if not rows:
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=list(rows[0]))
            self._writer.writeheader()
        self._writer.writerows(rows)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_halt(self, autopsy: Autopsy) -> None:
        self.close()

    def on_train_end(self, state: TrainState) -> None:
        self.close()


class ProgressBar(Callback):
    """A rich progress bar with the latest total loss and gradient norm."""

    def __init__(self, description: str = "training"):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
        )
        self.description = description
        self.task: Any = None

    def on_train_start(self, state: TrainState) -> None:
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.steps, status="")

    def on_metrics(self, rows: list[dict[str, float]]) -> None:
        last = rows[-1]
        status = f"loss {last['loss/total']:.4g}  grad {last['grad_norm/total']:.3g}"
        self.progress.update(self.task, completed=int(last["step"]), status=status)

    def on_halt(self, autopsy: Autopsy) -> None:
        self.progress.stop()

    def on_train_end(self, state: TrainState) -> None:
        self.progress.stop()
