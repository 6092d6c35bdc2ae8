"""Jobs that scale a cluster up from zero GPU nodes, and let it scale back.

One autoscaling cluster for the module (tests/fake_autoscaler.py): a 2-CPU
head and a worker type with {"CPU": 1, "GPU": 1} (a fake GPU: no CUDA here),
min 0, max 2, idle timeout 12 s. ``dragons score`` and ``dragons train`` join
it through RAY_ADDRESS, as a job on a KubeRay cluster does, find no GPU, ask
the autoscaler, wait, run on the nodes that come, and give the request back.
A job stopped by SIGTERM (``ray job stop``, a deleted pod) gives it back too,
while it waits and while it scores; the stubbed tests at the end do the same
for Ctrl-C in the wait, without a cluster.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import psutil
import pytest
from fake_autoscaler import LocalAutoscalingCluster

from dragons import signals, storage
from dragons.capacity import GpuRequest, Span

GPU_NODE = {
    "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150 * 2**20},
    "node_config": {},
    "min_workers": 0,
    "max_workers": 2,
}
IDLE_TIMEOUT_S = 12


@pytest.fixture(scope="module")
def autoscaling(s3: object, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    os.environ.setdefault("RAY_TMPDIR", "/tmp")
    cluster = LocalAutoscalingCluster(
        {"CPU": 2, "object_store_memory": 300 * 2**20},
        {"gpu": dict(GPU_NODE)},
        idle_timeout_minutes=IDLE_TIMEOUT_S / 60,
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def raylets(cluster: LocalAutoscalingCluster) -> int:
    """This cluster's nodes, head included: one raylet process each."""
    n = 0
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "raylet" and cluster.owns(p.info["cmdline"]):
            n += 1
    return n


def wait_for_raylets(cluster: LocalAutoscalingCluster, n: int, timeout: float) -> float:
    t0 = time.time()
    while raylets(cluster) != n:
        assert time.time() - t0 < timeout, f"{raylets(cluster)} nodes, not {n}, after {timeout:.0f} s"
        time.sleep(1)
    return time.time() - t0


def run_job(cluster: LocalAutoscalingCluster, args: list[str], cwd: Path, during: list[int]) -> str:
    """A dragons command joined to the cluster (as `ray job submit` runs it); ``during``
    collects how many nodes were up while it ran. Returns its output."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "DRAGONS_PROGRESS_BARS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dragons.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 420
    while proc.poll() is None:
        during.append(raylets(cluster))
        if time.time() > deadline:
            proc.kill()
            break
        time.sleep(1)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out[-5000:]
    return out


def scale_up_lines(out: str) -> dict[str, str]:
    """The job's own account: requested, waited, used, released."""
    found = {}
    for key, pattern in {
        "requested": r"requested \d+ GPU node\(s\) from the autoscaler.*",
        "waited": r"(waiting for \d+ GPU node\(s\).*|\d+ GPU node\(s\) up after \d+ s.*)",
        "used": r"\d+ GPU node\(s\) up after (\d+) s; starting with .*",
        "nocuda": r"warning: the cluster's GPU nodes have a GPU resource but no CUDA device.*",
        "released": r"released the request for \d+ GPU node\(s\).*",
    }.items():
        m = re.search(pattern, out)
        assert m, f"no {key!r} line in:\n{out[-4000:]}"
        found[key] = m.group(0)
    return found


def test_token_auth_stays_on(autoscaling: LocalAutoscalingCluster) -> None:
    url = f"http://127.0.0.1:{autoscaling.dashboard_port}/api/version"
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    deadline = time.time() + 60
    while True:
        try:
            urlopen(Request(url, headers={"Authorization": f"Bearer {token}"}), timeout=2).read()
            break
        except OSError:
            assert time.time() < deadline, "the autoscaling cluster's dashboard never answered"
            time.sleep(1)
    with pytest.raises(HTTPError, match="401"):
        urlopen(url, timeout=2)


