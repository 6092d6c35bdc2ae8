"""Starting Ray and sizing requests so that nothing starves on a small machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from dragons.errors import DragonsError
from dragons.raycluster import DATA_CPU_SHARE, Resources, size_workers


def test_size_workers_leaves_cpus_for_ray_data():
    n, cpu, gpu = size_workers(0, Resources(cpus=2.0, gpus=0))
    assert (n, gpu) == (2, False)
    # Two workers at 1 CPU each would starve the read tasks (the 30-minute hang).
    assert n * cpu <= 2.0 * (1 - DATA_CPU_SHARE) + 1e-9
    n, cpu, gpu = size_workers(0, Resources(cpus=16.0, gpus=4))
    assert (n, gpu) == (4, True) and cpu * n <= 16.0


def test_size_workers_rejects_what_does_not_fit():
    with pytest.raises(DragonsError, match="--workers 2 or fewer"):
        size_workers(3, Resources(cpus=2.0, gpus=0))
    with pytest.raises(DragonsError, match="more GPUs"):
        size_workers(5, Resources(cpus=32.0, gpus=4))


def test_embedded_ray_ignores_a_stale_cluster_address():
    """A crashed run leaves ray_current_cluster behind; ray.init() would try to join it."""
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        os.mkdir(os.path.join(tmp, "ray"))
        address_file = os.path.join(tmp, "ray", "ray_current_cluster")
        with open(address_file, "w") as f:
            f.write("127.0.0.1:9")  # nothing listens there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tmp
        code = (
            "import ray; from dragons.raycluster import ensure_ray; ensure_ray(30); "
            "print('SESSION', ray._private.worker._global_node.get_session_dir_path()); ray.shutdown()"
        )
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # It started a cluster of its own (its session lives under RAY_TMPDIR),
        # rather than joining the stale address or another live cluster.
        session = proc.stdout.split("SESSION", 1)[1].strip()
        assert session.startswith(os.path.join(tmp, "ray", "session_")), session
        # And the dead address is gone, so Ray's helpers in worker processes
        # (which resolve "auto" through that file) no longer time out on it.
        assert not os.path.exists(address_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Ray 2.58's C++ gRPC servers (GCS, raylet, object manager, core workers, the
# driver) and the dashboard agent's gRPC/metrics listeners bind every interface
# ('::' / 0.0.0.0); Ray offers no option to bind them to loopback (ray.init maps
# 127.0.0.1 to the node IP). They all sit behind token auth, checked below.
WILDCARD_OK = ("gcs_server", "raylet", "ray::", "python", "DashboardAgent")


def _ray_listeners() -> list[tuple[str, int, str, str]]:
    import psutil

    me = psutil.Process()
    pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
    out = []
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            p = psutil.Process(c.pid)
            out.append((c.laddr.ip, c.laddr.port, p.name(), " ".join(p.cmdline())))
    return out


def test_embedded_cluster_uses_token_auth_and_no_dashboard(ray_session: None, tmp_path) -> None:
    """The embedded cluster serves no dashboard (no HTTP API; ~0.7 GB and ten
    processes saved) and its GCS refuses a client without the token."""
    import stat

    import psutil
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert os.environ["RAY_AUTH_MODE"] == "token" and get_authentication_mode() == AuthenticationMode.TOKEN
    token_file = os.environ["RAY_AUTH_TOKEN_PATH"]
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert len(open(token_file).read().strip()) >= 32

    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    # Without the dashboard Ray still runs its head process, headless: no HTTP
    # server (jobs, state API), only its Prometheus exporter (DASHBOARD_METRIC_PORT,
    # read-only metrics, bound to the node IP's interfaces: docs/operations.md),
    # and none of the ten module processes.
    assert os.environ.get("DRAGONS_DASHBOARD", "") != "1"
    modules = [
        " ".join(p.info["cmdline"] or [])[:120]
        for p in psutil.process_iter(["cmdline"])
        if "dashboard/modules" in " ".join(p.info["cmdline"] or [])
        or "ray-dashboard-" in (p.info["cmdline"] or [""])[0]
    ]
    assert modules == [], modules
    listeners = _ray_listeners()
    assert listeners, "no Ray listeners found: is the session's cluster running?"
    ports = [port for ip, port, name, cmd in listeners if "dashboard/dashboard.py" in cmd]
    # One exporter port: Ray's default, unless another Ray on this machine holds that one.
    taken = {
        c.laddr.port
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN
        and c.laddr.port == DASHBOARD_METRIC_PORT
        and c.pid not in {p.pid for p in psutil.Process().children(recursive=True)}
    }
    assert len(ports) == 1 and (ports[0] == DASHBOARD_METRIC_PORT or DASHBOARD_METRIC_PORT in taken), listeners
    for ip, port, name, cmd in listeners:
        if ip in ("0.0.0.0", "::"):
            assert any(k in name or k in cmd for k in WILDCARD_OK), (ip, port, name, cmd[:200])

    # A client without the token is refused by the GCS.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    gcs = ray.get_runtime_context().gcs_address
    code = f"import ray; ray.init(address={gcs!r}); print('CONNECTED')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CONNECTED" not in proc.stdout
    assert "Authentication" in proc.stderr or "InvalidAuthToken" in proc.stderr, proc.stderr[-2000:]


def test_embedded_training_starts_no_cluster_only_actors(ray_session: None) -> None:
    """On the embedded cluster (one node that ends with the driver) Ray Train runs
    without its preemption watcher and placement-group cleaner: two actor
    processes (~0.1 GB each) that only matter on a long-lived cluster; and
    without its DatasetManager actor when the workers decode their own rows."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dragons.raycluster import embedded
    from dragons.raycompat import lean_trainer

    assert embedded()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # read by Ray Train's controller

    def callbacks(workers_decode: bool) -> list[str]:
        # What dragons.train.run._trainer leaves out on the embedded cluster.
        unused = {"PlacementGroupCleanerCallback"} | ({"DatasetsCallback"} if workers_decode else set())
        trainer = lean_trainer(TorchTrainer, unused)(
            lambda: None,
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(name="callbacks-only", storage_path=tempfile.mkdtemp()),
        )
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    # Workers that decode their own rows use no Ray Data shards: no DatasetManager actor either.
    lean, ray_data = callbacks(True), callbacks(False)
    assert "BackendSetupCallback" in lean and "PlacementGroupCleanerCallback" not in lean + ray_data, (lean, ray_data)
    assert "DatasetsCallback" not in lean and "DatasetsCallback" in ray_data, (lean, ray_data)


