"""Faster commits for the SQLite files stylepipe writes (the default Optuna and MLflow stores).

A trial commits to its stores a few dozen times (ask, user attributes, reports, the MLflow
run, tell). In SQLite's default rollback-journal mode each commit waits for the disk
(fsync), about 1 ms: tens of ms a trial, a measurable share of a short GPU trial. In
write-ahead-log mode with ``synchronous=NORMAL`` a commit does not wait for the disk; the
database stays consistent after a crash of the process (a power cut may lose the last
commits). WAL also lets optuna-dashboard and ``mlflow ui`` read while a study writes.

Only files registered here are changed: the hook is SQLAlchemy's documented ``connect``
event on every engine, filtered by the database's path.
"""

from __future__ import annotations

import os
import sqlite3

from sqlalchemy import event
from sqlalchemy.engine import Engine

_FILES: set[str] = set()


def sqlite_path(url: str) -> str | None:
    """The database file behind a ``sqlite:///`` URL (None for other URLs and in-memory ones)."""
    if not url.startswith("sqlite:///") or ":memory:" in url:
        return None
    return os.path.realpath(url.removeprefix("sqlite:///").split("?", 1)[0])


def use_write_ahead_log(url: str) -> None:
    """Open every later connection to this SQLite URL in WAL mode with ``synchronous=NORMAL``."""
    path = sqlite_path(url)
    if path is None:
        return
    _FILES.add(path)
    if not event.contains(Engine, "connect", _on_connect):
        event.listen(Engine, "connect", _on_connect)


def _on_connect(dbapi_connection, connection_record) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection) or not _FILES:
        return
    databases = dbapi_connection.execute("PRAGMA database_list").fetchall()
    main = next((file for _, name, file in databases if name == "main"), "")
    if not main or os.path.realpath(main) not in _FILES:
        return
    try:
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError:  # another process holds it in rollback mode: keep that
        return
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")
