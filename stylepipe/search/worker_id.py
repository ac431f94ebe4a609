"""Which worker ran a trial or a replay: several machines and processes may share one study."""

from __future__ import annotations

import os
import socket


def worker_id() -> str:
    """This machine and process, as a trial's run and a replay unit record it."""
    return f"{socket.gethostname()}:{os.getpid()}"