def test_score_scales_gpu_nodes_up_from_zero_and_back(
    autoscaling: LocalAutoscalingCluster, tiny_model: str, hymenoptera_s3: str, tmp_path: Path
) -> None:
    from dragons.score.query import run_sql

    assert raylets(autoscaling) == 1  # the head alone: no GPU node
    table = str(tmp_path / "t")
    during: list[int] = []
    out = run_job(
        autoscaling,
        [
            "score",
            "--model",
            tiny_model,
            "--input",
            f"{hymenoptera_s3}/val",
            "--output",
            table,
            "--run-id",
            "as1",
            "--actors",
            "1:2",
            "--use-gpu",
            "yes",
            "--gpu-wait",
            "120",
        ],
        tmp_path,
        during,
    )
    lines = scale_up_lines(out)
    print("\n".join(lines.values()))
    assert "1 to 2 scoring actor(s) with 1 CPU and 1 GPU each" in out, out[-3000:]
    assert max(during) >= 2  # at least one GPU node joined while the job ran
    rows = run_sql(table, "SELECT uri, count(*) AS n, max(error) AS error FROM scores GROUP BY uri").to_pylist()
    listed = [e.uri for e in storage.list_files(f"{hymenoptera_s3}/val")]
    assert sorted(r["uri"] for r in rows) == sorted(listed) and all(r["n"] == 1 for r in rows)
    assert not any(r["error"] for r in rows)
    # The request is withdrawn: the idle GPU nodes go back to zero.
    released = wait_for_raylets(autoscaling, 1, timeout=IDLE_TIMEOUT_S * 6)
    print(f"scale-up {lines['used']!r}; nodes back to zero {released:.0f} s after the job ended")


def test_train_scales_a_gpu_node_up_from_zero(autoscaling: LocalAutoscalingCluster, tmp_path: Path) -> None:
    from dragons.local.synth import write_dataset

    wait_for_raylets(autoscaling, 1, timeout=IDLE_TIMEOUT_S * 6)  # from zero again
    data = tmp_path / "data"
    write_dataset(str(data), ["drogon", "viserion"], n_train=8, n_valid=4, seed=5, size=(72, 64))
    out_dir = tmp_path / "model"
    during: list[int] = []
    out = run_job(
        autoscaling,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out_dir),
            "--workers",
            "1",
            "--use-gpu",
            "yes",
            "--gpu-wait",
            "120",
            "--image-size",
            "64",
            "--head-epochs",
            "2",
            "--head-views",
            "0",
            "--batch-size",
            "8",
            "--no-report",
        ],
        tmp_path,
        during,
    )
    scale_up_lines(out)
    assert "with 1 worker(s), 1 GPU each" in out, out[-3000:]
    assert max(during) >= 2
    meta = json.loads((out_dir / "model.json").read_text())
    assert meta["resources"]["use_gpu"] is True and meta["resources"]["workers"] == 1
    assert (meta["data"]["n_train"], meta["data"]["n_valid"]) == (16, 8)  # 8 per class
    wait_for_raylets(autoscaling, 1, timeout=IDLE_TIMEOUT_S * 6)


# Where Ray's v1 autoscaler keeps the standing request_resources() call (ray_constants).
REQUEST_KEY = b"autoscaler_resource_request"


def _kv(cluster: LocalAutoscalingCluster, key: bytes) -> bytes | None:
    from ray._raylet import GcsClient  # type: ignore[attr-defined]

    value = GcsClient(address=cluster.address).internal_kv_get(key, None)
    return value if isinstance(value, bytes) else None


def standing_request(cluster: LocalAutoscalingCluster) -> list[dict]:
    """The bundles the cluster's autoscaler is asked to fit now (the monitor reads them every second)."""
    raw = _kv(cluster, REQUEST_KEY)
    return list(json.loads(raw)) if raw else []


