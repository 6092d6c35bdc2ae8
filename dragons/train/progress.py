"""Progress lines for long steps: decode, precompute, every epoch.

One line per update, printed by one process only (the driver, or rank 0 of the
workers: Ray forwards worker output to the driver, whose stdout is teed into
the run's log), never one per worker:

    precompute  1,216/3,443 images  35%  142.1 images/s  elapsed 0:08  ETA 0:15
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, TextIO

# Seconds between two progress lines of one step; the last line always prints.
DEFAULT_EVERY_S = 15.0


def _clock(seconds: float) -> str:
    m, s = divmod(int(max(0.0, seconds) + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts items of a step of known size and prints a line every ``every_s``.

    ``scale`` turns a worker's own count into the whole step's (the shards are
    equal to a row, so rank 0's count x world is the total's).
    """

    def __init__(self, what: str, total: int, enabled: bool = True, every_s: float = DEFAULT_EVERY_S,
                 scale: int = 1, unit: str = "images") -> None:
        self.what, self.total, self.enabled, self.every_s = what, max(0, int(total)), enabled, every_s
        self.scale, self.unit = max(1, scale), unit
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s and self.count < self.total:
            self.last = now
            print(self.line(now), flush=True)

    @property
    def count(self) -> int:
        return min(self.total, self.done * self.scale)

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = now - self.t0
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        pct = 100.0 * self.count / self.total if self.total else 100.0
        return (f"{self.what}  {self.count:,}/{self.total:,} {self.unit}  {pct:3.0f}%  {rate:.1f} {self.unit}/s  "
                f"elapsed {_clock(elapsed)}  ETA {_clock(eta)}")

    def finish(self) -> float:
        """Print the closing line (rate over the whole step); returns the elapsed seconds."""
        self.done = max(self.done, -(-self.total // self.scale))
        now = time.perf_counter()
        if self.enabled:
            print(self.line(now).replace("  ETA 0:00", "  done"), flush=True)
        return now - self.t0


class Tee:
    """A text stream that writes to the terminal and to the run's log file.

    Installed as ``sys.stdout`` for the duration of a run: Ray's driver prints
    the workers' forwarded lines through ``sys.stdout`` too, so the log gets
    them as well.
    """

    def __init__(self, stream: TextIO, log: IO[str]) -> None:
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        self.stream.write(s)
        try:
            self.log.write(s)
        except ValueError:  # the log was closed under a late Ray thread: the terminal still gets it
            pass
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        try:
            self.log.flush()
        except ValueError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def tee_stdout(log: IO[str]) -> TextIO:
    """Install a Tee on sys.stdout; returns the previous stream (restore it after)."""
    previous = sys.stdout
    sys.stdout = Tee(previous, log)  # type: ignore[assignment]
    return previous
