"""What a stage asks of the machine's cores, and the answer when it runs alone.

Several stylepipe processes on one machine share its cores (ops/cores.py counts them); the
library does not know how. A stage that trains or decodes takes a ``Cores``: ``ALONE`` by
default (this process uses the machine as it is), or what the commands pass in.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol


class Cores(Protocol):
    def share(self) -> int:
        """How many processes (or threads) this process may use now."""
        ...

    def set_threads(self) -> int:
        """Set torch's threads to this process's share; the count torch now uses."""
        ...

    def counted(self) -> AbstractContextManager:
        """Inside, this process counts among the machine's sharers."""
        ...


class Alone:
    """The machine is this process's: every core, torch's threads as they are."""

    def share(self) -> int:
        return os.cpu_count() or 1

    def set_threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def counted(self) -> AbstractContextManager:
        return nullcontext()


ALONE = Alone()
