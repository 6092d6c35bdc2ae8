"""Session-wide fixtures: one local S3 endpoint and one Ray instance for all tests.

Order matters: the S3 variables are set before ``ray.init`` so every Ray worker
inherits them, exactly as on a cluster configured through its environment.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

import dragons  # noqa: F401  (first: turns on Ray token auth before anything imports ray)

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera"

os.environ.setdefault("DRAGONS_PROGRESS_BARS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    """The real ants/bees photos; a test that needs them fails loudly without them."""
    if not (HYMENOPTERA / "train").is_dir() or not (HYMENOPTERA / "val").is_dir():
        pytest.fail(
            f"missing shared data set {HYMENOPTERA} (expected train/ and val/); it ships beside the repo in ../shared/data"
        )
    return HYMENOPTERA


@pytest.fixture(scope="session")
def s3() -> Iterator["object"]:
    from dragons.local import s3server

    server = s3server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    server.apply_env()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(s3: object) -> Iterator[None]:
    import ray

    from dragons.raycluster import ensure_ray

    # A stalled pipeline must fail the test in minutes, not hang for Ray's default 30.
    ensure_ray(no_progress_timeout_s=180)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def bucket(s3: object) -> str:
    from dragons.local.s3server import create_bucket

    create_bucket("dragons-test")
    return "dragons-test"


@pytest.fixture(scope="session")
def hymenoptera_s3(hymenoptera: Path, bucket: str) -> str:
    """The hymenoptera folder uploaded to the local S3 endpoint (once per session)."""
    from dragons.local.s3server import upload_tree

    n = upload_tree(str(hymenoptera), bucket, "hymenoptera")
    assert n >= 398
    return f"s3://{bucket}/hymenoptera"


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="dragons-tests-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def hymenoptera_model(ray_session: None, hymenoptera_s3: str) -> dict:
    """One model trained on hymenoptera from S3 with 2 workers, shared by later tests.

    Settings are the library defaults: the accuracy bar is about them.
    """
    from dragons.train.config import TrainConfig
    from dragons.train.run import train

    out = "s3://dragons-test/models/hymenoptera"
    meta = train(TrainConfig(data=hymenoptera_s3, out=out, workers=2)).meta
    return {"uri": out, "meta": meta}


@pytest.fixture(scope="session")
def tiny_model(bucket: str) -> str:
    """An untrained Lite0 artifact at 64 px: enough where a test compares rows with rows."""
    from helpers_hardening import save_tiny_model

    uri = f"s3://{bucket}/models/tiny"
    save_tiny_model(uri)
    return uri
