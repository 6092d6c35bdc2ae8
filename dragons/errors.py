"""The one exception type the CLI turns into a clean, traceback-free message, and
the check for an optional extra that a command needs."""

from __future__ import annotations

import importlib.util


class DragonsError(Exception):
    """A user-facing error: bad input, missing data, a wrong flag.

    The message must name the input and say what to do; the CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """


def require_plotting(what: str) -> None:
    """matplotlib is the optional ``report`` extra (cluster nodes do without it)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise DragonsError(f"{what} needs matplotlib, which is not installed: pip install 'dragons[report]'")
