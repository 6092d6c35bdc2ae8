"""Asking the cluster for the GPUs a job needs, and waiting for them, bounded.

A nightly GPU cluster idles at zero GPU nodes: GPUs are paid for only while a
job runs. A snapshot of ``ray.cluster_resources()`` on such a cluster shows no
GPU, so a job sized from it would run on the head's CPUs and never ask the
autoscaler for anything. Here a job says what it needs (``--use-gpu``, a count
or ``MIN:MAX``), asks the autoscaler for that many GPU bundles
(``ray.autoscaler.sdk.request_resources``), waits for at least MIN of them with
a progress line, and gives the request back when it ends, so the autoscaler
can remove the nodes after its idle timeout. The actor pool (or Ray Train's
worker group) then asks for its GPUs like any Ray task and uses the nodes as
they arrive.

Without an autoscaler nothing is requested: GPUs the cluster has are used, and
a cluster without any runs on CPUs (``--use-gpu yes`` refuses instead).

Ray keeps a resource request until another call replaces it, so the request is
withdrawn on every way out, the wait included: the end of the ``with`` block,
any exception, and a stop signal (dragons.signals turns SIGTERM, SIGINT and
SIGHUP into an exception). Withdrawing is idempotent, bounded in time and
shielded from a second signal.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from dragons import raycompat, runlog, signals
from dragons.errors import DragonsError

log = logging.getLogger("dragons")

# --use-gpu; the first is the default.
USE_GPU_CHOICES = ["auto", "yes", "no"]
# How long a job waits for its first GPU nodes before it gives up (auto: runs on
# CPUs; yes: fails). Cloud GPU node pools take minutes to start a node.
GPU_WAIT_S = 600.0
# An autoscaler that has launched nothing this long after a request will launch
# nothing: no worker group has GPUs, or they are all at their maximum.
LAUNCH_GRACE_S = 60.0
# The longest a withdrawal of the request may take: a GCS that does not answer
# must not keep a stopping job from exiting (a `ray job stop` SIGKILLs it soon).
WITHDRAW_TIMEOUT_S = 10.0
# Where images are decoded (--decode, training and scoring alike); the first is the default:
# auto = beside the model on CPU clusters, separate beside GPUs; model = in the
# processes that run the model (training workers, scoring actors); separate = in
# Ray Data decode tasks or actors ahead of them.
DECODE_CHOICES = ["auto", "model", "separate"]


def check_flags(use_gpu: str, gpu_wait_s: float, decode: str = DECODE_CHOICES[0]) -> None:
    """The GPU and decode settings training and scoring share, checked the same way for both."""
    if use_gpu not in USE_GPU_CHOICES:
        raise DragonsError(f"--use-gpu {use_gpu!r} is not one of: {', '.join(USE_GPU_CHOICES)}")
    if gpu_wait_s < 0:
        raise DragonsError(f"--gpu-wait must be >= 0 (seconds), got {gpu_wait_s:g}")
    if decode not in DECODE_CHOICES:
        raise DragonsError(f"--decode {decode!r} is not one of: {', '.join(DECODE_CHOICES)}")


def decode_beside_model(choice: str, gpu: bool) -> bool:
    """Whether the processes that run the model also decode its images. On CPUs a
    separate decode stage only adds processes (their imports and memory) and
    copies through the object store on the same cores; beside a GPU, separate
    CPU decoders keep the GPU fed."""
    return choice == "model" or (choice == "auto" and not gpu)


# CPUs that go with each GPU (a scoring actor, a training worker): the rest of
# a GPU node's CPUs decode its images.
CPUS_PER_GPU = 1.0


@dataclass(frozen=True)
class Span:
    """How many GPU processes a job wants: at least ``lo``, at most ``hi``; (0, 0) = decide."""

    lo: int
    hi: int

    @property
    def auto(self) -> bool:
        return self.hi == 0


def parse_span(value: int | str, flag: str) -> Span:
    """``0`` (auto), ``N`` or ``MIN:MAX``, from a flag; a clear error otherwise."""
    text = str(value).strip()
    try:
        if ":" in text:
            lo_s, hi_s = text.split(":", 1)
            lo, hi = int(lo_s), int(hi_s)
        else:
            lo = hi = int(text or 0)
    except ValueError:
        raise DragonsError(f"{flag} {text!r} is not a count: give N, or MIN:MAX (e.g. 1:4), or 0 for auto") from None
    if ":" in text and not 1 <= lo <= hi:
        raise DragonsError(f"{flag} {text!r}: MIN:MAX needs 1 <= MIN <= MAX (e.g. 1:4)")
    if lo < 0:
        raise DragonsError(f"{flag} {text!r}: give a count >= 1, MIN:MAX, or 0 for auto")
    return Span(lo, hi)


@dataclass(frozen=True)
class Grant:
    """What a job got: ``gpus`` GPU processes at most (0 = run on CPUs)."""

    gpus: int
    cuda: bool = True  # whether the GPU nodes have CUDA: a fake or broken GPU node runs the model on its CPU
    requested: int = 0  # GPU bundles asked of the autoscaler (0 = none asked)
    waited_s: float = 0.0


def autoscaler_kind(settle_s: float = 15.0) -> str | None:
    """ "v1" or "v2" when the cluster has an autoscaler (KubeRay's, the cluster launcher's), else None.

    A v1 monitor's first reports may name no node yet: read again, up to ``settle_s``.
    """
    if raycompat.is_autoscaler_v2():
        return "v2"
    deadline = time.monotonic() + settle_s
    while True:
        report = _v1_report()
        if report is None:
            return None
        if node_types(report):
            return None if mirrors_only(report) else "v1"
        if time.monotonic() >= deadline:
            return None  # a monitor that never names a node launches none
        time.sleep(1.0)


def _v1_report() -> dict | None:
    """The v1 monitor's autoscaler report (rewritten every few seconds), or None
    without one, or when it is minutes old (a monitor that died)."""
    import ray

    if not ray.is_initialized():
        return None
    status = raycompat.autoscaler_v1_status()
    if not status or time.time() - float(status.get("time", 0)) > 300:
        return None
    return dict(status.get("autoscaler_report") or {})


# The node types Ray's read-only monitor reports: one per node, named after its id.
# Every head without an autoscaling config (``ray.init()``, a plain ``ray start
# --head``) runs that monitor: it mirrors the nodes there are and launches none.
_READONLY_TYPE = re.compile(r"node_[0-9a-f]{56}")


def node_types(report: dict) -> set[str]:
    """The node types a v1 report names (active, or being launched)."""
    return (
        set(report.get("active_nodes") or {})
        | set((report.get("node_type_mapping") or {}).values())
        | set(report.get("pending_launches") or {})
    )


def mirrors_only(report: dict) -> bool:
    """Whether a v1 report comes from the read-only monitor (see ``_READONLY_TYPE``)."""
    types = node_types(report)
    return bool(types) and all(_READONLY_TYPE.fullmatch(t) for t in types)


def pending_launches(kind: str | None) -> int:
    """Nodes the autoscaler is launching or waiting for now."""

    try:
        if kind == "v2":
            return raycompat.autoscaler_v2_pending()
        if kind == "v1":
            report = (raycompat.autoscaler_v1_status() or {}).get("autoscaler_report") or {}
            return sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])
    except Exception:  # noqa: BLE001 (no answer is "unknown": keep waiting, bounded)
        return 1
    return 0


def _gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cuda_on_gpu_nodes(timeout_s: float = 180.0) -> bool:
    """Whether a process given one of the cluster's GPUs sees a CUDA device (one short task)."""
    import ray

    @ray.remote(num_cpus=0, num_gpus=1, max_retries=1)
    def probe() -> bool:
        import torch

        return bool(torch.cuda.is_available())

    try:
        return bool(ray.get(probe.remote(), timeout=timeout_s))
    except Exception:  # noqa: BLE001 (a node that cannot even answer: the job will see)
        return True


