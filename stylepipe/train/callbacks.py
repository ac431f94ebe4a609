"""Callbacks: how the trainer talks to the outside world without knowing it.

The trainer calls these hooks; tracking (MLflow), search (Optuna) and the CLI
plug in by subclassing ``Callback``. Metrics arrive in chunks of ``check_every``
rows, never one blocking call per step. A hook may raise to stop training (a
pruner does); the exception propagates to whoever called ``Trainer.fit``.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
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
    """Writes every metric row to a CSV file as the chunks arrive, flushed (a crash loses
    nothing written); a long run's ``RunSink``. A writer starts the file afresh, unless ``on_resume`` was called: then
    it goes on with the file a resumed run left, and skips the steps it already holds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._writer: csv.DictWriter | None = None
        self._file: Any = None
        self._columns: list[str] | None = None  # the header of the file being continued
        self.logged_through = 0

    def on_resume(self, step: int) -> None:
        if not self.path.is_file():
            return
        text = self.path.read_text()
        text = text[: text.rfind("\n") + 1]  # a last row cut short by a crash is dropped
        self.path.write_text(text)
        rows = list(csv.DictReader(io.StringIO(text)))
        self._columns = next(csv.reader(io.StringIO(text)), None)
        self.logged_through = max((int(float(row["step"])) for row in rows), default=0)

    def on_metrics(self, rows: list[dict[str, float]]) -> None:
        rows = [row for row in rows if row["step"] > self.logged_through]
        if not rows:
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a" if self._columns else "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self._columns or list(rows[0]))
            if not self._columns:
                self._writer.writeheader()
            self._columns = list(self._writer.fieldnames)  # reopened later: appended to
        self._writer.writerows(rows)
        self._file.flush()
        self.logged_through = int(rows[-1]["step"])

    def flush(self) -> None:
        """Each chunk is flushed as it is written: nothing waits."""

    def on_recovery(self, event: dict[str, Any]) -> None:
        """The CSV file holds the rows; the recovery events go to the run's record (run.json)."""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None

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

    def on_train_start(self, state: TrainState) -> None:  # again after a recovery: the same bar
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=state.steps, status="")
        self.progress.update(self.task, completed=state.step)
        self.progress.start()

    def on_metrics(self, rows: list[dict[str, float]]) -> None:
        last = rows[-1]
        status = f"loss {last['loss/total']:.4g}  grad {last['grad_norm/total']:.3g}"
        self.progress.update(self.task, completed=int(last["step"]), status=status)

    def on_halt(self, autopsy: Autopsy) -> None:
        self.progress.stop()

    def on_train_end(self, state: TrainState) -> None:
        self.progress.stop()


class NoLongerNeeded(Exception):
    """A run stopped because its result is no longer needed (``why``), at ``step``."""

    def __init__(self, why: str, step: int):
        super().__init__(why)
        self.step = step


class StopWhenUnneeded(Callback):
    """Stops a run once ``why_unneeded`` gives a reason (``NoLongerNeeded``); it is asked at a
    check at most every ``every_s`` seconds, since the answer is read from a shared store."""

    def __init__(self, why_unneeded: Callable[[], str | None], every_s: float):
        self.why_unneeded, self.every_s = why_unneeded, every_s
        self.last = time.monotonic()

    def on_check(self, state: TrainState) -> None:
        if time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        why = self.why_unneeded()
        if why:
            raise NoLongerNeeded(why, state.step)
