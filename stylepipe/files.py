"""Writing files so that a crash never leaves half of one, and reading tensors without pickle."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without an error, removed when it raises. The suffix is kept, for writers that pick the
    format from it (PIL) or append one when it is missing (numpy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def writable_folder(path: str | Path, what: str) -> Path:
    """``path`` as a folder this process can write to (created when missing), or a
    ``StylepipeError`` naming ``what`` and why (a file in the way, a read-only disk, ...)."""
    from stylepipe.errors import StylepipeError

    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, "it is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # permission bits do not stop root; a real write does
            pass
    except OSError as err:
        raise StylepipeError(f"cannot write to the {what} {path}: {err.strerror or err}") from None
    return path


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, value: Any) -> Path:
    return write_text(path, json.dumps(value, indent=2, default=str))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a torch file read with ``weights_only=True``
    (no code in the file runs). Raises ``ValueError`` (or ``OSError``) saying what is wrong in
    one line; callers say which kind of file they wanted."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as err:
            raise ValueError(f"not a safetensors file ({str(err).splitlines()[0]})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # garbage, a truncated file, or a pickle of more than tensors
            if "Weights only load failed" in str(err):
                raise ValueError(
                    "it holds Python objects, not only tensors: not loaded (weights_only)"
                ) from None
            raise ValueError(f"not a file written by torch.save ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state_dict")
    return state


def file_sha256(path: str | Path) -> str:
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


STATE_KEY = "stylepipe.state"  # the header entry that holds a state's tree


def write_state(path: str | Path, state: Any) -> Path:
    """A nested state (a trainer's: tensors in dicts, lists and tuples, beside numbers,
    strings, booleans and None) as one safetensors file, atomically: the tensors as tensors,
    the rest as JSON in its header. No pickle, so a copy kept elsewhere (on an MLflow run) is
    read back as data and nothing else (``read_state``)."""
    import torch
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
    """What ``write_state`` wrote. ``ValueError`` when the file is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            tree = json.loads((handle.metadata() or {})[STATE_KEY])
            # each its own storage: a torch.save of the state must not see views of one buffer
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}  # noqa: SIM118
    except Exception as err:
        raise ValueError(f"{path} is not a state written by stylepipe ({type(err).__name__})") from None

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
