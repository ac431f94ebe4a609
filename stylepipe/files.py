"""Writing files so that a crash never leaves half of one, and reading tensors without pickle."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

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


def try_lock(handle: IO) -> bool:
    """Take an exclusive ``flock`` on an open file without waiting. False, and the file closed,
    when another process holds it. The lock goes with the process, however it ends."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return False
    return True