def gpu_nodes(cluster: LocalAutoscalingCluster) -> int:
    """GPU nodes up or on their way, as the v1 monitor reports them (its status in the GCS KV)."""
    report = json.loads(_kv(cluster, b"__autoscaling_status") or b"{}").get("autoscaler_report") or {}
    return (
        sum(n for t, n in (report.get("active_nodes") or {}).items() if t != "ray.head.default")
        + sum((report.get("pending_launches") or {}).values())
        + len(report.get("pending_nodes") or [])
    )


def wait_for_no_gpu_node(cluster: LocalAutoscalingCluster, timeout: float) -> float:
    """Seconds until no GPU node is up, starting or being launched (a launch in flight is no raylet yet)."""
    t0 = time.time()
    while raylets(cluster) != 1 or gpu_nodes(cluster):
        assert time.time() - t0 < timeout, f"{raylets(cluster)} nodes, {gpu_nodes(cluster)} GPU, after {timeout:.0f} s"
        time.sleep(1)
    return time.time() - t0


class Job:
    """A dragons command joined to the cluster, its output read as it comes."""

    def __init__(self, cluster: LocalAutoscalingCluster, args: list[str], cwd: Path) -> None:
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "DRAGONS_PROGRESS_BARS": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dragons.cli", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.t0 = time.time()
        self.at: dict[str, float] = {}  # when wait_for found each pattern, seconds from the start
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.time() + timeout
        while True:
            for line in list(self.lines):
                if re.search(pattern, line):
                    self.at.setdefault(pattern, time.time() - self.t0)
                    return line
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {pattern!r}:\n{self.out[-4000:]}"
            assert time.time() < deadline, f"no {pattern!r} in {timeout:.0f} s:\n{self.out[-4000:]}"
            time.sleep(0.2)

    def stop(self, cluster: LocalAutoscalingCluster, timeout: float = 60) -> tuple[int, float, float]:
        """SIGTERM to the driver, as ``ray job stop`` sends it; returns its exit status, the
        seconds until the request was withdrawn, and until the driver exited."""
        t0 = time.time()
        self.proc.send_signal(signal.SIGTERM)
        withdrawn = None
        while withdrawn is None or self.proc.poll() is None:
            if withdrawn is None and not standing_request(cluster):
                withdrawn = time.time() - t0
            assert time.time() - t0 < timeout, f"still running {timeout:.0f} s after SIGTERM:\n{self.out[-4000:]}"
            time.sleep(0.1)
        self.reader.join(timeout=10)
        return self.proc.returncode, withdrawn, time.time() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def assert_stopped(job: Job, code: int, cluster: LocalAutoscalingCluster) -> None:
    out = job.out
    assert code == 128 + signal.SIGTERM, out[-4000:]
    assert "error: stopped by SIGTERM: the committed parts are kept; run the same command again" in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert re.search(r"released the request for \d+ GPU node\(s\)", out), out[-4000:]
    assert standing_request(cluster) == []


def test_sigterm_while_waiting_for_gpu_nodes_withdraws_the_request(
    autoscaling: LocalAutoscalingCluster, tiny_model: str, hymenoptera_s3: str, tmp_path: Path
) -> None:
    wait_for_no_gpu_node(autoscaling, timeout=IDLE_TIMEOUT_S * 6)  # from zero
    # 3 GPU nodes where the worker group's maximum is 2: the job is still waiting
    # whenever the signal lands, with up to 2 nodes launched for it.
    job = Job(
        autoscaling,
        [
            "score",
            "--model",
            tiny_model,
            "--input",
            f"{hymenoptera_s3}/val",
            "--output",
            str(tmp_path / "t"),
            "--run-id",
            "stop1",
            "--actors",
            "3:3",
            "--use-gpu",
            "yes",
            "--gpu-wait",
            "300",
        ],
        tmp_path,
    )
    try:
        job.wait_for(r"requested 3 GPU node\(s\)", timeout=120)
        job.wait_for(r"waiting for 3 GPU node\(s\)", timeout=120)
        assert len(standing_request(autoscaling)) == 3
        # Stop it once the autoscaler acts on the request (a node launched for it): the
        # nodes a killed job left behind are what this is about.
        t0 = time.time()
        while not gpu_nodes(autoscaling):
            assert time.time() - t0 < 60, "the autoscaler launched nothing in 60 s"
            time.sleep(0.5)
        launched = time.time() - t0
        code, withdrawn, exited = job.stop(autoscaling)
    finally:
        job.kill()
    assert_stopped(job, code, autoscaling)
    back = wait_for_no_gpu_node(autoscaling, timeout=IDLE_TIMEOUT_S * 6)
    print(
        f"SIGTERM in the wait ({job.at}, a node launched {launched:.1f} s after): withdrawn after "
        f"{withdrawn:.1f} s, exit after {exited:.1f} s, GPU nodes back to zero {back:.0f} s later"
    )


