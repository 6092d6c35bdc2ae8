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
    modules = [" ".join(p.info["cmdline"] or [])[:120] for p in psutil.process_iter(["cmdline"])
               if "dashboard/modules" in " ".join(p.info["cmdline"] or []) or "ray-dashboard-" in (p.info["cmdline"] or [""])[0]]
    assert modules == [], modules
    listeners = _ray_listeners()
    assert listeners, "no Ray listeners found: is the session's cluster running?"
    assert [port for ip, port, name, cmd in listeners if "dashboard/dashboard.py" in cmd] == [DASHBOARD_METRIC_PORT], listeners
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

    from dragons.raycluster import embedded
    from dragons.train.run import _trainer_class

    assert embedded()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # read by Ray Train's controller

    def callbacks(workers_decode: bool) -> list[str]:
        trainer = _trainer_class(workers_decode)(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                                                 run_config=RunConfig(name="callbacks-only", storage_path=tempfile.mkdtemp()))
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    # Workers that decode their own rows use no Ray Data shards: no DatasetManager actor either.
    lean, ray_data = callbacks(True), callbacks(False)
    assert "BackendSetupCallback" in lean and "PlacementGroupCleanerCallback" not in lean + ray_data, (lean, ray_data)
    assert "DatasetsCallback" not in lean and "DatasetsCallback" in ray_data, (lean, ray_data)


def test_driver_stderr_noise_goes_to_the_log_and_the_rest_to_the_terminal(capfd: pytest.CaptureFixture[str],
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's C++ core writes straight to fd 2: the known-harmless line (ray#57733) goes to
    the run's log, anything else still reaches the terminal, and so does a traceback
    raised inside the block (stderr is restored before it leaves)."""
    import logging

    from dragons.raycluster import DRIVER_NOISE, VERBOSE_ENV, driver_stderr_to_log, ray_output

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
    """One rule for train (workers|ray-data) and score (actors|tasks): auto decodes beside
    the model without GPUs, in separate CPU decoders with them; explicit choices win."""
    from dragons.raycluster import decode_beside_model

    assert decode_beside_model("auto", "workers", gpu=False) and not decode_beside_model("auto", "workers", gpu=True)
    assert decode_beside_model("actors", "actors", gpu=True)  # forced: the scoring actors decode on a GPU cluster too
    assert not decode_beside_model("tasks", "actors", gpu=False) and not decode_beside_model("ray-data", "workers", gpu=False)
