"""Optuna storage for one or many workers: heartbeats, stale-trial retries, locks.

* RDB storage (SQLite file, or PostgreSQL for many workers) with heartbeats: a trial
  whose worker died is failed by the next worker that looks, its MLflow run is ended as
  KILLED, and the trial is re-queued (``RetryHeartbeatStaleTrialCallback``).
* ``StudyLock``: a PostgreSQL advisory lock (released by the server if its holder dies),
  so that counting trials and starting one is atomic across workers, and the
  safest-configuration step runs once per study.
* SQLite serves one worker: a second one is refused with a clear message.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from stylepipe.config import Config
from stylepipe.errors import StylepipeError
from stylepipe.files import try_lock, writable_folder
from stylepipe.stores import (
    first_line,
    is_sqlite,
    open_store,
    redact_url,
    sqlite_path,
)
from stylepipe.tracking import end_killed_run


class StorageError(StylepipeError):
    """The study storage cannot be used; the message names the URL without its password."""


class EndKilledRunThenRetry:
    """Heartbeat-stale callback: end the dead worker's MLflow run as KILLED, then re-queue."""

    def __init__(self, tracking_uri: str, max_retry: int):
        self.tracking_uri = tracking_uri
        with warnings.catch_warnings():  # experimental in name only: stable since optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            end_killed_run(self.tracking_uri, run_id, "worker stopped sending heartbeats (killed or lost)")
        self.retry(study, _with_room_for_its_params(trial))


def _with_room_for_its_params(trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """The trial, with each numeric distribution that does not hold its value replaced by a
    one-point one. The baseline (the config's own settings) may lie outside the search space;
    Optuna stores it anyway, but refuses to re-create it, so its retry would crash the worker."""
    distributions = dict(trial.distributions)
    for name, dist in distributions.items():
        value = trial.params[name]
        if isinstance(dist, (FloatDistribution, IntDistribution)) and not dist._contains(value):
            distributions[name] = type(dist)(low=value, high=value, log=dist.log)
    if distributions == trial.distributions:
        return trial
    room = copy.copy(trial)
    room.distributions = distributions
    return room


def open_storage(config: Config) -> RDBStorage:
    url = config.storage_url
    search = config.search
    open_store(url, "cannot open the Optuna storage", StorageError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=search.heartbeat_interval,
                grace_period=search.grace_period,
                heartbeat_stale_trial_callback=EndKilledRunThenRetry(config.tracking_uri, search.max_retry),
                engine_kwargs={"pool_pre_ping": True} if url.startswith("postgresql") else None,
            )
    except Exception as err:  # unknown dialect, unreachable server, bad credentials, ...
        raise StorageError(
            f"cannot open the Optuna storage {redact_url(url)}: {first_line(err, url)}"
        ) from None


class SqliteWorkerLock:
    """An exclusive file lock beside a SQLite database, held by the one process that works on
    its studies, from before it touches a study to the end of the command: trials, confirm,
    final model and registration. Another process is refused before it reads or writes
    anything. Re-entrant within a process (stages nest)."""

    _held: dict[str, list] = {}  # lock file -> [open file, depth], for this process

    def __init__(self, url: str):
        self.url = url
        path = sqlite_path(url)
        self.lock_path = None if path is None else str(Path(path).with_name(Path(path).name + ".worker.lock"))

    def __enter__(self) -> SqliteWorkerLock:
        if self.lock_path is None:
            return self
        if self.lock_path in self._held:
            self._held[self.lock_path][1] += 1
            return self
        where = f"cannot open the Optuna storage {redact_url(self.url)}"
        try:  # a file where its folder should be, a read-only disk, ...
            writable_folder(Path(self.lock_path).parent, "folder of the SQLite file")
            handle = open(self.lock_path, "a")  # noqa: SIM115  (held until __exit__; "a": its time stays)
        except StylepipeError as err:
            raise StorageError(f"{where}: {err}") from None
        except OSError as err:  # the lock file itself: a folder of that name, ...
            raise StorageError(
                f"{where}: cannot write its lock file {self.lock_path}: {err.strerror or err}"
            ) from None
        if not try_lock(handle):
            raise StorageError(
                f"another stylepipe process is working on {redact_url(self.url)}. SQLite serves one "
                "worker; for several, put the study in PostgreSQL (search.storage=postgresql://...)."
            )
        self._held[self.lock_path] = [handle, 1]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock_path is None or self.lock_path not in self._held:
            return
        held = self._held[self.lock_path]
        held[1] -= 1
        if held[1] == 0:
            fcntl.flock(held[0], fcntl.LOCK_UN)
            held[0].close()
            del self._held[self.lock_path]


class StudyLock:
    """A named lock shared by every worker of a study (no-op on SQLite: one worker)."""

    def __init__(self, config: Config, name: str):
        self.url = config.storage_url
        digest = hashlib.sha256(f"stylepipe:{config.study_name}:{name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self._engine: Any = None
        self._connection: Any = None

    def acquire(self) -> None:
        if is_sqlite(self.url):
            return
        import sqlalchemy

        try:
            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            self._connection = self._engine.connect()
        except Exception as err:  # unknown dialect, unreachable server, bad credentials, ...
            raise StorageError(
                f"cannot open the Optuna storage {redact_url(self.url)}: {first_line(err, self.url)}"
            ) from None
        self._connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})

    def release(self) -> None:
        if self._connection is None:
            return
        import sqlalchemy

        try:
            self._connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        finally:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
