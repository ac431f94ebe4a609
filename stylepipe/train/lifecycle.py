"""A long run's life on disk: who it is, where its files are, what state it is in.

A long run (``stylepipe train``, a study's final model; never a trial or a replay) has an
identity: the fingerprint of the settings that decide what it computes, the images included
(``run_identity``). Each identity has a folder of its own, so that runs with other settings
never block, resume, overwrite or delete each other:

    <parent>/<name>-<fingerprint>/
        run.json                         the recorded state, settings and step (atomic)
        checkpoints/step-NNNNNNNN.pt     good checkpoints: the state to resume from, nothing else
        model.safetensors                the model: written before ``finished`` is recorded
        metrics.csv, autopsy.json        what the run's sinks and its last halt wrote
        .lock                            held by the one process that runs it

**States** (``run.json``): ``running`` while a process works on it; then ``finished`` (the
model is written and finite), ``halted`` (a guard stopped it after every recovery) or
``interrupted`` (an exception or Ctrl-C stopped it). A process killed outright leaves
``running`` recorded; nobody holds its lock, so it reads as ``interrupted``. A study's final
model trained ahead of its certificate stops at ``trained`` (its last checkpoint written, its
model not yet): whoever finishes the study finishes it (speculative.py). What a command
does in each state is a table in docs/design.md ("A run's state").

Its checkpoints, their formats and their mirror: ``checkpoints.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from stylepipe.errors import StylepipeError
from stylepipe.files import try_lock, writable_folder, write_json

if TYPE_CHECKING:
    from stylepipe.config import Config

RUNNING, INTERRUPTED, HALTED, FINISHED = "running", "interrupted", "halted", "finished"
TRAINED = "trained"  # at its last step, its model not written yet (a final trained ahead)
STATES = (RUNNING, INTERRUPTED, HALTED, FINISHED, TRAINED)
NEW = "new"  # no run with this identity yet (not recorded: there is no folder)

RECORD = "run.json"
MODEL = "model.safetensors"

# Knobs that change how a run is computed, or how its images reach it, not what it computes:
# a run resumes with them changed.
NOT_FINGERPRINTED = (
    "data.publish",
    "train.checkpoint_every",
    "train.checkpoint_minutes",
    "train.keep_checkpoints",
    "train.device",
    "train.compile",
    "train.compile_mode",
    "train.channels_last",
    "train.tf32",
    "train.check_every",
)


class RunStateError(StylepipeError):
    """A run that cannot do what was asked in its state (busy, finished, unreadable)."""


# ------------------------------------------------------------------ identity


def run_identity(config: Config, data_fingerprint: str, **extra: Any) -> tuple[dict[str, Any], str]:
    """The settings that decide what a long run computes, flat (``train.lr``: 0.001, ...), and
    their fingerprint. ``data.content`` (a path) is replaced by ``data_fingerprint`` (what the
    images are); ``extra`` adds keys such as the study a final run belongs to."""
    flat: dict[str, Any] = {}
    for section in ("data", "loss", "train", "guard", "recovery"):
        for key, value in getattr(config, section).model_dump(mode="json").items():
            if f"{section}.{key}" not in NOT_FINGERPRINTED:
                flat[f"{section}.{key}"] = value
    flat["data.content"] = data_fingerprint
    flat.update(extra)
    return flat, hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in {*old, *new} if old.get(k) != new.get(k))


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``key (old -> new), ...`` for the keys whose values differ."""
    return ", ".join(
        f"{k} ({json.dumps(old.get(k))} -> {json.dumps(new.get(k))})" for k in differing_keys(old, new)
    )


# ------------------------------------------------------------------ the run's folder and state


