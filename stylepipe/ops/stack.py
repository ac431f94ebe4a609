"""A production-shaped stack on loopback, for a person to try and for the topology tests.

``stylepipe stack up`` (``make stack``) starts, each bound to 127.0.0.1 on a free port:

* PostgreSQL databases ``<prefix>_optuna``, ``<prefix>_mlflow`` and ``<prefix>_prefect`` on
  the machine's server (created when missing);
* ``mlflow server`` on ``<prefix>_mlflow``, serving artifacts itself (``--serve-artifacts``)
  from a local folder that stands in for object storage: clients never touch that folder;
* ``prefect server start`` on ``<prefix>_prefect``;
* a process work pool and one ``prefect worker`` polling it;
* ``optuna-dashboard`` on the Optuna database.

Each is its own process group, health-checked before the next step, and recorded (pid and
command) in ``<folder>/stack.json``; ``stylepipe stack down`` stops exactly those processes,
after checking that each pid still runs the command it started. ``<folder>/stack.env``
holds the variables that point stylepipe, MLflow and Prefect at the stack.

Only the servers' command-line programs are run here; nothing imports MLflow or Prefect.
Starting, health-checking and stopping one service's processes: services.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stylepipe.files import write_json, write_text
from stylepipe.ops.services import (
    Service,
    StackError,
    free_port,
    how_it_ended,
    is_running,
    launch,
    port_free,
    program,
    stop,
    wait_healthy,
)
from stylepipe.stores import first_line, redact_url

ADMIN_ENV = "STYLEPIPE_STACK_POSTGRES"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
POOL = "stylepipe"


@dataclass
class Stack:
    folder: str
    optuna_url: str
    mlflow_db_url: str
    prefect_db_url: str
    tracking_uri: str = ""
    prefect_api_url: str = ""
    dashboard_url: str = ""
    pool: str = POOL
    services: list[Service] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """What points a shell (stylepipe, MLflow's and Prefect's clients) at this stack."""
        return {
            "STYLEPIPE_SEARCH_STORAGE": self.optuna_url,
            "STYLEPIPE_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "PREFECT_API_URL": self.prefect_api_url,
        }

    def ui_lines(self) -> list[str]:
        return [
            f"MLflow UI:        {self.tracking_uri}",
            f"Prefect UI:       {self.prefect_api_url.removesuffix('/api')}",
            f"optuna-dashboard: {self.dashboard_url}",
            f"Optuna storage:   {redact_url(self.optuna_url)}",
            f"work pool:        {self.pool} (one process worker)",
        ]


def database_url(admin_url: str, name: str, driver: str = "") -> str:
    """``admin_url`` with another database (and, for Prefect's async engine, a driver)."""
    from sqlalchemy.engine import make_url

    url = make_url(admin_url).set(database=name)
    if driver:
        url = url.set(drivername=f"postgresql+{driver}")
    return url.render_as_string(hide_password=False)


def create_databases(admin_url: str, names: list[str]) -> None:
    """Create the databases that do not exist yet (PostgreSQL cannot do it in a transaction)."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            have = {row[0] for row in conn.execute(sqlalchemy.text("select datname from pg_database"))}
            for name in names:
                if name not in have:
                    conn.execute(sqlalchemy.text(f'create database "{name}"'))
        engine.dispose()
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise StackError(
            f"cannot create the stack's databases on {redact_url(admin_url)}: {first_line(err, admin_url)}"
        ) from None


def start_service(stack: Stack, name: str, command: list[str], env: dict[str, str], url: str = "") -> Service:
    service = launch(stack.folder, name, command, env, url)
    stack.services.append(service)
    save(stack)  # recorded at once: a failed start is still stopped by `down`
    return service


def save(stack: Stack) -> None:
    # The admin URL's password (if any) never reaches this file: the database URLs are
    # written masked and rebuilt from the environment by whoever needs them.
    record = asdict(stack)
    for key in ("optuna_url", "mlflow_db_url", "prefect_db_url"):
        record[key] = redact_url(record[key])
    for service in record["services"]:
        service["command"] = [redact_url(part) for part in service["command"]]
    write_json(Path(stack.folder) / "stack.json", record)


def load(folder: str | Path) -> Stack:
    path = Path(folder) / "stack.json"
    if not path.is_file():
        raise StackError(f"no stack is recorded in {path}; start one with `stylepipe stack up`")
    try:
        return _parse(json.loads(path.read_bytes()))
    except (OSError, ValueError) as err:  # unreadable, not JSON (or not UTF-8), or not a stack's shape
        raise StackError(
            f"{path} is not a stack record stylepipe wrote ({err}): if no stack processes run from it, "
            "remove it"
        ) from None


def _parse(record: object) -> Stack:
    """A ``Stack`` from the JSON of stack.json, its every field checked: pids from it get signals."""

    def text(value: object, what: str, empty: bool = True) -> str:
        if not isinstance(value, str) or not (empty or value):
            raise ValueError(f"{what} is not {'a' if empty else 'a non-empty'} string")
        return value

    if not isinstance(record, dict):
        raise ValueError(f"it holds a {type(record).__name__}, not an object")
    required = ("folder", "optuna_url", "mlflow_db_url", "prefect_db_url")
    missing = [key for key in (*required, "services") if key not in record]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    if not isinstance(record["services"], list):
        raise ValueError("services is not a list")
    services = []
    for i, s in enumerate(record["services"]):
        where = f"services[{i}]"
        if not isinstance(s, dict) or not {"name", "pid", "command", "log"} <= s.keys():
            raise ValueError(f"{where} is not an object with a name, pid, command and log")
        pid = s["pid"]
        if type(pid) is not int or pid <= 1:  # pid 0 is our own group, 1 is init
            raise ValueError(f"{where}.pid is not a process id")
        command = s["command"]
        if not isinstance(command, list) or not command:
            raise ValueError(f"{where}.command is not a list of strings")
        services.append(
            Service(
                text(s["name"], f"{where}.name", empty=False),
                pid,
                [text(part, f"{where}.command", empty=False) for part in command],
                text(s["log"], f"{where}.log"),
                text(s.get("url", ""), f"{where}.url"),
            )
        )
    fields = {key: text(record[key], key) for key in required}
    for key in ("tracking_uri", "prefect_api_url", "dashboard_url", "pool"):
        if key in record:
            fields[key] = text(record[key], key)
    return Stack(**fields, services=services)


def up(
    folder: str | Path,
    admin_url: str | None = None,
    prefix: str = "stylepipe",
    pool: str = POOL,
    dashboard: bool = True,
) -> Stack:
    """Start the stack in ``folder`` (logs, the artifact store, Prefect's home) and return it."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "stack.json").is_file() and any(is_running(s) for s in load(folder).services):
        raise StackError(f"a stack already runs from {folder}; stop it first: stylepipe stack down")
    admin_url = admin_url or os.environ.get(ADMIN_ENV) or DEFAULT_ADMIN_URL
    names = [f"{prefix}_optuna", f"{prefix}_mlflow", f"{prefix}_prefect"]
    create_databases(admin_url, names)
    stack = Stack(
        folder=str(folder),
        optuna_url=database_url(admin_url, names[0]),
        mlflow_db_url=database_url(admin_url, names[1]),
        prefect_db_url=database_url(admin_url, names[2], driver="asyncpg"),
        pool=pool,
    )
    try:
        _start_services(stack, dashboard)
    except BaseException:
        down(folder)
        raise
    write_text(folder / "stack.env", "".join(f"export {k}={redact_url(v)}\n" for k, v in stack.env().items()))
    return stack


# Where each service says it is up (relative to its URL).
HEALTH = {"mlflow": "/health", "prefect-server": "/health", "optuna-dashboard": "/api/studies"}


def _service_env(stack: Stack, name: str) -> dict[str, str]:
    """The environment a service starts with, the first time and on a restart."""
    prefect = {
        "PREFECT_HOME": str(Path(stack.folder) / "prefect-home"),
        "PREFECT_API_URL": stack.prefect_api_url,
    }
    if name == "mlflow":  # no job runner: its 7 processes serve GenAI features only
        # The database URL by the environment, not the command line: `ps` shows no password.
        return {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_BACKEND_STORE_URI": stack.mlflow_db_url,
        }
    if name == "prefect-server":
        return {
            **prefect,
            "PREFECT_API_DATABASE_CONNECTION_URL": stack.prefect_db_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
    if name == "prefect-worker":
        # The worker's flow runs inherit its environment: this one points them at the stack,
        # and makes them send heartbeats (crash_zombie_flow_runs marks a silent one crashed).
        return {**prefect, **stack.env(), **WORKER_ENV}
    return {}


def _start(stack: Stack, name: str, command: list[str], url: str = "") -> Service:
    """``start_service`` with the environment the service starts with."""
    return start_service(stack, name, command, _service_env(stack, name), url)


def _on_loopback(port: int) -> list[str]:
    """A server's arguments to listen on 127.0.0.1 at ``port``."""
    return ["--host", "127.0.0.1", "--port", str(port)]


def _start_services(stack: Stack, dashboard: bool) -> None:
    folder = Path(stack.folder)
    mlflow_port, prefect_port = free_port(), free_port()
    stack.tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    stack.prefect_api_url = f"http://127.0.0.1:{prefect_port}/api"
    # Both servers migrate their databases on first start: start them together.
    artifacts = ["--serve-artifacts", "--artifacts-destination", str(folder / "artifact-store")]
    mlflow = [program("mlflow"), "server", *artifacts, *_on_loopback(mlflow_port), "--workers", "1"]
    started = [_start(stack, "mlflow", mlflow, stack.tracking_uri)]
    prefect_server = [program("prefect"), "server", "start", *_on_loopback(prefect_port)]
    started.append(_start(stack, "prefect-server", prefect_server, stack.prefect_api_url))
    if dashboard:
        import optuna

        optuna.storages.RDBStorage(stack.optuna_url)  # its tables: the dashboard only reads
        port = free_port()
        stack.dashboard_url = f"http://127.0.0.1:{port}"
        optuna_dashboard = [program("optuna-dashboard"), stack.optuna_url, *_on_loopback(port)]
        started.append(_start(stack, "optuna-dashboard", optuna_dashboard, stack.dashboard_url))
    for service in started:
        wait_healthy(service, service.url + HEALTH[service.name])
    subprocess.run(
        [program("prefect"), "work-pool", "create", stack.pool, "--type", "process", "--overwrite"],
        env={**os.environ, **_service_env(stack, "prefect-server")},
        check=True,
        capture_output=True,
        timeout=120,
    )
    crash_zombie_flow_runs(stack.prefect_api_url)
    _start(stack, "prefect-worker", [program("prefect"), "worker", "start", "--pool", stack.pool])
    save(stack)


def restart(
    folder: str | Path, name: str, timeout: float = 20.0, attempts: int = 3, admin_url: str | None = None
) -> Service:
    """Stop one service of the stack and start it again, same command and port (an upgrade,
    a crash and its supervisor's restart). Like a supervisor, it waits for the old process to
    let go of the port, and starts again a new one that exits while starting, up to
    ``attempts`` times, saying so on stderr."""
    stack = load(folder)
    old = next(s for s in stack.services if s.name == name)
    stop([old], timeout)
    stack.services.remove(old)
    deadline = time.monotonic() + timeout
    while old.url and not port_free(old.url) and time.monotonic() < deadline:
        time.sleep(0.2)
    admin_url = admin_url or os.environ.get(ADMIN_ENV) or DEFAULT_ADMIN_URL
    for key in ("optuna_url", "mlflow_db_url", "prefect_db_url"):
        setattr(stack, key, _with_password(getattr(stack, key), admin_url))
    command = [_with_password(part, admin_url) for part in old.command]
    for attempt in range(1, attempts + 1):
        new = _start(stack, name, command, old.url)
        if name not in HEALTH:
            return new
        try:
            wait_healthy(new, new.url + HEALTH[name])
        except StackError:
            if is_running(new) or attempt == attempts:  # it runs but does not answer, or out of tries
                raise
            print(
                f"{name} exited while starting ({how_it_ended(new)}); starting it again "
                f"({attempt + 1}/{attempts}), its log: {new.log}",
                file=sys.stderr,
            )
            stack.services.remove(new)
            continue
        return new
    raise StackError(f"{name} was not started: attempts={attempts}")


def _with_password(part: str, admin_url: str) -> str:
    """A database URL of a recorded command (masked in stack.json) with the admin URL's password."""
    if ":***@" not in part:
        return part
    from sqlalchemy.engine import make_url

    masked, admin = make_url(part), make_url(admin_url)
    return masked.set(password=admin.password).render_as_string(hide_password=False)


HEARTBEAT_SECONDS = 30  # Prefect's floor
WORKER_ENV = {
    "PREFECT_WORKER_QUERY_SECONDS": "5",
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
}


def crash_zombie_flow_runs(api_url: str) -> None:
    """Prefect's recipe for flow runs whose machine died: a run that sent heartbeats and then
    goes silent for three of them is marked CRASHED (else it shows RUNNING forever). Retrying
    it then resumes its study (see flows/pipeline.py). Created once per server."""
    import urllib.request

    automation = {
        "name": "stylepipe: crash zombie flow runs",
        "description": "a flow run that stopped sending heartbeats (its worker or machine died)",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["prefect.flow-run.heartbeat"],
            "expect": [
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            ],
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": 3 * HEARTBEAT_SECONDS,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "message": f"no heartbeat for {3 * HEARTBEAT_SECONDS} s: its worker or machine stopped",
            }
        ],
    }

    def call(path: str, body: dict) -> object:
        request = urllib.request.Request(
            f"{api_url}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    existing = call("/automations/filter", {})
    if not any(a["name"] == automation["name"] for a in existing):
        call("/automations/", automation)


def down(folder: str | Path, timeout: float = 10.0) -> list[str]:
    """Stop the stack's processes (each group by its recorded pid); the names of those stopped."""
    stopped = stop(list(reversed(load(folder).services)), timeout)  # the worker first, the servers last
    Path(folder, "stack.json").unlink(missing_ok=True)
    return stopped
