"""Worker processes on one machine: each its own process (and CUDA context), counted among the
machine's workers so that they share its cores (cores.py)."""

from __future__ import annotations

import multiprocessing
import threading
from contextlib import suppress

from stylepipe.config import Config
from stylepipe.ops import cores
from stylepipe.search.storage import StudyStore


def run_worker(config: Config, progress: bool = False, finish: bool = True) -> dict:
    """``chain.work_on_study``, counted among this machine's workers: each trial takes its share of
    the cores, and the one that finishes the study takes the cores the others gave back."""
    from stylepipe import chain  # the stages' modules, imported when a worker runs

    with cores.CoreShare():
        return chain.work_on_study(config, progress=progress, cores=cores.MACHINE, finish=finish)


def check_fan_out(config: Config) -> None:
    """``search.workers`` > 1 needs a study the workers can share: SQLite serves one process."""
    StudyStore.of(config.storage_url).refuse_many(
        config.search.workers, f"search.workers={config.search.workers}", "set search.workers=1"
    )


def run_worker_processes(config: Config, processes: int) -> list[int]:
    """``processes`` workers on this machine sharing one PostgreSQL study: several trials at once
    on one GPU. Returns their exit codes."""
    StudyStore.of(config.storage_url).refuse_many(
        processes, f"--processes {processes}", "use --processes 1", "--storage postgresql://..."
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