class GpuRequest:
    """``with GpuRequest(...) as grant:`` asks for GPUs, waits, and gives the request back at the end.

    ``role`` names what holds a GPU ("scoring actor", "training worker");
    ``use_gpu`` is auto | yes | no; ``want`` the span of GPU processes; ``say``
    prints a line for the person watching (and the run's log); ``local``: the
    cluster is this process's own (nothing to ask, no monitor to read).
    """

    def __init__(
        self,
        role: str,
        use_gpu: str,
        want: Span,
        wait_s: float = GPU_WAIT_S,
        progress_s: float = 10.0,
        say: Callable[[str], None] = runlog.say,
        sleep_s: float = 1.0,
        local: bool = False,
    ) -> None:
        check_flags(use_gpu, wait_s)
        self.role, self.use_gpu, self.want = role, use_gpu, want
        self.wait_s, self.progress_s, self.say, self.sleep_s = wait_s, progress_s, say, sleep_s
        self.local = local  # the process's own embedded Ray (dragons.raycluster.embedded): no autoscaler to ask
        self.requested = 0
        self._forget: Callable[[], None] | None = None  # unregisters the withdrawal from dragons.signals

    def __enter__(self) -> Grant:
        # ray.init (run before this) replaced our SIGTERM handler with its own sys.exit.
        signals.rearm()
        try:
            return self.acquire()
        except BaseException:
            # A stop signal, Ctrl-C or an error during the wait: __exit__ will not run.
            self.release()
            raise

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> Grant:
        if self.use_gpu == "no":
            return Grant(0)
        have = _gpus()
        lo = self.want.lo or 1
        kind = None if self.local else autoscaler_kind()  # this process's own one-node Ray never scales
        if kind is None:
            if have:
                return Grant(min(have, self.want.hi) if self.want.hi else have, cuda=self._cuda())
            if self.use_gpu == "yes":
                raise DragonsError(
                    "--use-gpu yes: the cluster has no GPU and no autoscaler to add one; run on a "
                    "cluster with GPU nodes (or an autoscaling GPU worker group), or use --use-gpu auto"
                )
            return Grant(0)
        # Ask for the most the job can use; wait for the least it can start with.
        hi = self.want.hi or max(lo, have)
        if have >= hi:
            return Grant(hi, cuda=self._cuda())
        self._request(hi)
        t0 = time.monotonic()
        last = t0 - self.progress_s  # the first line at once: a person sees why nothing moves yet
        launching_seen = False
        while True:
            have = _gpus()
            waited = time.monotonic() - t0
            if have >= lo:
                self.say(
                    f"{have} GPU node(s) up after {waited:.0f} s; starting with {min(have, hi)} {self.role}(s), "
                    f"up to {hi} as nodes arrive"
                )
                return Grant(min(have, hi), cuda=self._cuda(), requested=hi, waited_s=waited)
            pending = pending_launches(kind)
            launching_seen = launching_seen or pending > 0
            gave_up = waited >= self.wait_s
            nothing = not launching_seen and not pending and waited >= LAUNCH_GRACE_S
            if gave_up or nothing:
                return self._without(
                    have,
                    lo,
                    waited,
                    "the autoscaler launched no GPU node (no worker group has GPUs, or all are at their maximum)"
                    if nothing
                    else f"only {have} of {lo} GPU node(s) came in {waited:.0f} s (--gpu-wait)",
                )
            if time.monotonic() - last >= self.progress_s:
                last = time.monotonic()
                self.say(f"waiting for {lo} GPU node(s) ({have}/{lo} up, {waited:.0f} s)")
            time.sleep(self.sleep_s)

    def _request(self, n: int) -> None:
        from ray.autoscaler.sdk import request_resources

        # Recorded first: a stop that lands inside the call still withdraws (withdrawing
        # a request that never reached the cluster is harmless).
        self.requested = n
        if self._forget is None:
            # A stop signal withdraws at once, in its handler: the unwinding (Ray Data
            # shutting its pool down) can outlast the SIGKILL that follows a SIGTERM.
            self._forget = signals.on_stop(self._withdraw_on_stop)
        request_resources(bundles=[{"GPU": 1, "CPU": CPUS_PER_GPU} for _ in range(n)])
        self.say(
            f"requested {n} GPU node(s) from the autoscaler ({n} {self.role}(s), 1 GPU and {CPUS_PER_GPU:g} CPU each)"
        )

    def _without(self, have: int, lo: int, waited: float, why: str) -> Grant:
        self.release(quiet=True)
        if self.use_gpu == "yes":
            raise DragonsError(
                f"--use-gpu yes: {why}; nothing was run. Check the GPU worker group (its "
                "maxReplicas, the node pool's quota), or raise --gpu-wait"
            )
        self.say(f"warning: {why}; running on CPUs (--use-gpu yes would fail instead)")
        return Grant(0, waited_s=waited)

    def _cuda(self) -> bool:
        ok = cuda_on_gpu_nodes()
        if not ok:
            self.say(
                f"warning: the cluster's GPU nodes have a GPU resource but no CUDA device; each {self.role} "
                "runs its model on its node's CPU"
            )
        return ok

    def release(self, quiet: bool = False) -> None:
        """Withdraw the request: the autoscaler may remove the nodes once they idle.

        Idempotent (a second call does nothing), at most ``WITHDRAW_TIMEOUT_S``, and
        not cut short by a stop signal (one that arrives meanwhile is raised after)."""
        with signals.shielded():  # all of it: what was withdrawn is recorded before a held stop is raised
            self._release(quiet)

    def _release(self, quiet: bool) -> None:
        if not self.requested:
            self._unhook()
            return
        hung, error = _withdraw(WITHDRAW_TIMEOUT_S)
        if error and not hung:
            log.warning("could not withdraw the GPU request: %s", error)  # the cluster is gone: so is the request
            return
        if hung:
            # Left as it is, a later release (the same run's) tries again.
            self.say(
                f"warning: could not withdraw the request for {self.requested} GPU node(s) ({error}); the "
                'autoscaler keeps them until a new request replaces it: run `python -c "import ray; from '
                'ray.autoscaler.sdk import request_resources; ray.init(); request_resources(bundles=[])"` '
                "on the cluster"
            )
            return
        n, self.requested = self.requested, 0
        self._unhook()
        if not quiet:
            self.say(f"released the request for {n} GPU node(s): the autoscaler removes them once they idle")

    def _withdraw_on_stop(self) -> None:
        """In the stop signal's handler: withdraw at once, quietly (the handler interrupted
        the main thread anywhere, a print or a log line included). ``requested`` stays:
        release withdraws once more on the way out, after the unwinding, because Ray
        Data's executor may send its own request (through its AutoscalingCoordinator
        actor, which writes the same key) until its shutdown cancels it."""
        if self.requested:
            _withdraw(WITHDRAW_TIMEOUT_S)

    def _unhook(self) -> None:
        if self._forget is not None:
            self._forget()
            self._forget = None


def _withdraw(timeout_s: float) -> tuple[bool, str]:
    """Replace this cluster's resource request with an empty one: (hung, error), both
    empty when done; hung when the cluster did not answer in ``timeout_s``.

    In a daemon thread, waited for at most ``timeout_s``: a GCS that hangs must not
    hang a job that is stopping."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (reported by the caller, in its thread)
            outcome.append(exc)

    t = threading.Thread(target=run, name="dragons-withdraw-gpu-request", daemon=True)
    t.start()
    t.join(timeout_s)
    if not outcome:
        return True, f"no answer from the cluster in {timeout_s:g} s"
    exc = outcome[0]
    return False, "" if exc is None else f"{type(exc).__name__}: {exc}"[:300]


def span_from_count(n: int) -> Span:
    """A fixed count as a span (0 = auto)."""
    return Span(n, n) if n > 0 else Span(0, 0)
