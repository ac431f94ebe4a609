"""A long run's checkpoints: their two formats, their mirror, and the saver that writes,
rotates and reads them back (where the run's folder is and what state it is in: lifecycle.py).

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

import io
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from stylepipe.files import atomic_path, file_sha256, write_json
from stylepipe.train.lifecycle import RunStateError, settings_diff

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"step-(\d{8})\.pt")
MIRROR_SLOTS = ("a.safetensors", "b.safetensors")
MIRROR_POINTER = "latest.json"
STATE_KEY = "stylepipe.state"  # the header entry that holds a state's tree
# The keys a trainer's state must hold (Trainer.state_dict, plus the long run's own).
STATE_KEYS = (
    "step",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "clip_norm",
    "guard",
    "batches",
    "rng_cpu",
    "rng_cuda",
    "history",
    "settings",
    "recoveries",
)


class NonFiniteState(Exception):
    """A state holding NaN or Inf was about to be written; it was not."""

    def __init__(self, step: int, tensors: list[str]):
        super().__init__(f"{len(tensors)} tensors of the state at step {step} are not finite")
        self.step = step
        self.tensors = tensors


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
        ok = (
            isinstance(pointer, dict)
            and pointer.get("slot") in MIRROR_SLOTS
            and isinstance(pointer.get("step"), int)
            and isinstance(pointer.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", pointer["sha256"])
        )
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
            raise RunStateError(
                f"cannot write the checkpoint {path}: {err.strerror or err}. The run stopped at its "
                "last good checkpoint: fix that (free space, a file in the way) and run the same "
                "command to resume"
            ) from None
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
