"""Input files that travel through the artifact store: a prepared shard, its manifest, a style
image, each addressed by its content (SHA-256), for workers that share no disk with the machine
that prepared them.

``publish`` puts a file into the store once, under ``inputs/<sha256>/<name>``; ``local_copy``
gives a worker a path to the same content: the path it was given when that holds it, else its
cache's copy when that holds it, else a copy fetched from the store into the cache, checked
against the hash and put in place atomically. What the store returns is untrusted input: a
name is a plain file name, a hash is 64 hex digits, and a copy whose content differs is refused
in one line and never kept.

Files are streamed: hashed in chunks, uploaded and downloaded file to file by the store, never
read into memory whole.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stylepipe.errors import StylepipeError
from stylepipe.files import file_sha256, write_json

INPUTS_DIR = "inputs"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class TravelError(StylepipeError):
    """An input file cannot be had with the content it was published with; one line."""


class ArtifactFolder(Protocol):
    """One folder of the artifact store (tracking.py's ``RunArtifacts`` is one)."""

    def upload(self, path: Path, name: str) -> None: ...

    def download(self, name: str, folder: Path) -> Path | None: ...


@dataclass(frozen=True)
class InputFile:
    """A published file: its plain name and the SHA-256 of its content."""

    name: str
    sha256: str

    def __post_init__(self) -> None:
        if Path(self.name).name != self.name or self.name in ("", ".", ".."):
            raise TravelError(f"input file name {self.name[:80]!r} is not a plain file name")
        if not _HEX64.fullmatch(self.sha256):
            raise TravelError(f"input file {self.name}: {self.sha256[:80]!r} is not a SHA-256")

    @property
    def folder(self) -> str:
        """Its folder in the store: the same content is published once, whatever its name."""
        return f"{INPUTS_DIR}/{self.sha256}"


def publish(path: str | Path, folder_for: Callable[[InputFile], ArtifactFolder]) -> InputFile:
    """Put the file at ``path`` into the store (``folder_for(InputFile)`` gives its folder)."""
    path = Path(path)
    item = InputFile(path.name, file_sha256(path))
    folder_for(item).upload(path, item.name)
    return item


def local_copy(item: InputFile, given: str | Path | None, cache: str | Path, folder: ArtifactFolder) -> Path:
    """A path holding ``item``'s content: ``given`` when it does, else the cache's copy, else one
    fetched from ``folder`` into the cache (``<cache>/<sha256>/<name>``)."""
    if given is not None and Path(given).is_file() and _holds(Path(given), item, keep_note=False):
        return Path(given)
    cached = Path(cache) / item.sha256 / item.name
    if cached.is_file() and _holds(cached, item):
        return cached
    return _fetch(item, cached, folder)


def _holds(path: Path, item: InputFile, keep_note: bool = True) -> bool:
    """Whether ``path`` holds ``item``'s content. A cached copy this module verified keeps a note
    of its size and time beside it, so a large file is hashed again only when it changed; a
    path the user gave is only read (``keep_note=False``)."""
    note = path.with_name(path.name + ".verified.json")
    stat = path.stat()
    seen = {"sha256": item.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        if json.loads(note.read_text()) == seen:
            return True
    except (OSError, ValueError):
        pass
    if file_sha256(path) != item.sha256:
        return False
    if keep_note:
        write_json(note, seen)
    return True


def _fetch(item: InputFile, target: Path, folder: ArtifactFolder) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Downloaded beside its target (the same file system), checked, then renamed into place.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetching-") as scratch:
        try:
            fetched = folder.download(item.name, Path(scratch))
        except Exception as err:  # the store unreachable, the file unreadable, ...
            raise TravelError(
                f"input file {item.name} ({item.sha256[:12]}) cannot be fetched: {err}"
            ) from None
        if fetched is None:
            raise TravelError(
                f"input file {item.name} ({item.sha256[:12]}) is not in the artifact store: publish it first"
            )
        fetched = Path(fetched)
        if fetched.resolve().parent != Path(scratch).resolve() or not fetched.is_file():
            raise TravelError(f"input file {item.name}: the store returned a path outside its folder")
        digest = file_sha256(fetched)
        if digest != item.sha256:
            raise TravelError(
                f"input file {item.name}: the artifact store's copy has SHA-256 {digest[:12]}, "
                f"not {item.sha256[:12]}: refused"
            )
        os.replace(fetched, target)
    _holds(target, item)  # its note: the next look does not hash it again
    return target
