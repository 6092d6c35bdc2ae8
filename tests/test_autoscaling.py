"""Jobs that scale a cluster up from zero GPU nodes, and let it scale back.

One autoscaling cluster for the module (tests/fake_autoscaler.py): a 2-CPU
head and a worker type with {"CPU": 1, "GPU": 1} (a fake GPU: no CUDA here),
min 0, max 2, idle timeout 12 s. ``dragons score`` and ``dragons train`` join
it through RAY_ADDRESS, as a job on a KubeRay cluster does, find no GPU, ask
the autoscaler, wait, run on the nodes that come, and give the request back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import psutil
import pytest

from dragons import storage
from fake_autoscaler import LocalAutoscalingCluster

GPU_NODE = {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150 * 2**20}, "node_config": {},
            "min_workers": 0, "max_workers": 2}
IDLE_TIMEOUT_S = 12


@pytest.fixture(scope="module")
def autoscaling(s3: object, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    os.environ.setdefault("RAY_TMPDIR", "/tmp")
    cluster = LocalAutoscalingCluster({"CPU": 2, "object_store_memory": 300 * 2**20}, {"gpu": dict(GPU_NODE)},
                                      idle_timeout_minutes=IDLE_TIMEOUT_S / 60)
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
    proc = subprocess.Popen([sys.executable, "-m", "dragons.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
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
    for key, pattern in {"requested": r"requested \d+ GPU node\(s\) from the autoscaler.*",
                         "waited": r"(waiting for \d+ GPU node\(s\).*|\d+ GPU node\(s\) up after \d+ s.*)",
                         "used": r"\d+ GPU node\(s\) up after (\d+) s; starting with .*",
                         "nocuda": r"warning: the cluster's GPU nodes have a GPU resource but no CUDA device.*",
                         "released": r"released the request for \d+ GPU node\(s\).*"}.items():
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


def test_score_scales_gpu_nodes_up_from_zero_and_back(autoscaling: LocalAutoscalingCluster, tiny_model: str,
                                                      hymenoptera_s3: str, tmp_path: Path) -> None:
    from dragons.score.query import run_sql

    assert raylets(autoscaling) == 1  # the head alone: no GPU node
    table = str(tmp_path / "t")
    during: list[int] = []
    out = run_job(autoscaling, ["score", "--model", tiny_model, "--input", f"{hymenoptera_s3}/val", "--output", table,
                                "--run-id", "as1", "--actors", "1:2", "--use-gpu", "yes", "--gpu-wait", "120"],
                  tmp_path, during)
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
    out = run_job(autoscaling, ["train", "--data", str(data), "--out", str(out_dir), "--workers", "1",
                                "--use-gpu", "yes", "--gpu-wait", "120", "--image-size", "64", "--head-epochs", "2",
                                "--head-views", "0", "--batch-size", "8", "--no-report"], tmp_path, during)
    scale_up_lines(out)
    assert "with 1 worker(s), 1 GPU each" in out, out[-3000:]
    assert max(during) >= 2
    meta = json.loads((out_dir / "model.json").read_text())
    assert meta["resources"]["use_gpu"] is True and meta["resources"]["workers"] == 1
    assert (meta["data"]["n_train"], meta["data"]["n_valid"]) == (16, 8)  # 8 per class
    wait_for_raylets(autoscaling, 1, timeout=IDLE_TIMEOUT_S * 6)