def test_sigterm_while_scoring_on_gpu_nodes_withdraws_and_keeps_the_parts(
    autoscaling: LocalAutoscalingCluster, tiny_model: str, hymenoptera_s3: str, tmp_path: Path
) -> None:
    from dragons.score.query import run_sql

    wait_for_no_gpu_node(autoscaling, timeout=IDLE_TIMEOUT_S * 6)
    table = str(tmp_path / "t")
    # All of hymenoptera (~400 images), one per model call, a part every 10 rows: a
    # run that is still scoring after its first commit.
    job = Job(
        autoscaling,
        [
            "score",
            "--model",
            tiny_model,
            "--input",
            hymenoptera_s3,
            "--output",
            table,
            "--run-id",
            "stop2",
            "--actors",
            "1:2",
            "--use-gpu",
            "yes",
            "--gpu-wait",
            "120",
            "--batch-size",
            "1",
            "--commit-every",
            "10",
        ],
        tmp_path,
    )
    try:
        job.wait_for(r"GPU node\(s\) up after", timeout=180)
        job.wait_for(r"run stop2: part 1 committed", timeout=180)
        # Ours, or by now Ray Data's own (its AutoscalingCoordinator writes the same key,
        # [] once its pool has what it asked for): either way, nothing may stand after.
        asked = standing_request(autoscaling)
        code, withdrawn, exited = job.stop(autoscaling)
    finally:
        job.kill()
    assert_stopped(job, code, autoscaling)
    rows = run_sql(table, "SELECT count(*) AS n FROM scores WHERE run_id = 'stop2'").to_pylist()[0]["n"]
    listed = len(storage.list_files(hymenoptera_s3))
    assert 10 <= rows < listed, (rows, listed)  # the committed parts are kept; the rest is for the next run
    # The actors went with the driver: nothing holds the nodes, so they idle out.
    back = wait_for_no_gpu_node(autoscaling, timeout=IDLE_TIMEOUT_S * 6)
    print(
        f"SIGTERM while scoring ({rows} rows committed; {job.at}; {len(asked)} bundles asked): withdrawn "
        f"after {withdrawn:.1f} s, exit after {exited:.1f} s, GPU nodes back to zero {back:.0f} s later"
    )


# Without a cluster: Ray's calls stubbed, the wait never ends by itself.


@pytest.fixture
def no_gpu_ever(monkeypatch: pytest.MonkeyPatch) -> list[list[dict]]:
    """An autoscaler that launches forever: returns each request_resources() call's bundles."""
    import ray.autoscaler.sdk

    from dragons import capacity

    calls: list[list[dict]] = []

    def request_resources(num_cpus: int | None = None, bundles: list[dict] | None = None) -> None:
        calls.append(list(bundles or []))

    monkeypatch.setattr(capacity, "_gpus", lambda: 0)
    monkeypatch.setattr(capacity, "autoscaler_kind", lambda settle_s=15.0: "v1")
    monkeypatch.setattr(capacity, "pending_launches", lambda kind: 1)
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", request_resources)
    monkeypatch.setattr(signals, "_shutdown_ray", lambda: None)  # never the test session's own Ray
    return calls