def test_driver_stderr_noise_goes_to_the_log_and_the_rest_to_the_terminal(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's C++ core writes straight to fd 2: the known-harmless line (ray#57733) goes to
    the run's log, anything else still reaches the terminal, and so does a traceback
    raised inside the block (stderr is restored before it leaves)."""
    import logging

    from dragons.raycluster import DRIVER_NOISE, driver_stderr_to_log
    from dragons.runlog import VERBOSE_ENV, ray_output

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    ray_output.addHandler(handler)
    noise = f"[E core_worker.cc:2330] Actor with class name: 'MapWorker' {DRIVER_NOISE[0]}. See #53727\n"
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with driver_stderr_to_log():
                os.write(2, noise.encode())
                os.write(2, b"a real problem\n")
                raise RuntimeError("boom")
        os.write(2, b"after the block\n")
    finally:
        ray_output.removeHandler(handler)
    err = capfd.readouterr().err
    assert "a real problem" in err and "after the block" in err
    assert DRIVER_NOISE[0] not in err
    assert any(DRIVER_NOISE[0] in m for m in seen)


def test_the_model_processes_decode_on_cpus_and_leave_it_to_cpu_decoders_beside_gpus() -> None:
    """One vocabulary and one rule for both wings (--decode auto|model|separate): auto decodes beside
    the model without GPUs, in separate CPU decoders with them; explicit choices win."""
    from dragons.capacity import decode_beside_model

    assert decode_beside_model("auto", gpu=False) and not decode_beside_model("auto", gpu=True)
    assert decode_beside_model("model", gpu=True)  # forced: the model's processes decode on a GPU cluster too
    assert not decode_beside_model("separate", gpu=False)


# ----- asking the autoscaler for GPUs (dragons.capacity) ---------------------------
def test_actor_spans_parse_with_clear_errors():
    from dragons.capacity import Span, parse_span

    assert parse_span(0, "--actors") == Span(0, 0) and parse_span("", "--actors").auto
    assert parse_span(3, "--actors") == Span(3, 3) and parse_span("1:4", "--actors") == Span(1, 4)
    for bad in ("4:1", "0:2", "two", "1:x", "-1"):
        with pytest.raises(DragonsError, match="--actors"):
            parse_span(bad, "--actors")


def test_actor_pools_size_from_the_granted_gpus():
    from dragons.capacity import Span
    from dragons.raycluster import size_actors

    gpu = size_actors(Span(1, 4), cpus=2.0, gpus=1)  # 1 GPU up, 4 asked for: the pool grows as nodes come
    assert (gpu.lo, gpu.hi, gpu.gpu, gpu.cpu) == (1, 4, 1, 1.0)
    cpu = size_actors(Span(0, 0), cpus=2.0, gpus=0)
    assert (cpu.lo, cpu.hi, cpu.gpu) == (2, 2, 0) and cpu.hi * cpu.cpu <= 2.0 * (1 - DATA_CPU_SHARE) + 1e-9
    assert cpu.at_most(1).hi == 1 and cpu.at_most(5) == cpu


class FakeAutoscaler:
    """Stands in for the cluster: how many GPUs are up at each poll, what the autoscaler launches."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, kind: str | None, gpus: list[int], pending: int = 0, cuda: bool = True
    ) -> None:
        import ray.autoscaler.sdk

        from dragons import capacity

        self.requests: list[list[dict]] = []
        self.gpus = list(gpus)
        monkeypatch.setattr(capacity, "autoscaler_kind", lambda settle_s=0: kind)
        monkeypatch.setattr(capacity, "_gpus", lambda: self.gpus.pop(0) if len(self.gpus) > 1 else self.gpus[0])
        monkeypatch.setattr(capacity, "pending_launches", lambda k: pending)
        monkeypatch.setattr(capacity, "cuda_on_gpu_nodes", lambda: cuda)
        monkeypatch.setattr(capacity, "LAUNCH_GRACE_S", 0.3)
        monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: self.requests.append(bundles))


