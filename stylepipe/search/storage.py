"""Where a study lives: one ``StudyStore`` chosen from the storage URL, which knows what that
kind of store can do.

* ``shared``: whether several workers may work on it (PostgreSQL: yes; a SQLite file serves
  one process, and a second one is refused with a clear message, ``SqliteWorkerLock``).
* ``lock(study, Lock.X)``: a named lock shared by every worker of a study (PostgreSQL: an
  advisory lock, released by the server if its holder dies; SQLite: none is needed), so that
  counting trials and starting one is atomic, and the publishing of its images, the edge
  test, the certificate's plan and the study's finish run once.
* ``running_is_orphaned``: whether a run or unit found RUNNING when a process starts belongs to
  one that died (SQLite: its one process is this one; PostgreSQL: heartbeats find the dead).
* ``storage()``: Optuna's RDB storage with heartbeats: a trial whose worker died is failed by
  the next worker that looks, its MLflow run ended as KILLED, and the trial re-queued (one
  whose worker died before its first heartbeat too: ``SilentClaimsGoStale``).

Another backend (Optuna's ``JournalFileBackend`` for processes on one machine without a
server, say) is one more subclass and one more line in ``StudyStore.of``.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import logging
import time
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages._rdb import models  # the tables Optuna's own stale check reads

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

log = logging.getLogger(__name__)


class StorageError(StylepipeError):
    """The study storage cannot be used; the message names the URL without its password."""


ORPHANED = "its process stopped (killed or lost) before the run ended"


class EndKilledRunThenRetry:
    """Heartbeat-stale callback: end the dead worker's MLflow run as KILLED, then re-queue."""

    def __init__(self, tracking_uri: str, max_retry: int):
        self.tracking_uri = tracking_uri
        with warnings.catch_warnings():  # experimental in name only: stable since optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        why: str = "worker stopped sending heartbeats (killed or lost)",
    ) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            from stylepipe.tracking import end_killed_run  # MLflow and torch: only when one died

            end_killed_run(self.tracking_uri, run_id, why)
        self.retry(study, _with_room_for_its_params(trial))


def fail_dead_trials(config: Config, study: optuna.Study) -> list[int]:
    """Fail the trials of ``study`` (a search's, or a companion's units) whose worker died, each
    through the storage's stale callback: its MLflow run (if it has one) ended KILLED, the trial
    queued again. On a shared store, those whose heartbeats are a grace period old, or never
    came (``SilentClaimsGoStale``). On a store one process works on (SQLite, whose worker lock
    this process holds, looking between its own trials), every one still RUNNING, at once: its
    process is gone, and waiting out the grace period would only stall the search. Returns the
    numbers of the trials failed here."""
    with warnings.catch_warnings():  # experimental in name only: stable since optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if not StudyStore.of(config.storage_url).running_is_orphaned:
            optuna.storages.fail_stale_trials(study)  # runs the callback for those it failed
            return []
    storage = study._storage
    callback = storage.get_heartbeat_stale_trial_callback() if isinstance(storage, BaseHeartbeat) else None
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
            continue
        failed.append(trial.number)
        log.info("%s trial %d: %s; it runs again", study.study_name, trial.number, ORPHANED)
        if isinstance(callback, EndKilledRunThenRetry):
            callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)), why=ORPHANED)
    return failed


class SilentClaimsGoStale(RDBStorage):
    """Optuna's RDB storage, whose stale check also finds a trial claimed by a worker that died
    before its first heartbeat. Optuna skips a RUNNING trial with no heartbeat row, and the
    first is written by a thread started after the claim: a worker killed in between left its
    trial (a search trial, a replay unit, a final trained ahead) RUNNING for ever, and its peers
    waiting for it waited for ever. Here a trial that this process has seen RUNNING without any
    heartbeat for the grace period is stale: as long as Optuna gives one whose heartbeats
    stopped. Seen, not dated: the claim's ``datetime_start`` is the claiming machine's clock,
    which need not agree with this one's."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._silent_since: dict[int, dict[int, float]] = {}  # study id -> trial id -> first seen

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        grace = self.grace_period if self.grace_period is not None else 2 * (self.heartbeat_interval or 0)
        now = time.monotonic()
        seen = self._silent_since.get(study_id, {})
        silent = {trial_id: seen.get(trial_id, now) for trial_id in self._silent_trial_ids(study_id)}
        self._silent_since[study_id] = silent
        return stale + [trial_id for trial_id, since in silent.items() if now - since > grace]

    def _silent_trial_ids(self, study_id: int) -> list[int]:
        """The study's RUNNING trials that have no heartbeat row."""
        session = self.scoped_session()
        try:
            rows = (
                session.query(models.TrialModel.trial_id)
                .outerjoin(models.TrialHeartbeatModel)
                .filter(models.TrialModel.study_id == study_id)
                .filter(models.TrialModel.state == optuna.trial.TrialState.RUNNING)
                .filter(models.TrialHeartbeatModel.trial_heartbeat_id.is_(None))
                .all()
            )
        finally:
            session.close()
        return [trial_id for (trial_id,) in rows]


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


