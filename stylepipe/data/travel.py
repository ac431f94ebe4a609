"""Input files that travel through the artifact store: a prepared shard, its manifest, a style
image, each addressed by its content (SHA-256), for workers that share no disk with the machine
that prepared them.

``publish`` puts a file into the store once, under ``inputs/<sha256>/<name>``; ``local_copy``
gives a worker a path to the same content: the path it was given when that holds it, else its
cache's copy when that holds it, else a copy fetched from the store into the cache, checked
against the hash and put in place atomically. What the store returns is untrusted input: a
name is a plain file name, a hash is 64 hex digits, and a copy whose content differs is refused
in one line and never kept.

A prepared shard is a folder (``manifest.parquet`` + ``shard.npy``): ``local_shard`` puts both
files, each checked against its own hash, into ``<cache>/<the manifest's sha256>/``, the folder
the manifest's hash addresses; ``from_url`` does the same for a prepared folder that is already
in the store (``data.content: runs:/.../prepared``), which has no recorded hash to check: its
manifest's hash names the folder, and the two files must make a shard (``shard.check_shard``).
``Inputs`` is what a study records of what it published (search/attributes.py).

Files are streamed: hashed in chunks, uploaded and downloaded file to file by the store, never
read into memory whole. One process at a time fills a cache entry (a file lock beside it): a
second worker on the machine waits, then finds it there.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import model_validator

from stylepipe.errors import StylepipeError
from stylepipe.files import file_sha256, write_json
from stylepipe.records import Record
from stylepipe.stores import first_line, redact_url

INPUTS_DIR = "inputs"
MANIFEST, SHARD = "manifest.parquet", "shard.npy"  # a prepared folder's two files (data/shard.py)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_bundled(style_image: str) -> bool:
    """A scikit-image or generated style image: its name fixes it, and it travels as its name."""
    kind, _, name = style_image.partition(":")
    return kind in ("skimage", "generated") and bool(name)


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


FolderFor = Callable[[InputFile], ArtifactFolder]  # the store's folder of one published file


def publish(path: str | Path, folder_for: FolderFor) -> InputFile:
    """Put the file at ``path`` into the store (``folder_for(InputFile)`` gives its folder)."""
    path = Path(path)
    item = InputFile(path.name, file_sha256(path))
    folder_for(item).upload(path, item.name)
    return item


def local_copy(
    item: InputFile,
    given: str | Path | None,
    cache: str | Path,
    folder: ArtifactFolder,
    key: str | None = None,
) -> Path:
    """A path holding ``item``'s content: ``given`` when it does, else the cache's copy, else one
    fetched from ``folder`` into the cache (``<cache>/<key>/<name>``, the key its own hash unless
    it belongs to a folder of files, as a shard's two do)."""
    if given is not None and Path(given).is_file() and _holds(Path(given), item, keep_note=False):
        return Path(given)
    cached = Path(cache) / (key or item.sha256) / item.name
    if cached.is_file() and _holds(cached, item):
        return cached
    return _fetch(item, cached, folder)


def _note_of(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _seen(path: Path, sha256: str) -> dict:
    stat = path.stat()
    return {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _noted(path: Path) -> str | None:
    """The SHA-256 a cached file's note gives it, while the file's size and time are the noted
    ones (it was not changed since it was checked); else None."""
    try:
        note = json.loads(_note_of(path).read_text())
        return note["sha256"] if note == _seen(path, note["sha256"]) else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _holds(path: Path, item: InputFile, keep_note: bool = True) -> bool:
    """Whether ``path`` holds ``item``'s content. A cached copy this module verified keeps a note
    of its size and time beside it, so a large file is hashed again only when it changed; a
    path the user gave is only read (``keep_note=False``)."""
    if _noted(path) == item.sha256:
        return True
    if file_sha256(path) != item.sha256:
        return False
    if keep_note:
        write_json(_note_of(path), _seen(path, item.sha256))
    return True


def _fetch(item: InputFile, target: Path, folder: ArtifactFolder) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    # A scratch folder left by a process killed mid-fetch (kill -9 skips its clean-up) holds a
    # partial file nothing uses: removed here, where no other fetch of this entry can be running
    # (the callers hold the entry's lock, ``cache_entry``).
    for stale in target.parent.glob(".fetching-*"):
        shutil.rmtree(stale, ignore_errors=True)
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
    write_json(_note_of(target), _seen(target, digest))  # hashed above: the next look does not hash it
    return target


# ------------------------------------------------------------------ a prepared shard, a folder


@contextmanager
def cache_entry(cache: str | Path, key: str) -> Iterator[Path]:
    """``<cache>/<key>``, filled by one process at a time: another worker of the machine waits
    here, then finds the files in place and fetches nothing."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".{key}.lock").open("a") as handle:  # released when closed, or the process ends
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield cache / key


def manifest_sha256(folder: str | Path) -> str | None:
    """The SHA-256 of a prepared folder's manifest, the hash that addresses its shard; None when
    ``folder`` is not a prepared folder."""
    folder = Path(folder)
    if not ((folder / MANIFEST).is_file() and (folder / SHARD).is_file()):
        return None
    return file_sha256(folder / MANIFEST)


def local_shard(manifest: InputFile, shard: InputFile, cache: str | Path, folder_for: FolderFor) -> Path:
    """The prepared folder ``<cache>/<manifest's sha256>/`` holding the published shard: each
    file the cache's checked copy, or fetched and checked against its own hash."""
    with cache_entry(cache, manifest.sha256) as entry:
        for item in (manifest, shard):
            local_copy(item, None, cache, folder_for(item), key=manifest.sha256)
    return entry


def from_url(url: str, cache: str | Path, download: Callable[[str, Path], Path]) -> Path:
    """A prepared folder already in the artifact store, at ``url``, as a folder of the cache.

    ``download(name, folder)`` fetches the file ``name`` under ``url`` into ``folder``. The
    manifest comes first (it is small): its hash names the cache's folder, and a folder there
    whose two files are as checked before is used without fetching the shard. A fetched pair is
    untrusted: both files must make a shard (``shard.check_shard``), or it is refused in one
    line and nothing is kept."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetching-") as scratch:
        manifest = _downloaded(download, MANIFEST, Path(scratch), url)
        key = file_sha256(manifest)
        with cache_entry(cache, key) as entry:
            if _noted(entry / MANIFEST) == key and _noted(entry / SHARD) is not None:
                return entry
            shard = _downloaded(download, SHARD, Path(scratch), url)
            _check_shard(Path(scratch), url)
            entry.mkdir(exist_ok=True)
            for name, digest in ((MANIFEST, key), (SHARD, file_sha256(shard))):
                os.replace(Path(scratch) / name, entry / name)
                write_json(_note_of(entry / name), _seen(entry / name, digest))
            return entry


def _downloaded(download: Callable[[str, Path], Path], name: str, scratch: Path, url: str) -> Path:
    try:
        fetched = Path(download(name, scratch))
    except Exception as err:  # no such artifact, the store unreachable, ...
        raise TravelError(
            f"{name} cannot be fetched from {redact_url(url)}: {first_line(err, url)}"
        ) from None
    if fetched.resolve() != (scratch / name).resolve() or not fetched.is_file():
        raise TravelError(
            f"{name} of {redact_url(url)}: the store returned another path than the one asked for"
        )
    return fetched


def _check_shard(folder: Path, url: str) -> None:
    from stylepipe.data.shard import check_shard  # numpy and pandas: only when a shard is read

    problem = check_shard(folder)
    if problem is not None:
        raise TravelError(
            f"data.content={redact_url(url)} is not a prepared folder stylepipe wrote: {problem}"
        )


# ------------------------------------------------------------------ what a study records


class PublishedFile(Record):
    """One published file, as a study records it: checked as ``InputFile`` checks it."""

    name: str
    sha256: str

    @model_validator(mode="after")
    def _plain_name_and_hash(self) -> PublishedFile:
        try:
            InputFile(self.name, self.sha256)
        except TravelError as err:
            raise ValueError(str(err)) from None
        return self

    @classmethod
    def of(cls, item: InputFile) -> PublishedFile:
        return cls(name=item.name, sha256=item.sha256)

    @property
    def file(self) -> InputFile:
        return InputFile(self.name, self.sha256)


class Inputs(Record):
    """What a study published for its workers, in the artifact folders of its MLflow run
    ``run_id``: the prepared shard (its manifest, whose hash addresses it, and ``shard.npy``),
    and the style image when it is a file (a bundled or generated one travels as its name)."""

    run_id: str
    manifest: PublishedFile
    shard: PublishedFile
    style: PublishedFile | None = None

    @model_validator(mode="after")
    def _a_shard_and_a_run(self) -> Inputs:
        if (self.manifest.name, self.shard.name) != (MANIFEST, SHARD):
            raise ValueError(f"a shard is {MANIFEST} and {SHARD}")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.run_id):
            raise ValueError("not an MLflow run id")
        return self
