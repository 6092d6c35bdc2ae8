"""Why an object got an error row instead of a prediction: the kinds, and which of them last.

A row that could not be scored carries its kind twice: in ``error`` as the
``kind: message`` text people read, and alone in ``error_kind``, which SQL reads
(``--incremental``'s skip sets, the run report): nothing parses the text back.
Every producer (the decoder, storage's reads, the scorer's size check) names its
kind here, and a test checks that no kind is spelled anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# The table's column of the kind (NULL on rows without an error), and of every decoded batch.
ERROR_KIND = "error_kind"


class ErrorKind(StrEnum):
    """The kind of a row error, written to the table as its value.

    **Permanent** kinds describe the object's bytes: an unchanged object (same
    etag and size) fails the same way every time, so ``--incremental`` keeps its
    error row. **Transient** kinds describe one attempt to read it: another night
    may succeed, so ``--incremental`` scores the object again. ``--retry-errors``
    scores every error row again, whatever its kind.
    """

    EMPTY = "empty"  # zero bytes
    NOT_AN_IMAGE = "not_an_image"  # no decoder recognises the format
    TRUNCATED = "truncated"  # the image data ends early
    DECODE_ERROR = "decode_error"  # a decoder failed on the bytes (or a bug in one: the row is kept, not lost)
    TOO_LARGE = "too_large"  # over --max-bytes or --max-pixels
    NOT_FOUND = "not_found"  # listed, then gone when read (deleted or replaced in between)
    ACCESS_DENIED = "access_denied"  # the credentials may not read it now (permissions can be fixed)
    READ_ERROR = "read_error"  # the store failed: a timeout, a reset connection, an outage

    @property
    def permanent(self) -> bool:
        """Whether the object itself is bad and stays bad until it changes."""
        return self in PERMANENT


PERMANENT = frozenset(
    {ErrorKind.EMPTY, ErrorKind.NOT_AN_IMAGE, ErrorKind.TRUNCATED, ErrorKind.DECODE_ERROR, ErrorKind.TOO_LARGE}
)
TRANSIENT = frozenset(set(ErrorKind) - PERMANENT)


@dataclass(frozen=True)
class RowError:
    """One object's failure: its kind, and a message naming what went wrong."""

    kind: ErrorKind
    message: str

    def __str__(self) -> str:
        """The row's ``error`` text: ``kind: message``."""
        return f"{self.kind}: {self.message}"


# Rows written before the table had ``error_kind`` hold their kind only as the
# text before ':' in ``error``. The run report still groups them by it; this is
# the one place that reads a kind out of the text.
LEGACY_KIND_SQL = "trim(split_part(error, ':', 1))"
