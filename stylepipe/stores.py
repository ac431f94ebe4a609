"""The stores' URLs: shown without their password (and masked in every dump of the settings:
``StoreUrl``), SQLite files found as SQLAlchemy finds them, and faster commits for the SQLite files stylepipe writes (the default Optuna and MLflow stores).

A trial commits to its stores a few dozen times (ask, user attributes, reports, the MLflow
run, tell). In SQLite's default rollback-journal mode each commit waits for the disk
(fsync): tens of commits a trial, a share of a short GPU trial. In
write-ahead-log mode with ``synchronous=NORMAL`` a commit does not wait for the disk; the
database stays consistent after a crash of the process (a power cut may lose the last
commits). WAL also lets optuna-dashboard and ``mlflow ui`` read while a study writes.

Only files registered here are changed: the hook is SQLAlchemy's documented ``connect``
event on every engine, filtered by the database's path; register a file before its first
connection. WAL needs shared memory: keep these files on a local disk, not a network one.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from typing import Annotated
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pydantic import AfterValidator, PlainSerializer, SerializationInfo
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

_FILES: set[str] = set()


def _userinfo(url: str) -> tuple[str, str, str, str] | None:
    """``(scheme://, user, password, @host...)`` of a URL whose user part holds a password.

    A password may hold any character, ``@ / # ?`` included, so the user part is taken to
    end at the *last* ``@`` (URL parsers, SQLAlchemy's and libpq's too, stop at the first and
    show the rest of such a password as the host: ``url_secrets`` lists those pieces too).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return None
    userinfo, _, host = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return (f"{scheme}://", user, password, f"@{host}") if colon and password else None


_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:password|passwd|pwd)=)([^&#]*)")


def redact_url(url: str) -> str:
    """The URL with its password masked as ``***`` (in the user part and in a ``password=``
    query parameter), for messages, logs, tags and files."""
    parts = _userinfo(url)
    if parts is not None:
        url = f"{parts[0]}{parts[1]}:***{parts[3]}"
    return _QUERY_PASSWORD.sub(r"\1***", url)


# A password's pieces between URL delimiters, as a parser that stops at the first one shows them
# elsewhere: libpq reads postgres:HxA@B9931@host as the password HxA on the host B9931@host.
_DELIMITER = re.compile(r"[@/?#]")
_MIN_FRAGMENT = 3  # shorter pieces give little away, and masking them would garble the message


def _fragments(secret: str) -> set[str]:
    """``secret`` and each run of its pieces between delimiters (``@ / ? #``) of at least
    ``_MIN_FRAGMENT`` characters."""
    cuts = [m.start() for m in _DELIMITER.finditer(secret)]
    starts = [0, *(cut + 1 for cut in cuts)]
    ends = [*cuts, len(secret)]
    runs = {secret[start:end] for start in starts for end in ends if end - start >= _MIN_FRAGMENT}
    return {secret} | runs


def url_secrets(url: str) -> list[str]:
    """The passwords a URL carries, as written and percent-decoded, with their pieces as a
    parser may show them (``_fragments``): longest first, for ``scrub``."""
    found = [m.group(2) for m in _QUERY_PASSWORD.finditer(url) if m.group(2)]
    parts = _userinfo(url)
    if parts is not None:
        found.append(parts[2])
    forms = {form for secret in found for form in (secret, unquote(secret)) if form}
    return sorted({piece for form in forms for piece in _fragments(form)}, key=len, reverse=True)


def scrub(text: str, *urls: str | None) -> str:
    """``text`` (an error message, say) with every password of these URLs replaced by ``***``."""
    for url in urls:
        for secret in url_secrets(url or ""):
            text = text.replace(secret, "***")
    return text


def is_masked(url: str) -> bool:
    """Whether the URL's password was masked by ``redact_url`` (it cannot be used as it is)."""
    parts = _userinfo(url)
    return parts is not None and parts[2] == "***"


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


def probe(url: str) -> None:
    """Fail fast, in one plain line (``ValueError``), when the database behind a store URL
    cannot be used: a corrupted SQLite file, a folder that cannot hold one, an unknown
    database or server. MLflow would otherwise retry for about 100 s before it says so."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from stylepipe.errors import StylepipeError
    from stylepipe.files import writable_folder

    path = sqlite_path(url)
    if path is not None:
        if not os.path.exists(path):
            try:
                writable_folder(os.path.dirname(path), "folder of the SQLite file")
            except StylepipeError as err:
                raise ValueError(str(err)) from None
            return
        try:
            with contextlib.closing(sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)) as db:
                db.execute("PRAGMA schema_version").fetchone()
        except sqlite3.DatabaseError as err:
            raise ValueError(
                f"the SQLite file {path} is corrupted ({err}): move it away to start afresh, "
                "or restore it from a backup"
            ) from None
        return
    if url.startswith(("http://", "https://")):
        _probe_server(url)
        return
    if "://" not in url or url.startswith(("file:", "sqlite")):
        return  # nothing we can open
    try:
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as err:  # an unknown dialect, an unreachable server, a missing database
        raise ValueError(first_line(err, url)) from None


def first_line(err: BaseException, *urls: str | None) -> str:
    """An error in one line for a person: the first line of what the driver (or MLflow) said,
    or the error's kind when it said nothing, with every password of ``urls`` masked (they may
    quote the URL)."""
    cause = getattr(err, "orig", None) or err
    text = str(cause).strip()
    return scrub(text.splitlines()[0], *urls) if text else type(cause).__name__


def open_store(url: str, refusal: str, error: type[Exception]) -> None:
    """Before a store is used: one plain line (``error``: ``refusal`` URL: why) when it cannot be,
    not a traceback after ~100 s of retries; then SQLite's write-ahead log for the files we own."""
    try:
        probe(url)
    except ValueError as err:
        raise error(f"{refusal} {redact_url(url)}: {err}") from None
    use_write_ahead_log(url)


def _probe_server(url: str, timeout: float = 10.0) -> None:
    """An MLflow server answers at all (any HTTP status: with basic auth, 401 is an answer).
    MLflow's client would retry a dead address for about two minutes before saying so."""
    problem = http_problem(f"{url.rstrip('/')}/health", timeout, any_status=True)
    if problem:
        raise ValueError(f"the server does not answer ({problem})")


def http_problem(url: str, timeout: float = 10.0, any_status: bool = False) -> str:
    """What stops ``url`` from answering a GET with HTTP 200 (with ``any_status``, with any
    HTTP status at all), without the URL's password; empty when it answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return "" if response.status == 200 or any_status else f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return "" if any_status else f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return scrub(str(getattr(err, "reason", err)), url) or type(err).__name__


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


# ------------------------------------------------------------------ store URLs in the settings

# Where a store URL's password may come from instead of the settings (the settings, as
# written to any file, parameter or log, show it masked).
SECRET_ENV = {"search.storage": "STYLEPIPE_SEARCH_STORAGE", "tracking.uri": "STYLEPIPE_TRACKING_URI"}


def _show_masked(url: str, info: SerializationInfo) -> str:
    """Every dump of the settings masks a store URL's password, unless asked in memory to keep it."""
    return url if (info.context or {}).get("reveal_secrets") else redact_url(url)


def _unmask_from_environment(key: str):
    def unmask(url: str) -> str:
        """A URL whose password was masked by a dump gets it back from the environment."""
        if "://" not in url:
            raise ValueError("expected a URL such as postgresql://user@host/db or http://host:5000")
        if not is_masked(url):
            return url
        full = os.environ.get(SECRET_ENV[key], "")
        if full and redact_url(full) == url:
            return full
        raise ValueError(
            f"the password in {url} is masked (***); give the full URL by the environment "
            f"({SECRET_ENV[key]}), or leave the password out of the URL and give it as PostgreSQL "
            "and MLflow read it (PGPASSWORD or ~/.pgpass; MLFLOW_TRACKING_PASSWORD)"
        )

    return unmask


def StoreUrl(key: str):  # noqa: N802  (a type)
    """A database or server URL that may carry a password: masked in every serialisation."""
    return Annotated[
        str, AfterValidator(_unmask_from_environment(key)), PlainSerializer(_show_masked, when_used="always")
    ]
