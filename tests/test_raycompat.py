"""Ray internals live in dragons.raycompat only, and the pinned Ray still has each one.

An upgrade of Ray that moves one of them fails here, not in a nightly run
(where raycompat would fall back: noisier output, an extra process)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What reaching into Ray looks like: its private packages, and underscore names imported from it.
# Also the autoscaler's internals (v2's SDK and utils) and Ray's internal GCS keys ("__name").
PRIVATE = re.compile(
    r"ray\._|ray\.[\w.]*\._|from ray[\w.]* import .*\b_[a-z]|\._create_default_callbacks|_internal_kv"
    r"|ray\.autoscaler\.v2|[\"']__(?!main__)[a-z_]+[\"']"
)


def test_only_raycompat_reaches_into_ray() -> None:
    offenders = []
    for path in sorted((REPO / "dragons").rglob("*.py")):
        if path.name == "raycompat.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "Ray internals outside dragons/raycompat.py:\n" + "\n".join(offenders)


def test_the_pinned_ray_has_every_internal_raycompat_uses() -> None:
    """Each shim takes its first branch on Ray 2.58 (none falls back)."""
    import importlib

    from ray.train.torch import TorchTrainer

    from dragons import raycompat

    worker = importlib.import_module("ray._private.worker")
    assert hasattr(worker, "global_worker_stdstream_dispatcher") and hasattr(worker, "print_to_stdstream")
    assert hasattr(worker, "filter_autoscaler_events")
    assert raycompat.token_auth_on() is not None  # ray._raylet says what it fixed at import
    utils = importlib.import_module("ray._common.utils")
    assert raycompat.address_file() == utils.get_ray_address_file(None)
    kv = importlib.import_module("ray.experimental.internal_kv")
    assert callable(kv._internal_kv_get)
    v2_utils = importlib.import_module("ray.autoscaler.v2.utils")
    v2_sdk = importlib.import_module("ray.autoscaler.v2.sdk")
    assert callable(v2_utils.is_autoscaler_v2) and callable(v2_sdk.get_cluster_status)
    lean = raycompat.lean_trainer(TorchTrainer, {"DatasetsCallback"})
    assert lean is not TorchTrainer and hasattr(TorchTrainer, "_create_default_callbacks")
    assert raycompat.lean_trainer(TorchTrainer, set()) is TorchTrainer