def test_gpu_request_waits_for_nodes_then_withdraws_the_request(monkeypatch: pytest.MonkeyPatch):
    from dragons.capacity import GpuRequest, Span

    fake = FakeAutoscaler(monkeypatch, "v1", gpus=[0, 0, 0, 1], pending=1, cuda=False)
    said: list[str] = []
    with GpuRequest(
        "scoring actor", "auto", Span(1, 2), wait_s=30, progress_s=0, say=said.append, sleep_s=0.01
    ) as grant:
        assert (grant.gpus, grant.cuda, grant.requested) == (1, False, 2)
        assert fake.requests == [[{"GPU": 1, "CPU": 1.0}] * 2]
    assert fake.requests[-1] == []  # withdrawn: the autoscaler may remove the idle nodes
    text = "\n".join(said)
    assert "requested 2 GPU node(s)" in text and "waiting for 1 GPU node(s) (0/1 up, 0 s)" in text
    assert "no CUDA device" in text and "released the request for 2 GPU node(s)" in text


def test_gpu_request_falls_back_to_cpus_or_refuses(monkeypatch: pytest.MonkeyPatch):
    from dragons.capacity import GpuRequest, Span

    # An autoscaler that launches nothing (no GPU worker group): auto runs on CPUs after the grace period...
    fake = FakeAutoscaler(monkeypatch, "v1", gpus=[0], pending=0)
    said: list[str] = []
    assert (
        GpuRequest("training worker", "auto", Span(0, 0), progress_s=60, say=said.append, sleep_s=0.01).acquire().gpus
        == 0
    )
    assert (
        fake.requests[-1] == [] and "the autoscaler launched no GPU node" in said[-1] and "running on CPUs" in said[-1]
    )
    # ...yes refuses, naming the flags that help.
    with pytest.raises(DragonsError, match="--use-gpu yes: .*--gpu-wait"):
        GpuRequest("training worker", "yes", Span(0, 0), say=said.append, sleep_s=0.01).acquire()
    # A node that is launching but never comes: bounded by --gpu-wait.
    FakeAutoscaler(monkeypatch, "v1", gpus=[0], pending=1)
    grant = GpuRequest("scoring actor", "auto", Span(2, 2), wait_s=0.2, say=said.append, sleep_s=0.01).acquire()
    assert grant.gpus == 0 and "only 0 of 2 GPU node(s) came" in said[-1]
    # No autoscaler: GPUs the cluster has are used, none means CPUs (as before) or a clear refusal.
    FakeAutoscaler(monkeypatch, None, gpus=[2])
    assert GpuRequest("scoring actor", "auto", Span(0, 0), say=said.append).acquire().gpus == 2
    FakeAutoscaler(monkeypatch, None, gpus=[0])
    assert GpuRequest("scoring actor", "auto", Span(0, 0), say=said.append).acquire().gpus == 0
    assert GpuRequest("scoring actor", "no", Span(0, 0), say=said.append).acquire().gpus == 0
    with pytest.raises(DragonsError, match="no GPU and no autoscaler"):
        GpuRequest("scoring actor", "yes", Span(0, 0), say=said.append).acquire()


def test_a_head_without_autoscaler_is_not_mistaken_for_one(ray_session: None):
    """Every Ray head runs a monitor; without an autoscaling config it only mirrors
    the nodes (types named node_<id>) and must not make a job wait for GPU nodes."""
    import time

    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    from dragons.capacity import autoscaler_kind, mirrors_only

    node = "node_" + "ab" * 28
    assert mirrors_only({"active_nodes": {node: 1}, "node_type_mapping": {"ab" * 28: node}})
    assert not mirrors_only({"active_nodes": {"ray.head.default": 1}, "pending_launches": {"gpu": 1}})
    assert not mirrors_only({"active_nodes": {"headgroup": 1}})  # KubeRay: the groups' names
    deadline = time.time() + 30  # the session's embedded head: its monitor reports every few seconds
    while _internal_kv_get("__autoscaling_status") is None and time.time() < deadline:
        time.sleep(1)
    assert ray.is_initialized() and autoscaler_kind() is None