class RunFolder:
    """One long run's folder, its lock and its recorded state (see the module doc)."""

    def __init__(self, parent: str | Path, name: str, settings: dict[str, Any], fingerprint: str):
        self.parent = Path(parent)
        self.path = self.parent / f"{name}-{fingerprint[:12]}"
        self.settings = settings
        self.fingerprint = fingerprint
        self.checkpoints = self.path / "checkpoints"
        self.model = self.path / MODEL
        self.metrics = self.path / "metrics.csv"
        self.autopsy = self.path / "autopsy.json"
        self.record_path = self.path / RECORD
        self._lock: Any = None

    @contextmanager
    def claimed(self) -> Iterator[RunFolder]:
        """This process runs it inside: another is refused at once (the lock goes with the
        process, however it ends). Temporaries a killed write left are cleared."""
        writable_folder(self.path, "run folder")
        handle = open(self.path / ".lock", "a")  # noqa: SIM115  (held until the block ends)
        if not try_lock(handle):
            raise RunStateError(
                f"another process is running this run right now ({self.path}); wait for it to end, or stop it"
            )
        self._lock = handle
        try:
            for folder in (self.path, self.checkpoints):
                for stale in folder.glob(".*.tmp*") if folder.is_dir() else ():
                    stale.unlink(missing_ok=True)  # nobody else writes here: we hold the lock
            yield self
        finally:
            self._lock = None
            if not (self.path / RECORD).exists() and not self.checkpoints.exists():
                shutil.rmtree(self.path, ignore_errors=True)  # it never started: leave no empty folder
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def record(self) -> dict[str, Any] | None:
        """The recorded state (validated: the file is read back, so it is untrusted), or None."""
        return read_record(self.path / RECORD)

    def state(self) -> str:
        """``new``, or the recorded state; ``running`` with nobody else running it (this process
        holds the lock) is ``interrupted``: its process died."""
        record = self.record()
        if record is None:
            return NEW
        if record["state"] == RUNNING and self._lock is not None:
            return INTERRUPTED
        return record["state"]

    def write(self, state: str, **fields: Any) -> dict[str, Any]:
        """Record ``state`` (atomically), keeping the fields recorded before."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        record = {
            **(self.record() or {}),
            **fields,
            "state": state,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if state != INTERRUPTED:
            record.pop("reason", None)  # why it stopped before: no longer so
        write_json(self.path / RECORD, record)
        return record

    def discard(self) -> None:
        """Start this run over (``--fresh``): its checkpoints, model, metrics, autopsy and record
        go; nothing else in the folder, and no other run, is touched."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        for path in (self.model, self.metrics, self.autopsy, self.path / RECORD):
            path.unlink(missing_ok=True)

    def siblings(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """The other runs beside this one whose record can be read."""
        for record_path in sorted(self.parent.glob(f"*/{RECORD}")):
            if record_path.parent != self.path:
                try:
                    record = read_record(record_path)
                except RunStateError:
                    continue
                if record is not None:
                    yield record_path.parent, record


def read_record(path: Path) -> dict[str, Any] | None:
    """A ``run.json``, checked to be one stylepipe wrote; None when there is none."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunStateError(
            f"{path} cannot be read as a run record ({type(err).__name__}): remove the folder "
            f"{path.parent} to start that run over"
        ) from None
    if not (
        isinstance(record, dict)
        and record.get("state") in STATES
        and isinstance(record.get("settings"), dict)
    ):
        raise RunStateError(
            f"{path} is not a run record stylepipe wrote: remove the folder {path.parent} "
            "to start that run over"
        )
    return record


# ------------------------------------------------------------------ what a long run reports to


class RunSink(Protocol):
    """What receives a long run's committed metric rows and events (a CSV file, an MLflow run).
    The rows arrive only once a checkpoint covers them (``LongRun``), so a stretch that a crash
    or a recovery throws away never reaches a sink."""

    def on_metrics(self, rows: list[dict[str, float]]) -> None: ...

    def flush(self) -> None:
        """The rows so far are stored when this returns."""
        ...

    def on_resume(self, step: int) -> None:
        """The run went on from its checkpoint at ``step``: skip the rows already held."""
        ...

    def on_recovery(self, event: dict[str, Any]) -> None:
        """The run recovered from a halt (``LongRun`` says how)."""
        ...
