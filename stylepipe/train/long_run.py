"""Long runs: good checkpoints, resume after a crash, recovery from a late spike.

``LongRun`` drives ``Trainer.fit`` for the runs users pay for (``stylepipe train``, the final
model); search trials and replays never use it: a trial that needs rescue is not stable.

* **Good checkpoints.** At the first check at or after every ``train.checkpoint_every``
  steps (or ``train.checkpoint_minutes`` minutes after the last checkpoint, when set), when
  the guards have read every step so far and found them finite, the trainer's whole state
  (``Trainer.state_dict``) and the recoveries so far are written atomically to
  ``<folder>/step-NNNNNNNN.pt``; the newest ``train.keep_checkpoints`` are kept. The state
  at step 0 is written too, so a recovery can always go back to the start.
* **Resume.** A folder that holds checkpoints is resumed from the newest, when its settings
  fingerprint matches; otherwise ``ResumeRefused`` names the keys that differ.
* **Metrics stay whole.** The sinks (the CSV file, the MLflow run) get metric rows only
  when a checkpoint is written, after the rows up to it: rows of a stretch that a crash or
  a recovery throws away never reach them. A crash between the two leaves rows the next
  checkpoint does not cover; sinks skip steps they already hold (``on_resume``).
* **Recovery** (``train.recovery``, the ``recovery`` section). When a guard halts the run:
  load the newest checkpoint before the bad step (one further back at each attempt), skip
  the batches from there up to and including the bad step (PaLM-style), multiply the
  learning rate by ``recovery.lr_factor`` and the clip norm by ``recovery.clip_factor``
  (compounded per attempt), and go on. After ``recovery.max_attempts`` the run stops with
  its autopsy, as without recovery, carrying the autopsies of every attempt.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stylepipe.config import Config
from stylepipe.errors import StylepipeError
from stylepipe.files import atomic_path
from stylepipe.train.callbacks import Callback, TrainState
from stylepipe.train.guards import Autopsy, TrainingHalted
from stylepipe.train.trainer import Trainer, TrainResult

# Knobs that do not change what a run computes: a run may resume with them changed.
NOT_FINGERPRINTED = ("train.steps", "train.checkpoint_every", "train.checkpoint_minutes", "train.keep_checkpoints",
                     "train.recovery", "train.device", "train.compile", "train.compile_mode", "train.channels_last",
                     "train.tf32", "train.check_every")  # fmt: skip


class ResumeRefused(StylepipeError):
    """A run folder's checkpoints were written with other settings."""


def training_settings(config: Config) -> dict[str, Any]:
    """The settings that decide what a run computes, flat (``train.lr``: 0.001, ...)."""
    flat: dict[str, Any] = {}
    for section in ("data", "loss", "train", "guard"):
        for key, value in getattr(config, section).model_dump(mode="json").items():
            if f"{section}.{key}" not in NOT_FINGERPRINTED:
                flat[f"{section}.{key}"] = value
    return flat


def _step_of(path: Path) -> int:
    return int(path.stem.removeprefix("step-"))


def write_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """A long run's state (``LongRun``'s, with its ``step``) as ``<folder>/step-NNNNNNNN.pt``, atomically."""
    path = Path(folder) / f"step-{state['step']:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in a folder, oldest first."""
    return sorted(folder.glob("step-*.pt"), key=_step_of) if folder.is_dir() else []


