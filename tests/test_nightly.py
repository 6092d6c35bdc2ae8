"""The nightly CronJob fails when the night fails: its pod creates the RayJob,
waits for it and exits with its outcome. The waiter script shipped in the
ConfigMap runs here against a fake Kubernetes API on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

CRONJOB = Path(__file__).resolve().parents[1] / "cluster" / "nightly-score-cronjob.yaml"


def _docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(CRONJOB.read_text()) if d}


def test_cronjob_pod_waits_for_the_rayjob_and_runs_incremental() -> None:
    docs = _docs()
    data = docs["ConfigMap"]["data"]
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    assert main["command"] == ["python", "/template/wait-rayjob.py", "/work/rayjob.yaml"]
    assert "wait-rayjob.py" in data
    job = yaml.safe_load(data["rayjob.yaml"].replace("__RUN_DATE__", "2000-01-31"))
    assert "--incremental" in job["spec"]["entrypoint"].split()
    # The waiter outlives every attempt of the night's RayJob (each gets its own deadline).
    attempts = job["spec"].get("backoffLimit", 0) + 1
    assert (
        docs["CronJob"]["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
        > attempts * job["spec"]["activeDeadlineSeconds"]
    )
    (rule,) = docs["Role"]["rules"]
    assert set(rule["verbs"]) == {"create", "get"}  # what the waiter calls, nothing more


class _FakeKube(BaseHTTPRequestHandler):
    statuses: list[dict[str, Any]] = []
    exists = False
    created: list[dict] = []
    auth: list[str] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:  # noqa: N802
        type(self).auth.append(self.headers.get("Authorization", ""))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/apis/ray.io/v1/namespaces/nightly/rayjobs"
        if type(self).exists:
            self._send(409, {"reason": "AlreadyExists"})
            return
        type(self).created.append(body)
        type(self).exists = True
        self._send(201, body)

    def do_GET(self) -> None:  # noqa: N802
        st = type(self).statuses.pop(0) if len(type(self).statuses) > 1 else type(self).statuses[0]
        self._send(200, {"status": st})


@pytest.mark.parametrize(
    "statuses,exists,rc",
    [
        (
            [
                {},
                {"jobDeploymentStatus": "Initializing"},
                {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
                {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"},
            ],
            False,
            0,
        ),
        (
            [
                {"jobStatus": "RUNNING"},
                {"jobStatus": "FAILED", "jobDeploymentStatus": "Complete", "message": "score exited 2"},
            ],
            False,
            1,
        ),
        (
            [{"jobDeploymentStatus": "Initializing"}, {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}],
            False,
            1,
        ),
        ([{"jobStatus": "STOPPED"}], False, 1),
        ([{"jobStatus": "RUNNING"}, {"jobStatus": "SUCCEEDED"}], True, 0),  # a retried pod attaches to the night's job
        # KubeRay retries a failed attempt on a fresh cluster (backoffLimit): jobStatus stays FAILED
        # while jobDeploymentStatus is Retrying, then the same RayJob starts over (same run id: resumes).
        (
            [
                {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
                {
                    "jobStatus": "FAILED",
                    "jobDeploymentStatus": "Running",
                },  # K8sJobMode: Ray job done, submitter not yet
                {"jobStatus": "FAILED", "jobDeploymentStatus": "Retrying"},
                {"jobDeploymentStatus": "Initializing"},
                {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
                {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"},
            ],
            False,
            0,
        ),
        (
            [
                {"jobStatus": "FAILED", "jobDeploymentStatus": "Retrying"},
                {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "message": "retries used up"},
            ],
            False,
            1,
        ),
    ],
    ids=["succeeded", "failed", "deployment-failed", "stopped", "attach", "retried", "retries-used-up"],
)
def test_waiter_exits_with_the_rayjobs_outcome(tmp_path: Path, statuses: list[dict], exists: bool, rc: int) -> None:
    docs = _docs()
    script = tmp_path / "wait-rayjob.py"
    script.write_text(docs["ConfigMap"]["data"]["wait-rayjob.py"])
    rendered = tmp_path / "rayjob.yaml"
    rendered.write_text(docs["ConfigMap"]["data"]["rayjob.yaml"].replace("__RUN_DATE__", "2000-01-31"))
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-token\n")
    (sa / "namespace").write_text("nightly\n")

    handler = type("H", (_FakeKube,), {"statuses": list(statuses), "exists": exists, "created": [], "auth": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "SA_DIR": str(sa), "KUBE_API": f"http://127.0.0.1:{server.server_port}", "POLL_S": "0.01"}
        p = subprocess.run(
            [sys.executable, str(script), str(rendered)], capture_output=True, text=True, timeout=60, env=env
        )
    finally:
        server.shutdown()
    assert p.returncode == rc, p.stdout + p.stderr
    assert handler.auth == ["Bearer sa-token"]
    if exists:
        assert handler.created == [] and "already exists" in p.stdout
    else:
        (job,) = handler.created
        assert job["metadata"]["name"] == "dragons-nightly-2000-01-31" and "--incremental" in job["spec"]["entrypoint"]
    if rc:
        assert "failed" in p.stdout