class Lock(StrEnum):
    """The study's named locks, shared by its workers."""

    SETUP = "setup"  # one MLflow experiment, one study, one parent run
    INPUTS = "inputs"  # the study's images published once (search/inputs.py)
    ASK = "ask"  # count the finished trials and start one, atomically
    EDGE = "edge"  # the edge test, once per study
    CERTIFICATE = "certificate"  # the certificate's replays planned once
    REPLAYS = "replays"  # claim one replay unit
    FINAL_AHEAD = "final ahead"  # queue or claim the speculative final (speculative.py)
    FINISH = "finish"  # the study finished once


class NoLock:
    """A lock that nothing else can contend for."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def __enter__(self) -> NoLock:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class StudyStore:
    """A study's storage, by kind: what it can share, how it locks, what RUNNING means."""

    shared: ClassVar[bool]
    running_is_orphaned: ClassVar[bool]
    engine_kwargs: ClassVar[dict[str, Any] | None] = None

    def __init__(self, url: str):
        self.url = url

    @staticmethod
    def of(url: str) -> StudyStore:
        return SqliteStore(url) if is_sqlite(url) else ServerStore(url)

    def exists(self) -> bool:
        """Whether there may be a study to load (without creating anything)."""
        return True

    def lock(self, study_name: str, name: Lock) -> StudyLock | NoLock:
        raise NotImplementedError

    def sole_worker(self) -> SqliteWorkerLock | NoLock:
        """Held by the one process that works on a store that cannot be shared."""
        return NoLock()

    def refuse_many(
        self, workers: int, what: str, instead: str, setting: str = "search.storage=postgresql://..."
    ) -> None:
        """``workers`` > 1 on a store that cannot be shared: refused in one line."""
        if workers > 1 and not self.shared:
            raise StorageError(
                f"{what} needs a study the workers can share, and {redact_url(self.url)} is SQLite, "
                f"which serves one worker: put the study in PostgreSQL ({setting}) or {instead}"
            )

    def storage(self, config: Config) -> RDBStorage:
        search = config.search
        open_store(self.url, "cannot open the Optuna storage", StorageError)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return SilentClaimsGoStale(
                    self.url,
                    heartbeat_interval=search.heartbeat_interval,
                    grace_period=search.grace_period,
                    heartbeat_stale_trial_callback=EndKilledRunThenRetry(
                        config.tracking_uri, search.max_retry
                    ),
                    engine_kwargs=self.engine_kwargs,
                )
        except Exception as err:  # unknown dialect, unreachable server, bad credentials, ...
            raise StorageError(
                f"cannot open the Optuna storage {redact_url(self.url)}: {first_line(err, self.url)}"
            ) from None


class SqliteStore(StudyStore):
    """A SQLite file: one process works on its studies at a time, so it needs no study locks,
    and a run it finds RUNNING was left by a process that died."""

    shared = False
    running_is_orphaned = True

    def exists(self) -> bool:
        return Path(sqlite_path(self.url)).is_file()

    def lock(self, study_name: str, name: Lock) -> NoLock:
        return NoLock()

    def sole_worker(self) -> SqliteWorkerLock:
        return SqliteWorkerLock(self.url)


class ServerStore(StudyStore):
    """A database server (PostgreSQL) that many workers share: advisory locks, connections
    checked before use, dead workers found by their heartbeats."""

    shared = True
    running_is_orphaned = False
    engine_kwargs: ClassVar[dict[str, Any] | None] = {"pool_pre_ping": True}

    def lock(self, study_name: str, name: Lock) -> StudyLock:
        return StudyLock(self.url, study_name, name)


def open_storage(config: Config) -> RDBStorage:
    return StudyStore.of(config.storage_url).storage(config)


def study_lock(config: Config, name: Lock) -> StudyLock | NoLock:
    """The study's lock ``name`` in its store (a no-op where one process works on it)."""
    return StudyStore.of(config.storage_url).lock(config.study_name, name)


def sole_worker(config: Config) -> SqliteWorkerLock | NoLock:
    return StudyStore.of(config.storage_url).sole_worker()


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
    """A PostgreSQL advisory lock named after the study and the lock: shared by every worker of
    the study, released by the server if its holder dies."""

    def __init__(self, url: str, study_name: str, name: Lock):
        self.url = url
        digest = hashlib.sha256(f"stylepipe:{study_name}:{Lock(name).value}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self._engine: Any = None
        self._connection: Any = None

    def acquire(self) -> None:
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
