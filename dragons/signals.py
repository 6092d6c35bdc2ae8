"""Stopping a run on SIGTERM, SIGINT or SIGHUP with nothing left running.

``ray job stop``, a deleted pod and an evicted driver all send SIGTERM; a person
at a terminal sends SIGINT (Ctrl-C) or, closing it, SIGHUP. Python's defaults
for SIGTERM and SIGHUP end the process at once: no ``finally`` runs, so a
``request_resources`` call (dragons.capacity.GpuRequest) stays standing, and Ray
keeps a resource request until another replaces it: a long-lived autoscaling
cluster would keep (and bill) up to MAX GPU nodes indefinitely.

This module is the one owner of those handlers. ``stop_on_signals()`` (entered
by ``dragons.cliargs.guarded``, i.e. every command and job entry point) makes
each of them raise ``Stopped(signal)`` in the main thread, so every ``finally``
and ``__exit__`` on the way out runs: the GPU request is withdrawn, the table
writer records the stop, Ray Data's executor shuts its actor pool down. Then
``finish()`` prints one ``error: stopped by SIGTERM ...`` line, shuts the Ray
driver down (the job's actors and tasks go with it) and gives the exit status
128 + signal (143 for SIGTERM, 130 for SIGINT). The previous handlers come back
when the scope ends.

``Stopped`` derives from ``KeyboardInterrupt``: code that already stops cleanly
on Ctrl-C (``dragons s3 serve``, Ray's own waits) stops the same way on SIGTERM.

What must not wait for the unwinding runs first, in the handler itself:
``on_stop(fn)`` registers it (GpuRequest registers its withdrawal). Ray Data's
executor can take seconds to shut its pool down on the way out, and
``ray job stop`` sends SIGKILL 3 s (RAY_JOB_STOP_WAIT_TIME_S) after SIGTERM: the
request must be gone before that, not after the unwinding.

``shielded()`` holds a signal back for a short, bounded step that must not be
cut in half (withdrawing the GPU request): a signal that arrives inside is
raised when the step ends, or dropped when the run is already on its way out.

``ray.init`` installs its own SIGTERM handler (``sys.exit(15)``) over ours:
``rearm()`` puts ours back; GpuRequest calls it before it asks for anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when a stop signal arrives (see the module's docstring)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {self.name}: the committed parts are kept; run the same command again to continue"


class _State:
    """What the handlers share (one per process: signal handlers are process-wide)."""

    def __init__(self) -> None:
        self.active = False  # inside stop_on_signals()
        self.saved: dict[int, Any] = {}  # the handlers to put back when the scope ends
        self.shield = 0  # depth of shielded() blocks now running
        self.held: int | None = None  # a signal that arrived inside one, raised when it ends
        self.stopping = False  # a stop signal came: the on_stop callbacks have run
        self.on_stop: list[Callable[[], None]] = []  # run by the first stop signal, newest first


_state = _State()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _state.shield:
        _state.held = _state.held or signum
        return
    if not _state.stopping:
        _state.stopping = True
        with shielded():  # a second signal must not cut a withdrawal in half; it is raised below anyway
            for fn in reversed(list(_state.on_stop)):
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 (each is retried on the way out; the stop goes on)
                    logging.getLogger("dragons").warning("on a stop signal: %s", exc)
        _state.held = None  # this very stop is raised now
    # Every signal raises, the second too: a person pressing Ctrl-C again wants
    # out of a slow cleanup step; the step that must finish is shielded.
    raise Stopped(signum)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    """A second signal while finish() shuts down: out at once, Ray's cleanup or not
    (the GPU request is already withdrawn; the cluster ends a dead driver's actors)."""
    sys.stderr.flush()
    os._exit(128 + signum)


def _main_thread() -> bool:
    # signal.signal works only there, and Python runs handlers only there.
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGTERM, SIGINT and SIGHUP raise ``Stopped``; afterwards the previous
    handlers are back. Outside the main thread, or nested, it changes nothing."""
    if _state.active or not _main_thread():
        yield
        return
    _state.saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _state.active, _state.shield, _state.held, _state.stopping, _state.on_stop = True, 0, None, False, []
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, _on_signal)
        yield
    finally:
        for signum, handler in _state.saved.items():
            # None: a handler set from C, which Python cannot put back; the default is the nearest.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _state.active, _state.saved, _state.shield, _state.held, _state.stopping = False, {}, 0, None, False
        _state.on_stop = []


def rearm() -> None:
    """Put our handlers back where a library replaced them (``ray.init`` does, for
    SIGTERM). Outside ``stop_on_signals()``, or outside the main thread, nothing."""
    if not _state.active or not _main_thread():
        return
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not _on_signal:
            signal.signal(s, _on_signal)


def on_stop(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` as soon as a stop signal arrives, before anything unwinds; returns
    the function that unregisters it. ``fn`` runs in the main thread, in the
    handler: it must be short, bounded, and must not need a lock its caller may hold."""
    _state.on_stop.append(fn)

    def forget() -> None:
        if fn in _state.on_stop:
            _state.on_stop.remove(fn)

    return forget


def active() -> bool:
    """Whether stop signals raise ``Stopped`` now."""
    return _state.active


class _Shield:
    def __enter__(self) -> None:
        _state.shield += 1

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        _state.shield -= 1
        if _state.shield or _state.held is None:
            return
        signum, _state.held = _state.held, None
        # Already on the way out (a stop, an error): that carries on. Else stop now.
        if et is None and _state.active:
            raise Stopped(signum)


def shielded() -> _Shield:
    """A block no stop signal interrupts; keep it short and bounded."""
    return _Shield()


def finish(stop: Stopped) -> int:
    """After a stop: the ``error:`` line, the Ray driver shut down, the exit status.

    The line comes first: a ``ray job stop`` sends SIGKILL a few seconds after
    SIGTERM, and a person should see why the run ended either way."""
    if _state.active and _main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _exit_now)
    print(f"error: {stop}", file=sys.stderr, flush=True)
    _shutdown_ray()
    return stop.exit_code


def _shutdown_ray() -> None:
    """Disconnect this driver: the cluster then ends its job's actors and tasks (Ray
    Data's pool, Ray Train's workers) at once, not when the process is reaped. On an
    embedded cluster it also stops that cluster, as the process's exit would."""
    ray = sys.modules.get("ray")  # a command that never imported Ray has no driver to end
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except Exception as exc:  # noqa: BLE001 (the cluster is gone already: so are the actors)
        logging.getLogger("dragons").debug("ray.shutdown after a stop: %s", exc)
