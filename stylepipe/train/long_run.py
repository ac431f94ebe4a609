"""Long runs: good checkpoints, resume after a crash, recovery from a late spike.

``LongRun`` drives ``Trainer.fit`` for the runs users pay for (``stylepipe train``, the final
model); search trials and replays never use it: a trial that needs rescue is not stable.
Where its files live and what state the run is in: ``lifecycle.py``; its checkpoints:
``checkpoints.py``.

* **Good checkpoints.** At the first check at or after every ``train.checkpoint_every``
  steps (or ``train.checkpoint_minutes`` minutes after the last checkpoint, when set), when
  the guards have read every step so far and found them finite, the trainer's whole state
  (``Trainer.state_dict``) and the recoveries so far are written by the run's
  ``CheckpointSaver``. The state at step 0 is written too, so a recovery can always go back
  to the start. A state that is not finite is never written: with the guards off that is how
  a run that went NaN is found, and it halts there as if a guard had stopped it.
* **Resume.** A run with a usable checkpoint goes on from the newest one.
* **Metrics stay whole.** The sinks (the CSV file, the MLflow run) get metric rows only
  when a checkpoint is written, after the rows up to it: rows of a stretch that a crash or
  a recovery throws away never reach them. A crash between the two leaves rows the next
  checkpoint does not cover; sinks skip steps they already hold (``on_resume``).
* **Recovery** (``train.recovery``, the ``recovery`` section). When a guard halts the run:
  load the newest checkpoint before the bad step (one further back at each attempt), skip
  the batches from there up to and including the bad step (PaLM-style), and go on with the
  run's own learning rate times ``recovery.lr_factor ** attempt`` and its clip norm times
  ``recovery.clip_factor ** attempt`` (with clipping off: that factor of the median gradient
  norm of the good steps before the halt). Both are computed from the run's settings, not
  from whatever the checkpoint it goes back to was trained with, and the clip never loosens
  from one attempt to the next. After ``recovery.max_attempts`` the run stops with its
  autopsy, as without recovery, carrying every attempt.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

from stylepipe.config import Config
from stylepipe.train.callbacks import Callback, TrainState
from stylepipe.train.checkpoints import CheckpointSaver, NonFiniteState
from stylepipe.train.guards import Autopsy, TrainingHalted
from stylepipe.train.lifecycle import RunSink, RunStateError
from stylepipe.train.trainer import Trainer, TrainResult


def describe_recovery(event: dict[str, Any]) -> str:
    """One recovery in a line a person reads (numbers rounded to three figures)."""
    lr, clip = event["lr"], event["clip_norm"]
    shown = ["off" if c is None else f"{c:.3g}" for c in clip]
    return (
        f"attempt {event['attempt']}: halted at step {event['halted_at_step']} ({event['outcome']}, "
        f"{event['cause']}); back to step {event['resumed_from_step']}, skipped {event['skipped_batches']} "
        f"batches, lr {lr[0]:.3g} -> {lr[1]:.3g}, clip {shown[0]} -> {shown[1]}"
    )


class LongRun(Callback):
    """Checkpoints, resume and recovery around ``Trainer.fit`` (see the module doc).

    ``sinks`` receive the metric rows only when a checkpoint commits them, and the run's
    resume and recovery events. Pass the LongRun last among the trainer's callbacks, so that
    rows other callbacks add at a check (an evaluation) are committed too.
    """

    def __init__(
        self,
        saver: CheckpointSaver,
        config: Config,
        sinks: Sequence[RunSink] = (),
        recovery: bool = True,
        start_over: str = "pass --fresh to start the run over",
    ):
        self.saver = saver
        self.start_over = start_over  # how a user starts this run over (said when it cannot resume)
        self.every = config.train.checkpoint_every
        minutes = config.train.checkpoint_minutes
        self.every_seconds = None if minutes is None else minutes * 60
        self.policy = config.recovery if (recovery and config.train.recovery) else None
        self.lr, self.clip_norm = config.train.lr, config.train.clip_norm  # what recoveries compound from
        self.sinks = list(sinks)
        self.pending: list[dict[str, float]] = []
        self.recoveries: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.trainer: Trainer | None = None
        self.last_saved = 0
        self.saved_at = time.monotonic()

    # ------------------------------------------------------------------ the driver
    def fit(self, trainer: Trainer) -> TrainResult:
        """Train to the end, resuming from the newest usable checkpoint and recovering from
        halts; a halt after the last attempt raises ``TrainingHalted`` (``.recoveries`` set)."""
        self.trainer = trainer
        state = self.saver.load()
        if state is None and self.saver.skipped:  # never start over on top of files it cannot use
            raise RunStateError(
                f"no checkpoint in {self.saver.folder} can be used ({self.saver.skipped[0]}): "
                f"move them away, or {self.start_over}"
            )
        if state is not None:
            self.resumed_from = self._load(state)
            self.recoveries = list(state["recoveries"])  # the recoveries before the crash
            for sink in self.sinks:
                sink.on_resume(self.resumed_from)
        else:
            self._save()  # the start: a recovery can always go back this far
        while True:
            try:
                result = trainer.fit()
                if trainer.step > self.last_saved:  # (a run resumed at its last step is there already)
                    self._checkpoint()
                for sink in self.sinks:
                    sink.flush()
                return result
            except TrainingHalted as halted:
                attempts_left = self.policy is not None and len(self.recoveries) < self.policy.max_attempts
                if not (attempts_left and self._recover(halted.autopsy)):
                    self._commit()  # the rows up to the bad step: the sinks show the halt
                    halted.recoveries = self.recoveries
                    raise

    def _recover(self, autopsy: Autopsy) -> bool:
        """Go back before the halt and go on more gently; False when no checkpoint is usable."""
        trainer = self.trainer
        attempt = len(self.recoveries) + 1
        lr_before, clip_before = trainer.scheduler.base_lrs[0], trainer.clip_norm  # the schedule's peak
        stretch = [row for row in trainer.history if row["step"] < autopsy.step]  # before the bad step
        state = self.saver.load(before=autopsy.step, back=attempt - 1)  # one further back at each attempt
        if state is None:
            return False
        resumed = self._load(state)
        self.pending.clear()  # the abandoned stretch never reaches the sinks
        trainer.skip_batches(autopsy.step - resumed)
        trainer.set_lr(self.lr * self.policy.lr_factor**attempt)
        clip, clip_base = self._recovery_clip(attempt, stretch)
        trainer.set_clip_norm(clip)
        event = {
            "attempt": attempt,
            "halted_at_step": autopsy.step,
            "outcome": autopsy.outcome,
            "cause": autopsy.cause,
            "first_nonfinite": autopsy.first_nonfinite,
            "resumed_from_step": resumed,
            "skipped_batches": autopsy.step - resumed,
            "lr": [lr_before, trainer.scheduler.base_lrs[0]],
            "clip_norm": [clip_before, clip],
            "clip_base": clip_base,
            "autopsy": autopsy.to_dict(),
        }
        self.recoveries.append(event)
        for sink in self.sinks:
            sink.on_recovery(event)
        return True

    def _recovery_clip(
        self, attempt: int, stretch: list[dict[str, float]]
    ) -> tuple[float | None, float | None]:
        """The clip norm of this attempt, and what it was derived from: the run's clip norm or,
        with clipping off, the median gradient norm of the good steps (the first attempt's,
        kept for every later one). Never looser than the last attempt's."""
        factor = self.policy.clip_factor
        if factor is None:
            return self.clip_norm, self.clip_norm
        base = self.clip_norm
        if base is None:
            base = next((e["clip_base"] for e in self.recoveries if e.get("clip_base") is not None), None)
        if base is None:
            # the checkpoint's steps were all verified; without any, the stretch before the halt
            good = self.trainer.history[-50:] or stretch[-50:]
            norms = [r["grad_norm/total"] for r in good if math.isfinite(r["grad_norm/total"])]
            base = statistics.median(norms) if norms else None
        if base is None:
            return None, None
        clip = base * factor**attempt
        earlier = [e["clip_norm"][1] for e in self.recoveries if e["clip_norm"][1] is not None]
        return (min(clip, *earlier) if earlier else clip), base

    # ------------------------------------------------------------------ the trainer's callbacks
    def on_metrics(self, rows: list[dict[str, float]]) -> None:
        self.pending.extend(rows)

    def on_check(self, state: TrainState) -> None:
        overdue = self.every_seconds is not None and time.monotonic() - self.saved_at >= self.every_seconds
        if state.step - self.last_saved >= self.every or (overdue and state.step > self.last_saved):
            self._checkpoint()

    # ------------------------------------------------------------------ files
    def _checkpoint(self) -> None:
        """The rows so far to the sinks, then a good checkpoint. A state that is not finite (the
        guards were off) is neither committed nor written: the run halts at its first bad step."""
        state = self._state()
        try:
            self.saver.verify(state)
        except NonFiniteState:
            raise TrainingHalted(
                self.trainer.guard.late_autopsy(self.trainer.history, self.last_saved)
            ) from None
        self._commit()
        self._save(state)

    def _commit(self) -> None:
        """The rows so far go to the sinks, and are stored (on disk, in MLflow) when this returns."""
        rows, self.pending = self.pending, []
        for sink in self.sinks:
            if rows:
                sink.on_metrics(rows)
            sink.flush()

    def _state(self) -> dict[str, Any]:
        return {**self.trainer.state_dict(), "settings": self.saver.settings, "recoveries": self.recoveries}

    def _save(self, state: dict[str, Any] | None = None) -> None:
        self.saver.save(state or self._state())
        self.last_saved, self.saved_at = self.trainer.step, time.monotonic()

    def _load(self, state: dict[str, Any]) -> int:
        """Load a checkpoint's state into the trainer; returns its step."""
        self.trainer.load_state_dict(state)
        self.last_saved, self.saved_at = self.trainer.step, time.monotonic()
        return self.trainer.step
