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
