"""`dragons score --inventory`: nights scored from an AWS S3 Inventory report in AWS's own
layout (on the local S3 endpoint), killed and resumed, then the next day's report
scored --incremental. The objects are hymenoptera's 398 photos, copied under a
prefix of their own; the model is the tiny untrained one: these tests are
about which objects get a row, not accuracy."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from helpers_inventory import DEFAULT_CREATED, Obj, marker, write_inventory
from test_resume import _committed, _start

from dragons.score.query import run_sql

pytestmark = pytest.mark.slow


def _objects(bucket: str, prefix: str) -> list[Obj]:
    """What a listing of ``prefix`` finds, as inventory rows (key, size, etag, last modified)."""
    from dragons.storage import boto3_client

    pages = boto3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [
        Obj(o["Key"], int(o["Size"]), str(o["ETag"]).strip('"'), o["LastModified"])
        for page in pages
        for o in page.get("Contents", [])
    ]


PREFIX = "inv-archive"
N = 398


def _score(model: str, manifest: str, bucket: str, table: str, run_id: str, *extra: str) -> list[str]:
    import sys

    return [
        sys.executable,
        "-m",
        "dragons.cli",
        "score",
        "--model",
        model,
        "--inventory",
        manifest,
        "--input",
        f"s3://{bucket}/{PREFIX}",
        "--output",
        table,
        "--run-id",
        run_id,
        "--commit-every",
        "20",
        "--actors",
        "1",
        "--list-concurrency",
        "2",
        "--progress-s",
        "1",
        *extra,
    ]


def _uris(table: str, run_id: str) -> Counter[str]:
    return Counter(r["uri"] for r in run_sql(table, f"SELECT uri FROM scores WHERE run_id = '{run_id}'").to_pylist())


def test_an_inventory_night_is_killed_resumed_then_the_next_report_runs_incremental(
    ray_session: None, tiny_model: str, hymenoptera_s3: str, bucket: str, tmp_path: Path
) -> None:
    from dragons.storage import boto3_client

    client = boto3_client()
    for o in _objects(bucket, "hymenoptera/"):
        client.copy_object(
            Bucket=bucket, Key=o.key.replace("hymenoptera/", f"{PREFIX}/"), CopySource={"Bucket": bucket, "Key": o.key}
        )
    objs = _objects(bucket, f"{PREFIX}/")
    assert len(objs) == N
    # Day 1: a Parquet report over two data files; rows outside --input and a delete marker are left out.
    noise = [Obj("hymenoptera/val/ants/x.jpg", 10), marker(f"{PREFIX}/deleted.jpg")]
    day1 = write_inventory(f"s3://{bucket}", bucket, objs + noise, "Parquet", prefix="inventory", files=2)
    table = f"s3://{bucket}/tables/inventory-night"
    first = _start(_score(tiny_model, day1, bucket, table, "day1"), tmp_path, "first")
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and _committed(table, "day1") < 20:
        time.sleep(0.3)
    assert first.poll() is None, first.communicate()
    os.killpg(first.pid, signal.SIGKILL)  # mid-night
    first.wait(timeout=30)
    kept = _committed(table, "day1")
    assert 20 <= kept < N and kept % 20 == 0
    again = _start(_score(tiny_model, day1, bucket, table, "day1"), tmp_path, "second")
    out, err = again.communicate(timeout=420)
    assert again.returncode == 0, err[-3000:]
    assert f"listed {N}  kept {kept}" in out, out
    day1_rows = _uris(table, "day1")
    assert set(day1_rows) == {f"s3://{bucket}/{o.key}" for o in objs} and set(day1_rows.values()) == {1}

    # Day 2: a CSV report (keys URL-encoded): 4 objects changed (new etags), 3 new objects (one with a
    # space and a '+' in its key), and one object that arrived after the report: it waits for the next one.
    new_keys = [f"{PREFIX}/new/a b+c.jpg", f"{PREFIX}/new/2.jpg", f"{PREFIX}/new/3.jpg"]
    sample = client.get_object(Bucket=bucket, Key=objs[0].key)["Body"].read()
    for key in [*new_keys, f"{PREFIX}/new/after-the-report.jpg"]:
        client.put_object(Bucket=bucket, Key=key, Body=sample)
    listed = {o.key: o for o in _objects(bucket, f"{PREFIX}/")}
    changed = [o.key for o in objs[:4]]
    day2_objs = [
        Obj(o.key, o.size, "f" * 32 if o.key in changed else o.etag, o.last_modified)
        for k, o in listed.items()
        if k != f"{PREFIX}/new/after-the-report.jpg"
    ]
    day2 = write_inventory(
        f"s3://{bucket}", bucket, day2_objs, "CSV", prefix="inventory", created=DEFAULT_CREATED + timedelta(days=1)
    )
    p = _start(_score(tiny_model, day2, bucket, table, "day2", "--incremental"), tmp_path, "day2")
    out, err = p.communicate(timeout=420)
    assert p.returncode == 0, err[-3000:]
    assert f"listed {N + 3}  kept 0  skipped {N - 4}  new 7" in out, out
    assert set(_uris(table, "day2")) == {f"s3://{bucket}/{k}" for k in [*changed, *new_keys]}
    runs = {r["run_id"]: r for r in run_sql(table, "SELECT run_id, status, input FROM runs").to_pylist()}
    assert runs["day1"]["status"] == runs["day2"]["status"] == "complete"
    assert runs["day2"]["input"].endswith("manifest.json")
