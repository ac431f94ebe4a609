"""The stores' URLs: shown without their password, SQLite files found as SQLAlchemy finds them,
and faster commits for the SQLite files stylepipe writes (the default Optuna and MLflow stores).

A trial commits to its stores a few dozen times (ask, user attributes, reports, the MLflow
run, tell). In SQLite's default rollback-journal mode each commit waits for the disk
(fsync), about 1 ms: tens of ms a trial, a measurable share of a short GPU trial. In
write-ahead-log mode with ``synchronous=NORMAL`` a commit does not wait for the disk; the
database stays consistent after a crash of the process (a power cut may lose the last
commits). WAL also lets optuna-dashboard and ``mlflow ui`` read while a study writes.

Only files registered here are changed: the hook is SQLAlchemy's documented ``connect``
event on every engine, filtered by the database's path; register a file before its first
connection. WAL needs shared memory: keep these files on a local disk, not a network one.
"""

from __future__ import annotations

import os
import sqlite3
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

_FILES: set[str] = set()


def redact_url(url: str) -> str:
    """The URL with its password masked as ``***``, for messages, logs and tags."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: hide all of the user part, if any
        scheme, sep, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}" if sep and "@" in rest else url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_path(url: str) -> str | None:
    """The database file behind a SQLite URL, as SQLAlchemy reads it (None for other URLs
    and in-memory databases)."""
    if not is_sqlite(url):
        return None
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):  # sqlite:///file:/path?uri=true, a SQLite URI filename
        uri = urlsplit(database)
        modes = parse_qs(uri.query).get("mode", []) + [str(parsed.query.get("mode", ""))]
        if not uri.path or "memory" in modes:
            return None
        database = uri.path
    return os.path.realpath(database)


def use_write_ahead_log(url: str) -> None:
    """Open every later connection to this SQLite URL in WAL mode with ``synchronous=NORMAL``."""
    path = sqlite_path(url)
    if path is None:
        return
    _FILES.add(path)
    if not event.contains(Engine, "connect", _on_connect):
        event.listen(Engine, "connect", _on_connect)


def _on_connect(dbapi_connection, connection_record) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    databases = dbapi_connection.execute("PRAGMA database_list").fetchall()
    main = next((file for _, name, file in databases if name == "main"), "")
    if not main or os.path.realpath(main) not in _FILES:
        return
    try:
        mode = dbapi_connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.OperationalError:  # another process holds it in rollback mode: keep that
        return
    # SQLite may keep the old mode without an error; NORMAL is only safe in WAL mode.
    if str(mode).lower() == "wal":
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")
