"""Fault drills against real processes: flaky S3 (a fault-injecting proxy in
front of the local endpoint), objects vanishing between listing and GET, a
killed scoring actor, denied permissions, a lost node. Every listed object
ends as exactly one row; what fails, fails with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
from helpers_hardening import jpeg, rows_of
from s3_fault_proxy import FaultPlan, FaultProxy

from dragons import storage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def proxy_factory(s3: object) -> Iterator:
    started: list[FaultProxy] = []

    def make(plan: FaultPlan) -> FaultProxy:
        p = FaultProxy(os.environ["AWS_ENDPOINT_URL"], plan).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def _run_group(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run in a session of its own, so that on a timeout its whole Ray cluster dies with it."""
    import signal

    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[1:4]} timed out after {timeout:.0f}s:\n{(out + err)[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _cli(
    args: list[str], endpoint: str, tmp: Path, timeout: float = 420, **env: str
) -> subprocess.CompletedProcess[str]:
    """A dragons command in its own process with its own embedded Ray, talking to S3 through ``endpoint``."""
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_tmp = Path("/tmp") / f"rd{os.getpid()}{int(time.time() * 1000) % 100000}"  # Ray's socket paths must stay short
    ray_tmp.mkdir()
    full.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "RAY_TMPDIR": str(ray_tmp),
            "DRAGONS_PROGRESS_BARS": "0",
            # A second Ray beside the session's: keep its object store small.
            "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.05",
            **env,
        }
    )
    try:
        return _run_group([sys.executable, "-m", "dragons.cli", *args], tmp, full, timeout)
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def test_storage_rides_out_s3_faults(bucket: str, proxy_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow and boto3 both retry 503 SlowDown, 500 and resets with backoff: nothing lost."""
    proxy = proxy_factory(FaultPlan(rate=0.4, seed=1))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    root = f"s3://{bucket}/faulty-storage"
    for i in range(10):
        storage.write_bytes(f"{root}/{i:02d}.bin", bytes([i]) * (i + 1))
    files = storage.list_files(root)
    assert [f.size for f in files] == [i + 1 for i in range(10)]
    client = storage.boto3_client()
    for i, f in enumerate(files):
        assert storage.read_bytes(f.uri) == bytes([i]) * (i + 1)
        assert storage.get_object(client, storage.parse(f.uri)) == bytes([i]) * (i + 1)
    assert sum(proxy.stats.faults.values()) >= 10 and set(proxy.stats.faults) >= {"slowdown", "internal", "reset"}


@pytest.mark.slow
def test_scoring_through_flaky_s3_loses_nothing(tiny_model: str, bucket: str, proxy_factory, tmp_path: Path) -> None:
    """Retried faults leave no trace; objects that keep failing or vanish become error rows with stable codes."""
    prefix = f"s3://{bucket}/drill-faults"
    n = 40
    for i in range(n):
        storage.write_bytes(f"{prefix}/img{i:03d}.jpg", jpeg(i))
    storage.write_bytes(f"{prefix}/broken-forever.jpg", jpeg(1000))
    storage.write_bytes(f"{prefix}/vanishes.jpg", jpeg(1001))
    proxy = proxy_factory(FaultPlan(rate=0.25, seed=7, always_fail=("broken-forever",), delete_on_get=("vanishes",)))
    out = f"s3://{bucket}/tables/drill-faults"
    p = _cli(
        ["score", "--model", tiny_model, "--input", prefix, "--output", out, "--run-id", "faults"],
        proxy.endpoint,
        tmp_path,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "Traceback" not in p.stderr
    rows = rows_of(out, "faults")
    counts = Counter(r["uri"] for r in rows)
    assert len(counts) == n + 2 and set(counts.values()) == {1}, counts.most_common(3)
    by_name = {r["uri"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["broken-forever.jpg"]["error"].startswith("read_error:")
    assert by_name["vanishes.jpg"]["error"].startswith("not_found:"), by_name["vanishes.jpg"]
    assert all(by_name[f"img{i:03d}.jpg"]["error"] is None for i in range(n))
    assert proxy.stats.deleted and sum(v for k, v in proxy.stats.faults.items() if k not in ("always_fail",)) >= 10


@pytest.mark.slow
def test_training_through_flaky_s3(bucket: str, proxy_factory, tmp_path: Path) -> None:
    """Listing, image reads, checkpoints and the artifact all go through the faulty endpoint."""
    from dragons.local.synth import write_dataset

    local = tmp_path / "data"
    write_dataset(str(local), ["drogon", "viserion"], n_train=12, n_valid=6, seed=3, size=(96, 72))
    storage.upload_dir(local, f"s3://{bucket}/drill-train-data")
    proxy = proxy_factory(FaultPlan(rate=0.2, seed=11))
    out = f"s3://{bucket}/models/drill-train"
    p = _cli(
        [
            "train",
            "--data",
            f"s3://{bucket}/drill-train-data",
            "--out",
            out,
            "--workers",
            "1",
            "--image-size",
            "64",
            "--head-epochs",
            "3",
            "--head-views",
            "0",
            "--batch-size",
            "8",
            "--no-report",
        ],
        proxy.endpoint,
        tmp_path,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    meta = json.loads(storage.read_bytes(f"{out}/model.json"))
    assert (meta["data"]["n_train"], meta["data"]["n_valid"]) == (24, 12) and not meta["data"]["bad_images"]
    assert sum(proxy.stats.faults.values()) >= 5


@pytest.mark.slow
def test_killed_scoring_actor_every_row_exactly_once(
    ray_session: None, tiny_model: str, bucket: str, tmp_path: Path
) -> None:
    """SIGKILL a scoring actor mid-run: Ray Data restarts it and retries its batches."""
    import signal
    import threading

    import psutil

    from dragons.score.pipeline import ScoreConfig, score

    prefix = f"s3://{bucket}/drill-actor"
    n = 240
    client = storage.boto3_client()
    for i in range(n):
        client.put_object(Bucket=bucket, Key=f"drill-actor/img{i:04d}.jpg", Body=jpeg(i % 20, size=(320, 240)))
    out = f"s3://{bucket}/tables/drill-actor"
    result: dict = {}

    def run() -> None:
        try:
            result["manifest"] = score(
                ScoreConfig(
                    model=tiny_model,
                    input=prefix,
                    output=out,
                    run_id="actor-kill",
                    batch_size=4,
                    progress_s=0.3,
                    log_file=str(tmp_path / "score.log"),
                )
            )
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    killed = None
    deadline = time.time() + 180
    while time.time() < deadline and t.is_alive() and killed is None:
        # This session's cluster is this process's descendants; Ray titles an actor's
        # process after its class (the embedded cluster serves no state API to ask).
        for proc in psutil.Process().children(recursive=True):
            try:
                title = (proc.cmdline() or [""])[0]
            except psutil.Error:
                continue
            if title.startswith("ray::MapWorker(MapBatches(Scorer))"):
                log = tmp_path / "score.log"
                if log.exists() and "scored " in log.read_text():  # some rows are already written
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = proc.pid
                    break
        time.sleep(0.2)
    t.join(timeout=300)
    assert killed is not None, "no scoring actor was found to kill while the run was in progress"
    assert "error" not in result, result.get("error")
    m = result["manifest"]
    assert m["listed"] == m["rows"] == n and m["errors"] == 0
    counts = Counter(r["uri"] for r in rows_of(out, "actor-kill"))
    assert len(counts) == n and set(counts.values()) == {1}


def _objects(bucket: str, prefix: str) -> list[str]:
    client = storage.boto3_client()
    return [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]


@pytest.mark.slow
def test_permission_denied_on_input_and_output(
    tiny_model: str, bucket: str, hymenoptera_s3: str, proxy_factory, tmp_path: Path
) -> None:
    """403 AccessDenied on the input (listing and GETs) or the output (PUTs): exit 2, a clear
    `error: access denied ...` naming the URI, and nothing half-written under the output."""
    for i in range(6):
        storage.write_bytes(f"s3://{bucket}/drill-perm-in/img{i}.jpg", jpeg(i))
        storage.write_bytes(f"s3://{bucket}/drill-perm-ok/img{i}.jpg", jpeg(i))
    proxy = proxy_factory(FaultPlan(rate=0.0, deny=("drill-perm-in", "drill-perm-out")))
    cases = {
        "score-input": [
            "score",
            "--model",
            tiny_model,
            "--input",
            f"s3://{bucket}/drill-perm-in",
            "--output",
            f"s3://{bucket}/tables/drill-perm-a",
        ],
        "score-output": [
            "score",
            "--model",
            tiny_model,
            "--input",
            f"s3://{bucket}/drill-perm-ok",
            "--output",
            f"s3://{bucket}/drill-perm-out/table",
        ],
        "train-output": ["train", "--data", hymenoptera_s3, "--out", f"s3://{bucket}/drill-perm-out/model"],
    }
    for name, args in cases.items():
        p = _cli(args, proxy.endpoint, tmp_path)
        assert p.returncode == 2, (name, (p.stdout + p.stderr)[-3000:])
        assert "Traceback" not in p.stderr, (name, p.stderr[-3000:])
        assert "error: " in p.stderr and "access denied" in p.stderr.lower(), (name, p.stderr[-2000:])
        assert "drill-perm" in p.stderr, (name, p.stderr[-2000:])  # names the input
    assert _objects(bucket, "drill-perm-out") == []
    assert _objects(bucket, "tables/drill-perm-a") == []
    assert proxy.stats.faults["deny"] >= 3


NODE_DRILL_IMAGES = 160


@pytest.fixture(scope="module")
def node_drills(tiny_model: str, bucket: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Both node-loss drills in one run of tests/drill_node_loss.py: one 2-node cluster,
    a node lost while scoring, then a fresh node lost while training (each drill's
    figures come back as its own line)."""
    from dragons.local.synth import write_dataset

    tmp = tmp_path_factory.mktemp("node-drills")
    client = storage.boto3_client()
    for i in range(NODE_DRILL_IMAGES):
        client.put_object(Bucket=bucket, Key=f"drill-node/img{i:04d}.jpg", Body=jpeg(i % 20, size=(320, 240)))
    write_dataset(str(tmp / "data"), ["drogon", "viserion"], n_train=12, n_valid=6, seed=5, size=(96, 72))
    storage.upload_dir(tmp / "data", f"s3://{bucket}/drill-node-train")
    args = [
        *("score", tiny_model, f"s3://{bucket}/drill-node", f"s3://{bucket}/tables/drill-node", "node-loss"),
        *(
            "train",
            f"s3://{bucket}/drill-node-train",
            f"s3://{bucket}/models/drill-node",
            f"s3://{bucket}/drill-node-runs",
        ),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_tmp = Path("/tmp") / f"rn{os.getpid()}{int(time.time() * 1000) % 100000}"
    ray_tmp.mkdir()
    env.update({"RAY_TMPDIR": str(ray_tmp), "DRAGONS_PROGRESS_BARS": "0"})
    try:
        p = _run_group([sys.executable, str(REPO / "tests" / "drill_node_loss.py"), *args], tmp, env, 900)
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
    found = {}
    for line in p.stdout.splitlines():
        if line.startswith("DRILL "):
            mode, figures = line[len("DRILL ") :].split(" ", 1)
            found[mode] = json.loads(figures)
    assert p.returncode == 0 and set(found) == {"score", "train"}, (p.stdout + p.stderr)[-5000:]
    return found


@pytest.mark.slow
def test_node_lost_during_scoring(node_drills: dict[str, dict], bucket: str) -> None:
    res, n = node_drills["score"], NODE_DRILL_IMAGES
    assert res["killed"], res
    assert res["listed"] == res["rows"] == n and res["errors"] == 0, res
    counts = Counter(r["uri"] for r in rows_of(f"s3://{bucket}/tables/drill-node", "node-loss"))
    assert len(counts) == n and set(counts.values()) == {1}


@pytest.mark.slow
def test_node_lost_during_training_resumes(node_drills: dict[str, dict], bucket: str) -> None:
    res = node_drills["train"]
    assert res["killed"] and res["added"], res
    assert res["resumes"] >= 1 and res["epochs"] >= 2, res
    assert storage.exists(f"s3://{bucket}/models/drill-node/model.json")
