"""A Ray cluster that scales up from zero on this machine, for tests.

``ray.cluster_utils.AutoscalingCluster`` starts a head whose autoscaler
"launches" fake worker nodes (real raylets on this machine, with whatever
resources their node type says: a GPU without a GPU). Two things in it do not
suit a test session, so this subclass replaces them:

* it reads its base config from ``fake_multi_node/example.yaml``, which Ray's
  wheel does not ship: the same settings are written out here;
* its ``start``/``shutdown`` run ``ray stop --force``, which kills every Ray
  process on the machine, the test session's own Ray included. Here the head
  runs as ``ray start --head --block`` on ports of its own; stopping it
  terminates exactly that process, and the fake nodes its autoscaler started
  (found by the GCS address on their command lines) go with it.

Token auth stays on: the head and its nodes inherit ``RAY_AUTH_MODE=token``
and the token path from the environment (dragons.rayauth).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ray.cluster_utils import AutoscalingCluster

# Ray's fake_multi_node/example.yaml, less its own node types.
BASE_CONFIG: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalAutoscalingCluster(AutoscalingCluster):
    """``AutoscalingCluster`` on its own ports, stopped without touching other clusters."""

    def __init__(self, head_resources: dict, worker_node_types: dict, **config_kwargs: Any) -> None:
        self.port = free_port()
        self.dashboard_port = free_port()
        self.head: subprocess.Popen | None = None
        super().__init__(head_resources, worker_node_types, **config_kwargs)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _generate_config(
        self, head_resources: dict, worker_node_types: dict, autoscaler_v2: bool = False, **config_kwargs: Any
    ) -> dict:
        config = copy.deepcopy(BASE_CONFIG)
        # The fake nodes join this head, not Ray's default port 6379.
        config["provider"]["gcs_address"] = f"127.0.0.1:{self.port}"
        config["available_node_types"] = {
            **copy.deepcopy(worker_node_types),
            "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0},
        }
        config.update(config_kwargs)
        return config

    def start(self, _system_config: dict | None = None, override_env: dict | None = None) -> None:
        path = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / f"fake-autoscaler-{self.port}.json"
        path.write_text(json.dumps(self._config))
        res = dict(self._head_resources)
        ray_bin = str(Path(sys.executable).with_name("ray"))
        # The test session's Ray holds Ray's default agent ports: this head takes free ones.
        ports = [
            f"--{flag}={free_port()}"
            for flag in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
                "ray-client-server-port",
            )
        ]
        cmd = [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--autoscaling-config={path}",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            *ports,
            f"--num-cpus={res.pop('CPU', 0)}",
            f"--num-gpus={res.pop('GPU', 0)}",
            "--disable-usage-stats",
            f"--object-store-memory={res.pop('object_store_memory', 300 * 2**20)}",
        ]
        if res:
            cmd.append(f"--resources={json.dumps(res)}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", **(override_env or {})})
        self.head = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.head.poll() is not None:
                    raise RuntimeError(f"ray start --head exited with {self.head.returncode}") from None
                time.sleep(0.5)
        raise RuntimeError("the autoscaling cluster's head did not come up in 90 s")

    def node_pids(self) -> list[int]:
        """Processes of this cluster's nodes outside the head's own process tree (the fake nodes)."""
        import psutil

        return [p.pid for p in psutil.process_iter(["cmdline"]) if self.owns(p.info["cmdline"])]

    def owns(self, cmdline: list[str] | None) -> bool:
        """Whether a process belongs to this cluster: it names our GCS port (Ray may
        advertise the machine's address rather than 127.0.0.1)."""
        line = " ".join(cmdline or [])
        return bool(re.search(rf"(gcs[-_]address=\S*:{self.port}\b|gcs_server_port={self.port}\b)", line))

    def shutdown(self) -> None:
        """Kill the cluster outright (a test cluster has nothing to save; `ray start
        --block` stopping its processes one by one, gracefully, takes ~30 s)."""
        pids = self.node_pids()  # the head's processes and the fake nodes it had not yet removed
        if self.head is not None and self.head.poll() is None:
            os.killpg(self.head.pid, signal.SIGKILL)
            self.head.wait(timeout=30)
        for pid in pids + self.node_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
