"""Listing fanned out: the split covers every object exactly once, N streams list
what one stream lists, and a listing stream killed mid-run is retried without
scoring any object twice or missing one (issue 28, item 2)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dragons import storage
from dragons.score import listing, source
from dragons.score.config import ScoreConfig
from dragons.score.incremental import Skips

ODD = ["a#1.jpg", "a%2F.jpg", "b c+d.jpg", "é/ü.jpg", "日本/写真.jpg", "x?y=1.jpg", "~tilde.jpg", "z/" + "y" * 200]


def _put_all(bucket: str, keys: list[str]) -> None:
    client = storage.boto3_client(max_pool_connections=16)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))


def _fanned(uri: str, streams: int) -> list[str]:
    return [u for unit in listing.split(uri, streams) for u in _uris(unit)]


def _uris(unit: listing.Unit) -> list[str]:
    return [u for t, _ in listing.iter_unit(unit) for u in t.column("uri").to_pylist()]


def _one_stream(uri: str) -> list[str]:
    return sorted(u for t in listing.iter_listing(uri) for u in t.column("uri").to_pylist())


@pytest.fixture(scope="module")
def fan_bucket(s3: object) -> str:
    """Nested prefixes, a flat prefix of 1,500 sequential names (more than one LIST page:
    the flat split's probes run) and keys with odd bytes, a leading '/' among them."""
    client = storage.boto3_client()
    client.create_bucket(Bucket="dragons-fan")
    keys = [f"nested/{c}/{d}/img{i}.jpg" for c in ("cats", "dogs", "emus") for d in range(3) for i in range(7)]
    keys += [f"flat/img_{i:06d}.jpg" for i in range(1500)] + [f"flat/{k}" for k in ODD]
    keys += [f"odd/{k}" for k in ODD] + ["/lead.jpg", "odd/one.jpg/"]  # a 'folder' marker is no object
    _put_all("dragons-fan", keys)
    return "dragons-fan"


@pytest.mark.parametrize("prefix", ["nested", "flat", "odd", ""])
def test_s3_split_covers_every_key_exactly_once(fan_bucket: str, prefix: str) -> None:
    uri = f"s3://{fan_bucket}/{prefix}"
    want = _one_stream(uri)
    for streams in (1, 8):
        units = [_uris(u) for u in listing.split(uri, streams)]
        got = [u for unit in units for u in unit]
        assert sorted(got) == want and len(got) == len(set(got)), (prefix, streams)
    assert len(units) > 1 or prefix == "odd"
    if prefix == "flat":  # the probes found real ranges: no unit holds most of the keys
        assert max(len(u) for u in units) < 0.5 * len(want), [len(u) for u in units]


def test_s3_split_of_one_object_and_a_missing_prefix(fan_bucket: str) -> None:
    (unit,) = listing.split(f"s3://{fan_bucket}/odd/a#1.jpg", 4)
    assert unit.single and _fanned(f"s3://{fan_bucket}/odd/a#1.jpg", 4) == [f"s3://{fan_bucket}/odd/a#1.jpg"]
    with pytest.raises(Exception, match="does not exist"):
        listing.split(f"s3://{fan_bucket}/nothing-here", 4)


def test_local_split_covers_every_file_exactly_once(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for i in range(400):
        p = root / ("ab"[i % 2]) / str(i % 7) / f"f{i} #%é.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (root / "a.txt").write_bytes(b"x")  # sorts between folder 'a' and its files' positions
    (root / "top.jpg").write_bytes(b"x")
    want = _one_stream(str(root))
    for streams in (1, 2, 8):
        got = _fanned(str(root), streams)
        assert sorted(got) == want and len(got) == len(set(got)), streams
    only = root / "a" / "0"  # a chain of single folders is looked below
    assert sorted(_fanned(str(only), 4)) == _one_stream(str(only))


def test_inventory_units_one_per_data_file(tmp_path: Path) -> None:
    from helpers_inventory import write_inventory

    keys = [f"photos/{i:04d}.jpg" for i in range(300)] + ["else/x.jpg"]
    manifest = write_inventory(tmp_path, "src-bucket", keys, "Parquet", files=3)
    units = listing.inventory_units(manifest, "s3://src-bucket/photos")
    assert len(units) == 3
    got = [u for unit in units for t, _ in listing.iter_unit(unit) for u in t.column("uri").to_pylist()]
    assert sorted(got) == [f"s3://src-bucket/{k}" for k in keys[:300]]
    cfg = ScoreConfig(input="s3://src-bucket/photos", inventory=manifest, list_concurrency=2, output=str(tmp_path))
    streams = source.plan_units(cfg)
    assert [len(s) for s in streams] == [2, 1]
    assert sorted(u for t in source.listing_pages(cfg) for u in t.column("uri").to_pylist()) == sorted(got)


def test_pages_replay_at_their_anchors_when_objects_arrive(tmp_path: Path) -> None:
    """A retried stream's page j is (anchor[j-1], anchor[j]]: new objects join a page, never shift one."""
    root = tmp_path / "in"
    root.mkdir()
    for i in range(0, 600, 2):
        (root / f"f{i:04d}.jpg").write_bytes(b"x")
    units = listing.split(str(root), 1)

    def pages(anchors: list[source.Anchor]) -> list[tuple[source._Page, source.Anchor | None]]:
        chunks = ((u, t, p) for u, unit in enumerate(units) for t, p in listing.iter_unit(unit))
        return list(source.cut_pages(chunks, Skips(), anchors, 4000))

    first = pages([])
    anchors = [at for _, at in first if at is not None]
    assert len(first) > 3 and all(p.table().nbytes > 4000 for p, at in first if at is not None)
    for i in range(1, 600, 2):  # objects arrive between every two listed ones
        (root / f"f{i:04d}.jpg").write_bytes(b"x")
    again = pages(anchors)
    for (a, _), (b, _) in zip(first[: len(anchors)], again):
        assert b.last == a.last  # same bounds
        assert set(a.table().column("uri").to_pylist()) <= set(b.table().column("uri").to_pylist())
    seen = [u for p, _ in again for u in p.table().column("uri").to_pylist()]
    assert len(seen) == len(set(seen)) == 600


def test_n_streams_list_the_same_set_as_one(ray_session: None, fan_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{fan_bucket}/"
    want = _one_stream(uri)
    for n in (1, 4):
        cfg = ScoreConfig(input=uri, output=str(tmp_path / "t"), list_concurrency=n)
        counts = source.new_counts()
        ds = source.listing_dataset(cfg, None, "v", "run", counts)
        blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        got = [u for b in blocks for u in b.column("uri").to_pylist()]
        assert sorted(got) == want and len(got) == len(set(got)), n
        final = source.final_counts(counts)
        assert (final.listed, final.to_score) == (len(want), len(want))
        assert max(b.num_rows for b in blocks) <= source.BLOCK_ROWS


def _counts_actors() -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(source.COUNTS_ACTOR_PREFIX)
    }


def _listing_pids(before: set[str], timeout_s: float = 60, poll_s: float = 0.01) -> tuple[object, dict[int, list[int]]]:
    """The run's counts actor and the process ids its listing streams reported to it."""
    import ray

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for a in ray.util.list_named_actors(all_namespaces=True):
            if not a["name"].startswith(source.COUNTS_ACTOR_PREFIX) or a["name"] in before:
                continue  # an earlier test's actor, whose processes are not this run's
            try:
                actor = ray.get_actor(a["name"], namespace=a["namespace"])
                reported: Any = ray.get(actor.processes.remote())
            except Exception:  # noqa: BLE001, S112 (an earlier test's actor, gone)
                continue
            if reported:
                return actor, reported
        time.sleep(poll_s)
    raise AssertionError("no listing stream reported its process id")


def test_a_killed_listing_stream_is_retried_exactly_once(
    ray_session: None, tiny_model: str, bucket: str, tmp_path: Path
) -> None:
    """SIGKILL to a listing stream's process while objects arrive under the prefix: the run
    finishes, and every object present at its start is scored exactly once."""
    import duckdb

    from dragons.score.pipeline import score
    from dragons.score.table import table_uri

    prefix = "fanout-killed"
    start = [f"{prefix}/{d}/{i:05d}.jpg" for d in "abcd" for i in range(0, 900, 3)]
    _put_all(bucket, start)
    arriving = [f"{prefix}/{d}/{i:05d}.jpg" for d in "abcd" for i in range(1, 900, 3)]
    stop = threading.Event()

    def arrive() -> None:  # new objects land inside ranges already listed, and ahead of the listing
        client = storage.boto3_client()
        for k in arriving:
            if stop.is_set():
                return
            client.put_object(Bucket=bucket, Key=k, Body=b"x")

    retried: list[int] = []

    def kill_one() -> None:
        """Kill a stream the moment it says hello (a stream lists for about a second: no sleep
        here, or a loaded machine lets it finish first); one already gone is passed over."""
        import ray

        actor, pids = _listing_pids(before)
        for stream, (pid, *_) in pids.items():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            for _ in range(600):  # the retry says hello from a new process
                try:
                    retried.extend(ray.get(actor.processes.remote())[stream][1:])  # type: ignore[attr-defined]
                except Exception:  # noqa: BLE001 (the run ended: its actor is gone)
                    return
                if retried:
                    return
                time.sleep(0.1)
            return

    before = _counts_actors()
    threads = [threading.Thread(target=arrive, daemon=True), threading.Thread(target=kill_one, daemon=True)]
    for t in threads:
        t.start()
    out = str(tmp_path / "table")
    try:
        score(
            ScoreConfig(
                model=tiny_model,
                input=f"s3://{bucket}/{prefix}",
                output=out,
                max_bytes=1,
                list_concurrency=2,
                commit_every=2000,
                progress_s=60,
                run_id="killed",
            )
        )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    from deltalake import DeltaTable

    rows = DeltaTable(table_uri(out)).to_pyarrow_table(columns=["uri"])
    total, distinct = duckdb.sql("SELECT count(*), count(DISTINCT uri) FROM rows").fetchone()  # type: ignore[misc]
    assert retried, "the listing stream was not killed mid-run"
    assert total == distinct
    assert {f"s3://{bucket}/{k}" for k in start} <= set(rows.column("uri").to_pylist())
