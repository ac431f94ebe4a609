"""Sharing one machine's CPU cores between stylepipe processes, however they were started.

By default torch uses every core in every process, so processes on one machine compete for
the same cores, and oversubscribed they run several times slower (bench/RESULTS.md). Processes started on their own (two `stylepipe worker`
commands, two Prefect flow runs) do not know about each other, so they find each other
through a folder with one file per live process. Each process holds an exclusive ``flock``
on its file for as long as it runs. The kernel drops the lock when the process dies, even
after SIGKILL, so a file whose lock can be taken belongs to a dead process, and the next
count removes it.

A process's share is ``cores // live processes``. It is counted again before every trial,
so a worker that started alone gives cores back when others join and takes them back when
they leave. ``OMP_NUM_THREADS`` set by the user wins: torch is then left alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

FOLDER_ENV = "STYLEPIPE_CORES_DIR"
_SUFFIX = ".worker"
_PARTIAL = ".partial-"  # a file being registered: not counted, removed if left behind by a crash
_PARTIAL_STALE_S = 60.0

_threads_lock = threading.RLock()
_held: _Registration | None = None  # this process's registration
_depth = 0  # nested CoreShare blocks in this process: one registration for them all
_torch_start: int | None = None  # torch's thread count before set_torch_threads() first changed it


def sharing_folder() -> Path:
    """Where the live processes' files are: $STYLEPIPE_CORES_DIR, or a private folder of this
    user's in the temporary folder (local to the machine, like the cores being counted)."""
    override = os.environ.get(FOLDER_ENV)
    if override:
        return Path(override)
    return Path(tempfile.gettempdir()) / f"stylepipe-{os.getuid()}" / "workers"


def _folder() -> Path:
    """The sharing folder, created if needed. If someone else owns it, its files cannot be
    trusted, so this raises OSError."""
    folder = sharing_folder()
    checked = [folder]
    if not os.environ.get(FOLDER_ENV):  # in the shared temporary folder: ours alone, both levels
        folder.parent.mkdir(mode=0o700, exist_ok=True)
        checked.append(folder.parent)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in checked:
        if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.getuid():
            raise OSError(f"{path} is not a folder of this user's (uid {os.getuid()})")
    return folder


def _is_held(path: Path) -> bool:
    """Whether a live process holds ``path``'s lock. If no process holds it, the file is removed.
    Each open() gets its own lock, so this process's own file counts as held as well."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # removed meanwhile: it left, or another counter cleaned it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops only this probe's lock
    path.unlink(missing_ok=True)
    return False


def live_processes() -> int:
    """How many stylepipe processes on this machine are registered now, this one included when
    it is registered. Files of dead processes are removed along the way. This is 0 when the
    sharing folder cannot be used."""
    try:
        folder = _folder()
        entries = list(folder.iterdir())
    except OSError as err:
        log.debug("cores' sharing folder unavailable (%s): counting this process alone", err)
        return 0
    live = 0
    for path in entries:
        if path.name.endswith(_SUFFIX):
            live += _is_held(path)
        elif path.name.startswith(_PARTIAL):
            try:
                old = time.time() - path.stat().st_mtime > _PARTIAL_STALE_S
            except FileNotFoundError:
                continue
            if old:  # a registration that crashed between creating and naming its file
                _is_held(path)
    return live


def cores() -> int:
    """The machine's CPU cores."""
    return os.cpu_count() or 1


def registered() -> bool:
    """Whether this process is registered (inside a ``CoreShare`` block)."""
    return _held is not None and _held.pid == os.getpid()


def _sharers() -> int:
    """The processes sharing the cores: the registered ones, and this one if it is not."""
    return max(1, live_processes() + (0 if registered() else 1))


def share() -> int:
    """This process's share of the cores: ``cores // live processes``, at least 1. An
    unregistered caller, such as a `stylepipe prepare` started alone, counts itself as one more."""
    return max(1, cores() // _sharers())


def set_torch_threads() -> int:
    """Set torch's thread count to this process's share and return the count torch now uses.

    The count is never raised above what torch used before stylepipe first changed it (its
    default, or what MKL_NUM_THREADS asked for), because more threads than that does not
    help. If the user set OMP_NUM_THREADS, torch is left alone.
    """
    global _torch_start
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    with _threads_lock:
        before = torch.get_num_threads()
        if _torch_start is None:
            _torch_start = before
        sharers = _sharers()
        threads = min(max(1, cores() // sharers), _torch_start)
        if threads != before:
            torch.set_num_threads(threads)
            message = "torch threads %d -> %d: %d stylepipe processes share %d cores"
            log.info(message, before, threads, sharers, cores())
        return threads


class _Registration:
    """One live process's file, locked until ``close``. The file is locked under a partial
    name and then renamed, so a counter never sees it unlocked and removes it by mistake."""

    def __init__(self, folder: Path):
        self.pid = os.getpid()
        name = f"{self.pid}-{uuid.uuid4().hex[:12]}"
        partial = folder / f"{_PARTIAL}{name}"
        self.path = folder / f"{name}{_SUFFIX}"
        self.fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(self.fd, f"{self.pid}\n".encode())
            os.rename(partial, self.path)
        except BaseException:
            partial.unlink(missing_ok=True)
            os.close(self.fd)
            raise

    def close(self) -> None:
        self.path.unlink(missing_ok=True)  # still locked: no counter takes it for a dead one
        os.close(self.fd)


def _forget_in_child() -> None:
    """A forked child is not the registered process: it does not count, and it never removes
    its parent's file. Closing the inherited descriptor keeps the parent's lock."""
    global _held, _depth
    if _held is not None:
        os.close(_held.fd)
    _held, _depth = None, 0


os.register_at_fork(after_in_child=_forget_in_child)


class CoreShare:
    """Counts this process among the machine's stylepipe processes while the block runs.

    Nested blocks in one process share a single registration, so a process counts once. If
    the sharing folder cannot be used (for example a read-only temporary folder), the block runs
    unregistered and logs why.
    """

    def __enter__(self) -> CoreShare:
        global _held, _depth
        with _threads_lock:
            if _depth == 0:
                try:
                    _held = _Registration(_folder())
                except OSError as err:
                    log.warning(
                        "cannot register in the cores' sharing folder (%s): this process counts "
                        "as one but others will not see it",
                        err,
                    )
                    _held = None
            _depth += 1
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        global _held, _depth
        with _threads_lock:
            if _depth == 0:  # a forked child leaving a block its parent entered
                return
            _depth -= 1
            if _depth == 0 and _held is not None:
                _held.close()
                _held = None


class MachineCores:
    """The library's ``threads.Cores``, answered for this machine: its cores shared with every
    stylepipe process registered on it."""

    def share(self) -> int:
        return share()

    def set_threads(self) -> int:
        return set_torch_threads()

    def counted(self) -> CoreShare:
        return CoreShare()


MACHINE = MachineCores()