ASKED = [{"GPU": 1, "CPU": 1.0}] * 2


def signal_on_wait(signum: int, lines: list[str]):  # type: ignore[no-untyped-def]
    """A ``say`` that sends ``signum`` to this process on the first "waiting for" line."""

    def say(line: str) -> None:
        lines.append(line)
        if line.startswith("waiting for") and sum(x.startswith("waiting for") for x in lines) == 1:
            os.kill(os.getpid(), signum)

    return say


def test_ctrl_c_during_the_gpu_wait_withdraws_the_request(no_gpu_ever: list[list[dict]]) -> None:
    before = signal.getsignal(signal.SIGINT)
    lines: list[str] = []
    caught: BaseException | None = None
    try:
        with (
            signals.stop_on_signals(),
            GpuRequest(
                "scoring actor", "yes", Span(1, 2), wait_s=60, say=signal_on_wait(signal.SIGINT, lines), sleep_s=0.05
            ),
        ):
            raise AssertionError("no GPU ever comes: the block never runs")
    except BaseException as exc:  # noqa: BLE001 (a plain KeyboardInterrupt must fail the test, not end the session)
        caught = exc
    assert isinstance(caught, signals.Stopped) and caught.exit_code == 130, repr(caught)
    assert no_gpu_ever == [ASKED, [], []]  # asked; withdrawn in the handler, and again on the way out
    assert any("released the request for 2 GPU node(s)" in x for x in lines), lines
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back

    # Python's own KeyboardInterrupt (no handlers of ours), from inside the wait: withdrawn too.
    def interrupt(line: str) -> None:
        if line.startswith("waiting for"):
            raise KeyboardInterrupt

    with (
        pytest.raises(KeyboardInterrupt),
        GpuRequest("scoring actor", "yes", Span(1, 2), wait_s=60, say=interrupt, sleep_s=0.05),
    ):
        pass
    assert no_gpu_ever == [ASKED, [], [], ASKED, []]


def test_sigterm_through_guarded_is_exit_143_with_one_line(
    no_gpu_ever: list[list[dict]], capsys: pytest.CaptureFixture[str]
) -> None:
    from dragons.cliargs import guarded

    lines: list[str] = []

    def command() -> int:
        with GpuRequest(
            "scoring actor", "yes", Span(1, 2), wait_s=60, say=signal_on_wait(signal.SIGTERM, lines), sleep_s=0.05
        ):
            return 0

    before = signal.getsignal(signal.SIGTERM)
    assert guarded(command) == 143
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: stopped by SIGTERM: the committed parts are kept; run the same command again to continue"
    ), err
    assert no_gpu_ever == [ASKED, [], []]
    assert signal.getsignal(signal.SIGTERM) is before


def test_withdrawing_is_bounded_idempotent_and_not_cut_by_a_signal(
    no_gpu_ever: list[list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.autoscaler.sdk

    from dragons import capacity

    monkeypatch.setattr(capacity, "WITHDRAW_TIMEOUT_S", 0.5)
    lines: list[str] = []
    req = GpuRequest("scoring actor", "yes", Span(1, 2), say=lines.append)
    req._request(2)
    hang = threading.Event()
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: hang.wait(30))
    t0 = time.monotonic()
    req.release()  # a GCS that does not answer: given up on, said, kept for a later try
    assert time.monotonic() - t0 < 5 and req.requested == 2
    assert "warning: could not withdraw the request for 2 GPU node(s)" in lines[-1], lines
    hang.set()

    # A SIGTERM while the withdrawal runs: it completes, then the stop is raised.
    def withdraw_then_signal(bundles: list[dict]) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the main thread runs its handler meanwhile
        no_gpu_ever.append(bundles)

    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", withdraw_then_signal)
    with pytest.raises(signals.Stopped), signals.stop_on_signals():
        req.release()
    assert no_gpu_ever[-1] == [] and req.requested == 0
    req.release()  # nothing left to withdraw: no call
    assert no_gpu_ever == [ASKED, []]
