"""The stack's service processes (stack.py): each started in its own process group with its
log, health-checked over HTTP, told apart from another process that got its pid, and stopped
by its group, gently first."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from stylepipe.errors import StylepipeError
from stylepipe.stores import http_problem

STARTUP_SECONDS = 180.0  # a Prefect server migrating a fresh database on a busy small machine


class StackError(StylepipeError):
    """A part of the stack did not start (the message names it and its log)."""


# The services this process started, by pid: how one that ended, ended (exit code or signal).
_STARTED: dict[int, subprocess.Popen] = {}


@dataclass
class Service:
    name: str
    pid: int
    command: list[str]
    log: str
    url: str = ""


def program(name: str) -> str:
    """A console script of this environment (mlflow, prefect, optuna-dashboard)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise StackError(f"{name} is not installed in {path.parent}; run make install")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(folder: str, name: str, command: list[str], env: dict[str, str], url: str = "") -> Service:
    """Start ``command`` in ``folder``, in a process group of its own, its output appended to
    ``folder/logs/<name>.log``."""
    logs = Path(folder) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("ab") as handle:
        process = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=folder,
            start_new_session=True,
        )
    _STARTED[process.pid] = process
    return Service(name, process.pid, command, str(log), url)


def wait_healthy(service: Service, probe_url: str, timeout: float = STARTUP_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(service):
            raise StackError(
                f"{service.name} exited while starting ({how_it_ended(service)}); its log: {service.log}\n"
                f"{_tail(service.log)}"
            )
        if not http_problem(probe_url, timeout=5):
            return
        time.sleep(1)
    raise StackError(
        f"{service.name} did not answer {probe_url} within {timeout:.0f} s; its log: {service.log}"
    )


def how_it_ended(service: Service) -> str:
    process = _STARTED.get(service.pid)
    if process is None:
        return "its exit status is unknown: another process started it"
    try:
        code = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return "it still runs"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def port_free(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(log: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def is_running(service: Service) -> bool:
    """The pid is alive and still runs the command it was started with (pids get reused). For
    a child of this process, its own exit status says: reading /proc/PID/cmdline can come back
    empty for a process that runs (a restarted MLflow server was once taken for dead)."""
    child = _STARTED.get(service.pid)
    if child is not None:
        return child.poll() is None
    try:
        cmdline = Path(f"/proc/{service.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    names = (service.command[0].encode(), Path(service.command[0]).name.encode())
    return any(name in part for part in cmdline for name in names)


def stop(services: list[Service], timeout: float) -> list[str]:
    """Stop each service's process group (SIGTERM, SIGKILL after ``timeout``); the names of
    those that were running."""
    stopped = []
    for service in services:
        if not is_running(service):
            continue
        try:
            os.killpg(service.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        stopped.append(service.name)
    deadline = time.monotonic() + timeout
    for service in services:
        while is_running(service) and time.monotonic() < deadline:
            time.sleep(0.2)
        if is_running(service):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pid, signal.SIGKILL)
    return stopped
