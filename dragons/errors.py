"""The one exception type the CLI turns into a clean, traceback-free message."""

from __future__ import annotations


class DragonsError(Exception):
    """A user-facing error: bad input, missing data, a wrong flag.

    The message must name the input and say what to do; the CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """
