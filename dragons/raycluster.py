"""Connecting to Ray and sizing resource requests from what the cluster has.

The trap this module exists for: on a 2-CPU machine, two workers or actors at
1 CPU each leave nothing for Ray Data's read/decode tasks and the job hangs
silently. Every request is sized from ``ray.cluster_resources()``, leaving a
share of the CPUs to Ray Data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import ray

from dragons import raycompat, signals
from dragons.capacity import CPUS_PER_GPU, Span
from dragons.errors import DragonsError
from dragons.runlog import ray_output, say, verbose

# Ray Train's print patch echoes every worker print twice; plain stdout is enough.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

log = logging.getLogger("dragons")

# CPUs kept free for Ray Data tasks (decode, read) when sizing workers/actors.
DATA_CPU_SHARE = 0.25


_embedded = False  # whether ensure_ray started this process's own cluster (it ends with the process)


def embedded() -> bool:
    """True when this process started its own Ray (no RAY_ADDRESS): one node that ends with it."""
    return _embedded


def ensure_ray(no_progress_timeout_s: float | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` (set for jobs by ``ray job submit``), else start an embedded local Ray."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # Only the variables we need travel to workers: never put secrets into a
        # runtime_env (it is shown in the dashboard); workers inherit the env.
        # Without RAY_ADDRESS we start our own cluster ("local"), never Ray's
        # default of joining whatever /tmp/ray/ray_current_cluster or a stray
        # gcs_server points at: a crashed earlier run leaves that file behind and
        # ray.init() then fails to connect to a dead address (RAY_ADDRESS=auto
        # joins a local `ray start`). The embedded cluster runs without Ray's
        # dashboard: ten head processes (~0.7 GB, seconds of start-up CPU) that a
        # one-command run never serves. DRAGONS_DASHBOARD=1 starts it, on
        # 127.0.0.1 only (for the state API: `ray list actors`, and debugging).
        dashboard = os.environ.get(DASHBOARD_ENV, "") == "1"
        local: dict[str, Any] = (
            {}
            if address
            else {"include_dashboard": dashboard, **({"dashboard_host": "127.0.0.1"} if dashboard else {})}
        )
        _check_token_auth()
        if not address:
            _forget_dead_cluster_address()
            # One node that ends with this process: no spot preemption to watch
            # for (Ray Train's watcher is an actor process, ~0.1 GB, polling).
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        global _embedded
        _embedded = not address
        # Workers of an embedded Ray inherit this environment as it is now: an
        # empty AWS_* variable must be gone before them too (see storage).
        from dragons.storage import drop_empty_aws_env

        drop_empty_aws_env()
        ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=True, **local)
        _route_worker_output()
        # ray.init puts its own SIGTERM handler (sys.exit) in place: ours again, so a stop
        # from here on withdraws what the run asked for and says so (dragons.signals).
        signals.rearm()
    if no_progress_timeout_s is not None:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.execution_no_progress_timeout_s = no_progress_timeout_s
        ctx.enable_progress_bars = os.environ.get("DRAGONS_PROGRESS_BARS", "1") == "1"
    # Ray Data's per-operator INFO lines drown our own progress; keep its warnings.
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


DASHBOARD_ENV = "DRAGONS_DASHBOARD"  # "1": the embedded cluster starts Ray's dashboard (loopback only)


def _route_worker_output() -> None:
    """What a person sees of the workers is what dragons says there.

    Ray forwards every worker's stdout and stderr to the driver with a coloured
    ``(RayTrainWorker pid=...)`` prefix. Our lines (progress, the epoch table,
    said by rank 0) are on stdout: they join the run's log as plain lines
    (dragons.runlog). Ray's own lines are on stderr: they go to the
    ``dragons.ray`` logger, i.e. the run's log file; ``DRAGONS_VERBOSE=1`` also
    shows them as Ray would. Ray's session logs keep everything regardless.
    """
    ray_print: Any = None

    def route(data: dict[str, Any]) -> None:
        lines = [str(line) for line in data.get("lines") or []]
        if data.get("pid") == "autoscaler":  # like Ray: its events, not its status dump every 5 s
            lines = raycompat.autoscaler_events(lines)
        if not data.get("is_err") and data.get("pid") != "autoscaler":  # the autoscaler's status dumps are Ray's too
            for line in lines:
                say(line)
            return
        if verbose() and ray_print is not None:
            ray_print(data)
        who = data.get("actor_name") or data.get("task_name") or "worker"
        for line in lines:
            ray_output.info("(%s pid=%s) %s", who, data.get("pid"), line)

    ray_print = raycompat.route_worker_output(route)


# Known-harmless lines Ray's C++ core prints on the driver's stderr, where no
# logging level reaches them. Ray Data passes refs to every pool actor it starts
# (ray-project/ray#57733); Ray keeps those refs alive for the pool's lifetime.
DRIVER_NOISE = ("has constructor arguments in the object store and max_restarts > 0",)


@contextlib.contextmanager
def driver_stderr_to_log(noise: tuple[str, ...] = DRIVER_NOISE) -> Iterator[None]:
    """While inside, lines on the driver's stderr (fd 2) that match ``noise`` go to
    the run's log (``dragons.ray``), every other line to the terminal unchanged.

    Only around a pipeline: the original stderr is back, and the pipe drained,
    before any exception leaves the block, so a traceback is never swallowed.
    ``DRAGONS_VERBOSE=1`` leaves stderr alone.
    """
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in pipe:
                line = raw.decode(errors="replace")
                if any(n in line for n in noise):
                    ray_output.info("(driver) %s", line.rstrip())
                else:
                    os.write(saved, raw)

    thread = threading.Thread(target=pump, name="dragons-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump drains and ends
        thread.join(timeout=5)
        os.close(saved)


def _check_token_auth() -> None:
    """Refuse to start or join a cluster without token auth (see dragons.rayauth).

    Ray fixes its auth mode when it is first imported; if something imported
    ray before dragons, setting the variable now would be silently ignored.
    ``RAY_AUTH_MODE=disabled``, set explicitly, is the only way to opt out.
    """
    if raycompat.token_auth_on() is not False:  # on, or a Ray that cannot say (then its own checks apply)
        return
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: this Ray cluster accepts jobs from anyone who can reach its ports")
        return

    raise DragonsError(
        "Ray token authentication is off because ray was imported before dragons; "
        "export RAY_AUTH_MODE=token (and a token: RAY_AUTH_TOKEN_PATH) or import dragons first"
    )


def _forget_dead_cluster_address() -> None:
    """Delete a ``ray_current_cluster`` file whose address no longer answers.

    Our embedded cluster never reads it, but Ray's own helpers inside worker
    processes do (Ray Train's placement-group cleaner resolves "auto" through
    it): a dead address there makes them time out and print tracebacks.
    ``ray stop`` would delete it too; a crashed run leaves it behind.
    """
    path = raycompat.address_file()
    try:
        with open(path) as f:
            host, _, port = f.read().strip().rpartition(":")
        with socket.create_connection((host, int(port)), timeout=1.0):
            return  # a live cluster: leave it alone
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        pass
    try:
        os.remove(path)
        log.info("removed stale Ray address file %s", path)
    except OSError:
        pass


def model_device(gpu: bool, cuda: bool | None = None) -> Literal["cuda", "cpu"]:
    """Where the model of a worker or scoring actor runs: ``"cuda"`` when it holds a
    GPU resource (``gpu``) on a node with CUDA, else ``"cpu"``.

    A GPU resource without CUDA (a fake GPU node, a broken driver) runs the model on
    its node's CPU instead of failing: every place that depends on the device (the
    scoring actor's threads, Ray Train's backend, a training worker's torch device)
    asks here, so they agree. ``cuda``: what the driver learnt of the GPU nodes
    (``capacity.Grant.cuda``); None = this process's own ``torch.cuda.is_available()``
    (a worker, on its node).
    """
    if not gpu:
        return "cpu"
    if cuda is None:
        import torch

        cuda = bool(torch.cuda.is_available())
    return "cuda" if cuda else "cpu"


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: int


def cluster() -> Resources:
    res = ray.cluster_resources()
    return Resources(cpus=float(res.get("CPU", 0.0)), gpus=int(res.get("GPU", 0)))


def data_tasks() -> Any:
    """The task pool of a Ray Data decode step (training's scan, scoring's decode): one task
    per whole CPU, at least 2, each asking for ``DATA_CPU_SHARE`` of one. Few tasks, each
    overlapping its reads on threads: every extra task process costs seconds of imports."""
    from ray.data import TaskPoolStrategy

    return TaskPoolStrategy(size=max(2, int(cluster().cpus)))


def size_workers(requested: int, res: Resources) -> tuple[int, float, bool]:
    """(workers, CPUs per worker, use_gpu) for Ray Train.

    GPUs: one worker per GPU, each with ``CPUS_PER_GPU`` CPUs (what a GPU node
    of an autoscaling group fits; its other CPUs decode). CPU only: as many
    workers as whole CPUs, each asking for a fraction so that ``DATA_CPU_SHARE``
    of the CPUs stay free.
    """
    if res.gpus > 0:
        n = requested or res.gpus
        if n > res.gpus:
            raise DragonsError(f"--workers {n} asks for more GPUs than the cluster has ({res.gpus})")
        return n, CPUS_PER_GPU, True
    usable = res.cpus * (1 - DATA_CPU_SHARE)
    n = requested or max(1, int(res.cpus))
    if n > max(1, int(res.cpus)):
        raise DragonsError(
            f"--workers {n} does not fit: the cluster has {res.cpus:g} CPUs and no GPU; use --workers {max(1, int(res.cpus))} or fewer"
        )
    return n, round(usable / n, 3), False


@dataclass(frozen=True)
class Pool:
    """A scoring actor pool: between ``lo`` and ``hi`` actors, each with these resources."""

    lo: int
    hi: int
    cpu: float
    gpu: int
    threads: int  # torch threads per actor

    def at_most(self, n: int) -> Pool:
        """The same pool for a run with work for only ``n`` actors."""
        n = max(1, n)
        return Pool(min(self.lo, n), min(self.hi, n), self.cpu, self.gpu, self.threads) if n < self.hi else self


def size_actors(want: Span, cpus: float, gpus: int) -> Pool:
    """The scoring pool: with ``gpus`` (granted), one actor per GPU up to ``want.hi``;
    on CPUs as many actors as whole CPUs (or ``want``), sharing 1 - DATA_CPU_SHARE of them."""
    if gpus > 0:
        hi = want.hi or gpus
        return Pool(min(want.lo or hi, gpus), hi, CPUS_PER_GPU, 1, 4)
    hi = want.hi or max(1, int(cpus))
    return Pool(want.lo or hi, hi, round(cpus * (1 - DATA_CPU_SHARE) / hi, 3), 0, max(1, int(round(cpus / hi))))
