"""A long run's life on disk: who it is, what state it is in, its checkpoints, its model.

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
``running`` recorded; nobody holds its lock, so it reads as ``interrupted``. What a command
does in each state is a table in docs/design.md ("A run's state").

**Checkpoints** have two formats: on this machine ``torch.save`` of the trainer's state
(tensors, numbers and lists only: read with ``weights_only=True``), and, for a copy kept
elsewhere (the *mirror*), safetensors with the state's tree as JSON in its header
(``write_state``/``read_state``): no pickle in any store. A checkpoint is written only when
every tensor in it is finite. Files read back are untrusted: a checkpoint that cannot be read,
was written with other settings or names another step is skipped with a warning, and the
next older one is used.

**The mirror** is any ``Mirror`` (tracking.py's puts it on the run's MLflow run): two slots
used in turn and ``latest.json`` (slot, step, SHA-256) written last, so a crash during an
upload leaves the pointer on the other, whole, copy. A fetched copy is used only when its
pointer names one of the two slots, its bytes match the SHA-256 and it decodes to a state
of this run.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from stylepipe.errors import StylepipeError
from stylepipe.files import atomic_path, file_sha256, writable_folder, write_json

if TYPE_CHECKING:
    from stylepipe.config import Config

log = logging.getLogger(__name__)

RUNNING, INTERRUPTED, HALTED, FINISHED = "running", "interrupted", "halted", "finished"
STATES = (RUNNING, INTERRUPTED, HALTED, FINISHED)
NEW = "new"  # no run with this identity yet (not recorded: there is no folder)

RECORD = "run.json"
MODEL = "model.safetensors"
CHECKPOINT_NAME = re.compile(r"step-(\d{8})\.pt")
MIRROR_SLOTS = ("a.safetensors", "b.safetensors")
MIRROR_POINTER = "latest.json"

# Knobs that change how a run is computed, not what: a run resumes with them changed.
NOT_FINGERPRINTED = ("train.checkpoint_every", "train.checkpoint_minutes", "train.keep_checkpoints",
                     "train.device", "train.compile", "train.compile_mode", "train.channels_last",
                     "train.tf32", "train.check_every")  # fmt: skip
# The keys a trainer's state must hold (Trainer.state_dict, plus the long run's own).
STATE_KEYS = ("step", "model", "optimizer", "scheduler", "scaler", "clip_norm", "guard", "batches", "rng_cpu",
              "rng_cuda", "history", "settings", "recoveries")  # fmt: skip


class RunStateError(StylepipeError):
    """A run that cannot do what was asked in its state (busy, finished, unreadable)."""


class NonFiniteState(Exception):
    """A state holding NaN or Inf was about to be written; it was not."""

    def __init__(self, step: int, tensors: list[str]):
        super().__init__(f"{len(tensors)} tensors of the state at step {step} are not finite")
        self.step = step
        self.tensors = tensors


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
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunStateError(f"another process is running this run right now ({self.path}); wait for it "
                                "to end, or stop it") from None  # fmt: skip
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
        record = {**(self.record() or {}), **fields, "state": state, "fingerprint": self.fingerprint,
                  "settings": self.settings, "updated": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
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
        raise RunStateError(f"{path} cannot be read as a run record ({type(err).__name__}): remove the folder "
                            f"{path.parent} to start that run over") from None  # fmt: skip
    if not (
        isinstance(record, dict)
        and record.get("state") in STATES
        and isinstance(record.get("settings"), dict)
    ):
        raise RunStateError(f"{path} is not a run record stylepipe wrote: remove the folder {path.parent} "
                            "to start that run over")  # fmt: skip
    return record


# ------------------------------------------------------------------ the checkpoint formats


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """The paths of the floating-point tensors in a nested state that hold NaN or Inf."""
    if isinstance(tree, torch.Tensor):
        bad = tree.is_floating_point() and not bool(torch.isfinite(tree).all())
        return [prefix or "tensor"] if bad else []
    if isinstance(tree, dict):
        return [
            p for k, v in tree.items() for p in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
        ]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in nonfinite_tensors(v, f"{prefix}[{i}]")]
    return []


def write_state(path: str | Path, state: Any) -> Path:
    """A nested state (tensors in dicts, lists and tuples, beside numbers, strings, booleans and
    None) as one safetensors file, atomically: the tensors as tensors, the rest as JSON in its
    header. No pickle: a copy kept elsewhere is read back as data and nothing else."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = value.detach().cpu().clone().contiguous()  # no shared storage
            return {"$tensor": key}
        if isinstance(value, dict):  # keys may be ints (an optimizer's state)
            return {"$items": [[encode(k), encode(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"$tuple": [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"a {type(value).__name__} cannot be written without pickle")

    tree = json.dumps(encode(state))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={STATE_KEY: tree})
    return Path(path)


STATE_KEY = "stylepipe.state"  # the header entry that holds a state's tree


def read_state(path: str | Path) -> Any:
    """What ``write_state`` wrote. ``ValueError`` in one line when the file is not one (garbage,
    a pickle, a header naming a tensor the file does not hold, ...)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            tree = json.loads((handle.metadata() or {})[STATE_KEY])
            # each its own storage: a torch.save of the state must not see views of one buffer
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}  # noqa: SIM118

        def decode(value: Any) -> Any:
            if isinstance(value, list):
                return [decode(v) for v in value]
            if isinstance(value, dict):
                if "$tensor" in value:
                    return tensors[value["$tensor"]]
                if "$tuple" in value:
                    return tuple(decode(v) for v in value["$tuple"])
                return {decode(k): decode(v) for k, v in value["$items"]}
            return value

        return decode(tree)
    except Exception as err:
        raise ValueError(
            f"{Path(path).name} is not a state written by stylepipe ({type(err).__name__})"
        ) from None


def check_state(state: Any, settings: dict[str, Any], step: int | None = None) -> str | None:
    """Why a checkpoint read back is not one of this run's, or None when it is."""
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        return f"not a stylepipe checkpoint (no {', '.join(missing[:3])})"
    if (
        not isinstance(state["step"], int)
        or state["step"] < 0
        or (step is not None and state["step"] != step)
    ):
        return f"its step {state['step']!r} is not the one its name says ({step})"
    if state["settings"] != settings:
        return f"written with other settings: {settings_diff(state['settings'], settings)}"
    if not isinstance(state["model"], dict) or not all(
        isinstance(t, torch.Tensor) for t in state["model"].values()
    ):
        return "its model is not a set of tensors"
    bad = nonfinite_tensors(state["model"])
    if bad:
        return f"{len(bad)} of its model's tensors are not finite"
    return None


# ------------------------------------------------------------------ the mirror


class Mirror(Protocol):
    """Where a run's checkpoints are copied for a retry on a machine without them (tracking.py
    puts them on the run's MLflow run). Names are plain file names chosen here."""

    def upload(self, path: Path, name: str) -> None: ...

    def download(self, name: str, folder: Path) -> Path | None:
        """``name`` copied into ``folder``; None when the mirror has no such file."""
        ...


def fetch_mirrored(mirror: Mirror, settings: dict[str, Any]) -> tuple[dict | None, str | None]:
    """The state the mirror's pointer names, checked: ``(state, None)``; ``(None, None)`` when
    nothing was mirrored; ``(None, why)`` when the copy cannot be used (one line)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pointer_path = mirror.download(MIRROR_POINTER, Path(tmp))
            if pointer_path is None:
                return None, None
            pointer = json.loads(pointer_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return None, f"its {MIRROR_POINTER} cannot be read ({type(err).__name__})"
        ok = (isinstance(pointer, dict) and pointer.get("slot") in MIRROR_SLOTS and isinstance(pointer.get("step"), int)
              and isinstance(pointer.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", pointer["sha256"]))  # fmt: skip
        if not ok:
            return None, f"its {MIRROR_POINTER} is not a pointer stylepipe wrote (slot {str(pointer)[:80]})"
        try:
            copy = mirror.download(pointer["slot"], Path(tmp))
        except OSError as err:
            return None, f"its copy {pointer['slot']} cannot be fetched ({type(err).__name__})"
        if copy is None:
            return None, f"its copy {pointer['slot']} is missing"
        if file_sha256(copy) != pointer["sha256"]:
            return None, f"its copy {pointer['slot']} does not match the SHA-256 its pointer recorded"
        try:
            state = read_state(copy)
        except ValueError as err:
            return None, str(err)
    why = check_state(state, settings, pointer["step"])
    return (None, why) if why else (state, None)


# ------------------------------------------------------------------ checkpoints


class CheckpointSaver:
    """Saving, rotation, "latest" and the mirror of one run's good checkpoints (the anchor is
    Composer's ``CheckpointSaver``). ``load`` reads them back, newest first, skipping (with a
    warning) any that cannot be used."""

    def __init__(self, folder: str | Path, keep: int, settings: dict[str, Any], mirror: Mirror | None = None):
        self.folder = Path(folder)
        self.keep = keep
        self.settings = settings
        self.mirror = mirror
        self.slot: str | None = None  # the mirror slot the pointer names
        self.skipped: list[str] = []  # why checkpoints found here were not used
        self.unusable: set[Path] = set()  # those files: never rotated away (they may not be ours)
        self.mirror_errors: list[str] = []

    def paths(self) -> list[Path]:
        """This run's checkpoints, oldest first (other files in the folder are never read)."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if CHECKPOINT_NAME.fullmatch(p.name)]
        return sorted(found, key=step_of)

    def save(self, state: dict[str, Any]) -> Path:
        """Write ``state`` (a trainer's, with ``settings`` and ``recoveries``) as the newest
        checkpoint, atomically; drop the oldest beyond ``keep``; copy it to the mirror.
        ``NonFiniteState`` when it holds NaN or Inf: nothing is written."""
        self.verify(state)
        path = self._write(state)
        for old in [p for p in self.paths() if p not in self.unusable][: -self.keep]:
            old.unlink()
        if self.mirror is not None:
            self._mirror(state)
        return path

    @staticmethod
    def verify(state: dict[str, Any]) -> None:
        """``NonFiniteState`` when the model or the optimizer's state holds NaN or Inf."""
        bad = nonfinite_tensors({"model": state["model"], "optimizer": state["optimizer"]})
        if bad:
            raise NonFiniteState(state["step"], bad)

    def adopt(self, state: dict[str, Any]) -> Path:
        """A state fetched from the mirror, as this machine's newest checkpoint."""
        return self._write(state)

    def _write(self, state: dict[str, Any]) -> Path:
        path = self.folder / f"step-{state['step']:08d}.pt"
        buffer = io.BytesIO()
        torch.save(state, buffer)  # in memory first: torch reports a failed write without its cause
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(buffer.getbuffer())
        except OSError as err:  # a full disk, a folder in the way: the run stops where it was good
            raise RunStateError(f"cannot write the checkpoint {path}: {err.strerror or err}. The run stopped at its "
                                "last good checkpoint: fix that (free space, a file in the way) and run the same "
                                "command to resume") from None  # fmt: skip
        return path

    def _mirror(self, state: dict[str, Any]) -> None:
        """Copy to the slot the pointer does not name, then move the pointer to it. A failed copy
        is reported (``mirror_errors``, the log); training goes on."""
        try:
            if self.slot is None:  # a resumed run: do not overwrite the copy in use
                with tempfile.TemporaryDirectory() as tmp:
                    pointer = self.mirror.download(MIRROR_POINTER, Path(tmp))
                    self.slot = json.loads(pointer.read_text()).get("slot") if pointer else None
            slot = MIRROR_SLOTS[1] if self.slot == MIRROR_SLOTS[0] else MIRROR_SLOTS[0]
            with tempfile.TemporaryDirectory() as tmp:
                copy = write_state(Path(tmp) / slot, state)
                self.mirror.upload(copy, slot)
                pointer = {"slot": slot, "step": state["step"], "sha256": file_sha256(copy)}
                self.mirror.upload(write_json(Path(tmp) / MIRROR_POINTER, pointer), MIRROR_POINTER)
            self.slot = slot
        except Exception as err:
            message = f"checkpoint at step {state['step']}: {type(err).__name__}: {err}"
            self.mirror_errors.append(message)
            log.warning("the checkpoint at step %d was not copied to the mirror: %s", state["step"], message)

    def load(self, before: int | None = None, back: int = 0) -> dict[str, Any] | None:
        """The newest usable checkpoint (before step ``before``, when given, and ``back`` more
        usable ones further back, as far as there are), or None when there is none. Each one
        skipped is said once, in the log and in ``skipped``."""
        usable = []
        for path in reversed(self.paths()):
            if before is not None and step_of(path) >= before:
                continue
            state, why = self._read(path)
            if why is not None:
                if path not in self.unusable:
                    self.unusable.add(path)
                    self.skipped.append(why)
                    log.warning("%s", why)
                continue
            usable.append(state)
            if len(usable) > back:
                break
        return usable[-1] if usable else None

    def _read(self, path: Path) -> tuple[dict | None, str | None]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # garbage, a truncated file, a pickle of more than tensors
            return None, f"skipped the checkpoint {path}: it cannot be read ({type(err).__name__})"
        why = check_state(state, self.settings, step_of(path))
        return (None, f"skipped the checkpoint {path}: {why}") if why else (state, None)


def step_of(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(path.name).group(1))


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