class LongRun(Callback):
    """Checkpoints, resume and recovery around ``Trainer.fit`` (see the module doc).

    ``sinks`` receive the metric rows (only when a checkpoint commits them) and, when they
    have the methods, ``on_recovery(event)`` and ``on_checkpoint(state, step)``. Pass the
    LongRun last among the trainer's callbacks, so that rows other callbacks add at a check
    (an evaluation) are committed too.
    """

    def __init__(
        self, folder: str | Path, config: Config, sinks: Sequence[Callback] = (), recovery: bool = True
    ):
        self.folder = Path(folder)
        self.every = config.train.checkpoint_every
        minutes = config.train.checkpoint_minutes
        self.every_seconds = None if minutes is None else minutes * 60
        self.keep = config.train.keep_checkpoints
        self.policy = config.recovery if (recovery and config.train.recovery) else None
        self.settings = training_settings(config)
        self.sinks = list(sinks)
        self.pending: list[dict[str, float]] = []
        self.recoveries: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.trainer: Trainer | None = None
        self.last_saved = 0
        self.saved_at = time.monotonic()

    # ------------------------------------------------------------------ the driver
    def fit(self, trainer: Trainer) -> TrainResult:
        """Train to the end, resuming from the folder's newest checkpoint and recovering from
        halts; a halt after the last attempt raises ``TrainingHalted`` (``.recoveries`` set)."""
        self.trainer = trainer
        found = checkpoints(self.folder)
        if found:
            self.resumed_from = self._load(found[-1])
            self.recoveries = list(self._loaded["recoveries"])  # the recoveries before the crash
            for sink in self.sinks:
                if hasattr(sink, "on_resume"):
                    sink.on_resume(self.resumed_from)
        else:
            self._save()  # the start: a recovery can always go back this far
        while True:
            try:
                result = trainer.fit()
            except TrainingHalted as halted:
                if self.policy is None or len(self.recoveries) >= self.policy.max_attempts:
                    self._commit()  # the rows up to the bad step: the sinks show the halt
                    halted.recoveries = self.recoveries
                    raise
                self._recover(halted.autopsy)
            else:
                self._commit()
                self._save()
                return result

    def _recover(self, autopsy: Autopsy) -> None:
        trainer = self.trainer
        attempt = len(self.recoveries) + 1
        before = [path for path in checkpoints(self.folder) if _step_of(path) < autopsy.step]
        source = before[max(0, len(before) - attempt)]  # one further back at each attempt
        lr_before, clip_before = trainer.scheduler.base_lrs[0], trainer.clip_norm  # the schedule's peak
        tail = [row["grad_norm/total"] for row in trainer.history[-50:]]
        resumed = self._load(source)
        self.pending.clear()  # the abandoned stretch never reaches the sinks
        trainer.skip_batches(autopsy.step - resumed)
        trainer.scale_lr(self.policy.lr_factor**attempt)
        clip = trainer.clip_norm
        if self.policy.clip_factor is not None:
            finite = [g for g in tail if g == g and g != float("inf")]
            base = clip if clip is not None else (statistics.median(finite) if finite else None)
            clip = None if base is None else base * self.policy.clip_factor**attempt
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
            "autopsy": autopsy.to_dict(),
        }
        self.recoveries.append(event)
        for sink in self.sinks:
            if hasattr(sink, "on_recovery"):
                sink.on_recovery(event)

    # ------------------------------------------------------------------ the trainer's callbacks
    def on_metrics(self, rows: list[dict[str, float]]) -> None:
        self.pending.extend(rows)

    def on_check(self, state: TrainState) -> None:
        overdue = self.every_seconds is not None and time.monotonic() - self.saved_at >= self.every_seconds
        if state.step - self.last_saved >= self.every or (overdue and state.step > self.last_saved):
            self._commit()
            self._save()

    # ------------------------------------------------------------------ files
    def _commit(self) -> None:
        """The rows so far go to the sinks, and are on disk (or in MLflow) when this returns."""
        rows, self.pending = self.pending, []
        for sink in self.sinks:
            if rows:
                sink.on_metrics(rows)
            if hasattr(sink, "flush"):
                sink.flush()

    def _save(self) -> None:
        trainer = self.trainer
        state = {**trainer.state_dict(), "settings": self.settings, "recoveries": self.recoveries}
        write_checkpoint(self.folder, state)
        self.last_saved, self.saved_at = trainer.step, time.monotonic()
        for sink in self.sinks:
            if hasattr(sink, "on_checkpoint"):
                sink.on_checkpoint(state, trainer.step)
        for old in checkpoints(self.folder)[: -self.keep]:
            old.unlink()

    def _load(self, path: Path) -> int:
        """Load a checkpoint into the trainer; returns its step."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # stylepipe wrote it; anything else in its place is not loaded
            raise ResumeRefused(f"cannot read the checkpoint {path}: {type(err).__name__}; "
                                "remove it, or start afresh") from None  # fmt: skip
        differ = {
            k: (state["settings"].get(k), v)
            for k, v in self.settings.items()
            if state["settings"].get(k) != v
        }
        differ.update({k: (v, None) for k, v in state["settings"].items() if k not in self.settings})
        if differ:
            shown = ", ".join(
                f"{k} ({json.dumps(old)} -> {json.dumps(new)})" for k, (old, new) in sorted(differ.items())
            )
            raise ResumeRefused(
                f"the checkpoints in {self.folder} were written with other settings: {shown}. "
                "Go back to those settings to resume, or start afresh (stylepipe train --fresh)."
            )
        self.trainer.load_state_dict(state)
        self._loaded = state
        self.last_saved, self.saved_at = self.trainer.step, time.monotonic()
        return self.trainer.step


def start_afresh(folder: str | Path) -> None:
    """Remove a run's checkpoints (``--fresh``)."""
    shutil.rmtree(folder, ignore_errors=True)
