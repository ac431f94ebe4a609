"""Worker processes on one machine: each its own process (and CUDA context), counted among the
machine's workers so that they share its cores (cores.py)."""

from __future__ import annotations

import multiprocessing
import threading
from contextlib import suppress

from stylepipe import chain
from stylepipe.config import Config
from stylepipe.ops import cores
from stylepipe.search.storage import StorageError
from stylepipe.stores import is_sqlite, redact_url


def run_worker(config: Config, progress: bool = False, finish: bool = True) -> dict:
    """``chain.run_worker``, counted among this machine's workers: each trial takes its share of
    the cores, and the one that finishes the study takes the cores the others gave back."""
    with cores.CoreShare():
        return chain.run_worker(config, progress=progress, cores=cores.MACHINE, finish=finish)


def check_fan_out(config: Config) -> None:
    """``search.workers`` > 1 needs a study the workers can share: SQLite serves one process."""
    if config.search.workers > 1 and is_sqlite(config.storage_url):
        raise StorageError(
            f"search.workers={config.search.workers} needs a study the workers can share, and "
            f"{redact_url(config.storage_url)} is SQLite, which serves one process: put the study in "
            "PostgreSQL (search.storage=postgresql://...) or set search.workers=1"
        )


def run_worker_processes(config: Config, processes: int) -> list[int]:
    """``processes`` workers on this machine sharing one PostgreSQL study: several trials at once
    on one GPU. Returns their exit codes."""
    if processes > 1 and is_sqlite(config.storage_url):
        raise StorageError(
            f"{processes} worker processes cannot share {redact_url(config.storage_url)}: SQLite serves one worker. "
            "Put the study in PostgreSQL (--storage postgresql://...) or use --processes 1."
        )
    context = multiprocessing.get_context("spawn")
    # All register before any starts a trial, so the first trials already share the cores.
    ready = context.Barrier(processes)
    workers = [context.Process(target=_worker_process, args=(config, ready)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [worker.exitcode for worker in workers]


def _worker_process(config: Config, ready) -> None:
    """One of run_worker_processes' workers; run_worker's registration is this same one."""
    with cores.CoreShare():
        # A sibling that failed to start breaks the barrier; shares are recounted each trial.
        with suppress(threading.BrokenBarrierError):
            ready.wait(timeout=120)
        run_worker(config)
