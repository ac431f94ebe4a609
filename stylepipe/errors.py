"""The one base class of the errors stylepipe raises for a user's mistake or an unusable input.

The CLI catches ``StylepipeError`` and prints its message as one line with exit status 2;
anything else is a bug and keeps its traceback.
"""


class StylepipeError(Exception):
    """Bad settings, input or storage; the message says what is wrong and what to do."""


def failure_text(err: BaseException) -> str:
    """What stopped a run, in one line: ``OSError: disk full``, or ``interrupted`` for Ctrl-C."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGINT)"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
