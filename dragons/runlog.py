"""A run's log, the same for training and scoring: what a run says, and its progress.

Every line a run has for a person goes through :func:`say` (the ``dragons``
logger): to the terminal, on stderr (stdout carries results only: a dry run's
listing, query rows, evaluation metrics), and while :func:`run_log` is open to
the run's log file too, each line with its UTC time. Two kinds of line go to the
file only: details (``say(..., detail=True)``: what an operator may want but a
person watching need not read) and Ray's own worker lines (the ``dragons.ray``
logger, fed by dragons.raycluster); ``--verbose`` (``DRAGONS_VERBOSE=1``) shows
both on the terminal as well.

Long steps (decode check, precompute, epochs, scoring) print :class:`Progress`
lines, from one process only: the driver, or rank 0 of the training workers,
whose lines Ray forwards to the driver's log (:func:`worker_mode`)::

    precompute  1,216/3,443 images  35%  142.1 images/s  elapsed 0:08  ETA 0:15
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("dragons")
# Ray's own worker lines (worker-group set-up, Ray Data notices): the log file only.
ray_output = logging.getLogger("dragons.ray")
VERBOSE_ENV = "DRAGONS_VERBOSE"  # "1" (or --verbose): details and Ray's lines on the terminal too
DEFAULT_EVERY_S = 15.0  # seconds between two progress lines of one step; the last line always prints


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") == "1"


class _Terminal(logging.StreamHandler):
    """The terminal's share of the log: stderr (stdout in a Ray worker), no details, no Ray lines."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.to_stdout = False

    def emit(self, record: logging.LogRecord) -> None:
        # The stream is looked up per line: pytest and callers may swap sys.stderr
        # (and close the one before: no setStream, which flushes it).
        self.stream = sys.stdout if self.to_stdout else sys.stderr
        super().emit(record)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(ray_output.name):
            return False  # with --verbose dragons.raycluster prints them the way Ray does
        return verbose() or not getattr(record, "detail", False)


_terminal = _Terminal()
log.addHandler(_terminal)
log.setLevel(logging.INFO)
log.propagate = False  # the application's root logger (Ray's, pytest's) shows nothing twice


def worker_mode() -> None:
    """In a Ray worker: say() writes to stdout, which Ray forwards to the driver's run log."""
    _terminal.to_stdout = True


def say(message: str, detail: bool = False) -> None:
    """One line of the run's log; ``detail``: in the file, on the terminal only with --verbose."""
    log.info(message, extra={"detail": True} if detail else None)


@contextlib.contextmanager
def run_log(path: str) -> Iterator[str]:
    """While inside, everything the run says also goes to ``path`` (appended), with times."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")
    fmt.converter = time.gmtime
    handler.setFormatter(fmt)
    log.addHandler(handler)
    try:
        yield path
    finally:
        log.removeHandler(handler)
        handler.close()


def clock(seconds: float) -> str:
    m, s = divmod(int(max(0.0, seconds) + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts the items of a step and says a line every ``every_s`` seconds.

    ``total``: the step's size, or None while unknown (scoring while the listing
    goes on; :meth:`update` can give it later). ``scale`` turns a worker's own
    count into the whole step's (the shards are equal to a row, so rank 0's
    count x world is the total's). ``enabled=False``: count, say nothing (the
    other ranks).
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        enabled: bool = True,
        every_s: float = DEFAULT_EVERY_S,
        scale: int = 1,
        unit: str = "images",
    ) -> None:
        self.what, self.enabled, self.every_s = what, enabled, every_s
        self.total = None if total is None else max(0, int(total))
        self.scale, self.unit = max(1, scale), unit
        self.done = 0
        self.note = ""
        self.t0 = self.last = time.perf_counter()

    def due(self) -> bool:
        """Whether the next update will say a line (callers skip costly notes otherwise)."""
        return time.perf_counter() - self.last >= self.every_s

    def update(self, n: int, total: int | None = None, note: str | None = None) -> None:
        """``n`` more items; ``total``: the step's size once known; ``note``: appended to the line."""
        self.done += int(n)
        if total is not None:
            self.total = max(0, int(total))
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s and (self.total is None or self.count < self.total):
            self.last = now
            say(self.line(now))

    @property
    def count(self) -> int:
        n = self.done * self.scale
        return n if self.total is None else min(self.total, n)

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = now - self.t0
        rate = self.count / elapsed if elapsed > 0 else 0.0
        note = f"  ({self.note})" if self.note else ""
        if self.total is None:
            return f"{self.what}  {self.count:,} {self.unit}  {rate:.1f} {self.unit}/s  elapsed {clock(elapsed)}{note}"
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        pct = 100.0 * self.count / self.total if self.total else 100.0
        return (
            f"{self.what}  {self.count:,}/{self.total:,} {self.unit}  {pct:3.0f}%  {rate:.1f} {self.unit}/s  "
            f"elapsed {clock(elapsed)}  ETA {clock(eta)}{note}"
        )

    def finish(self, total: int | None = None, note: str | None = None) -> float:
        """Say the closing line (the rate over the whole step); returns the elapsed seconds."""
        if total is not None:
            self.total = max(0, int(total))
        if note is not None:
            self.note = note
        if self.total is not None:
            self.done = max(self.done, -(-self.total // self.scale))
        now = time.perf_counter()
        if self.enabled:
            say(self.line(now).replace("  ETA 0:00", "  done"))
        return now - self.t0
