"""The resume and --incremental skip sets (issue 28): the same sets as the window
query they replace, in memory that does not grow with the table."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from dragons.errors import DragonsError
from dragons.rowerrors import PERMANENT, ErrorKind
from dragons.score import incremental
from dragons.score.incremental import Skips, load_skips, parse_memory_limit
from dragons.score.schema import LISTING_SCHEMA, schema

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ants", "bees"]
T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
# 58 characters + 8 digits + ".jpg": the 70-character uris of a real archive.
PREFIX = "s3://dragons-archive-prod/photos/2026/11/28/camera-07/img_"

# The query the sets came from before issue 28 (one window over every row of the
# model version), kept as the reference for what they must hold.
OLD_DONE = "SELECT hash(uri::VARCHAR) AS h FROM scores WHERE run_id = $r"
OLD_KNOWN = (
    "SELECT hash(uri::VARCHAR, coalesce(etag, '')::VARCHAR, coalesce(size, -1)::BIGINT) AS h FROM ("
    "SELECT uri, etag, size, error, error_kind FROM scores WHERE model_version = $v AND run_id <> $r "
    "QUALIFY row_number() OVER (PARTITION BY uri ORDER BY scored_at DESC, run_id DESC) = 1) WHERE {kept}"
)


def _old_sets(
    table: str, version: int, model_version: str, run_id: str, incremental: bool, retry_errors: bool
) -> tuple[np.ndarray, np.ndarray]:
    from dragons.score.query import QueryLimits, connect

    con = connect(table, as_of=version, limits=QueryLimits(timeout_s=0), commit_log=False)
    try:
        done = con.execute(OLD_DONE, {"r": run_id}).fetchnumpy()["h"]
        known = np.zeros(0, np.uint64)
        if incremental:
            kept = "error IS NULL" if retry_errors else "error IS NULL OR error_kind IN $permanent"
            params: dict[str, Any] = {"v": model_version, "r": run_id}
            if not retry_errors:
                params["permanent"] = [k.value for k in PERMANENT]
            known = con.execute(OLD_KNOWN.format(kept=kept), params).fetchnumpy()["h"]
    finally:
        con.close()
    return np.unique(np.asarray(done, np.uint64)), np.sort(np.asarray(known, np.uint64))


Row = tuple[int, str, str, int, str | None, str | None, int | None]


def _kind(error: str | None) -> str | None:
    """The kind a producer writes beside ``error`` (None for a kind no producer writes)."""
    head = error.split(":", 1)[0] if error else None
    return head if head in set(ErrorKind) else None


def _rows(spec: list[Row]) -> pa.Table:
    """Rows of (uri number, model version, run id, hours after T0, error, etag, size)."""
    n = len(spec)
    at = [T0 + timedelta(hours=s[3]) for s in spec]
    return pa.table(
        {
            "uri": [f"s3://x/{s[0]}.jpg" for s in spec],
            "label": [None if s[4] else "ants" for s in spec],
            "score": [None if s[4] else 0.75 for s in spec],
            "p_ants": [0.75] * n,
            "p_bees": [0.25] * n,
            "novelty": [None] * n,
            "model_version": [s[1] for s in spec],
            "run_id": [s[2] for s in spec],
            "scored_at": at,
            "error": [s[4] for s in spec],
            "error_kind": [_kind(s[4]) for s in spec],
            "etag": [s[5] for s in spec],
            "size": [s[6] for s in spec],
            "last_modified": at,
            "dt": [a.strftime("%Y-%m-%d") for a in at],
        },
        schema=schema(CLASSES),
    )


# Each uri's story, for model v1 unless said otherwise (run "z" is the run that loads the sets).
SMALL: list[Row] = [
    *[(i, "v1", "a", 0, None, f"e{i}", 100) for i in range(14)],  # night a scores 0..13
    (1, "v1", "b", 24, None, "changed", 100),  # newer etag: known with it
    (2, "v1", "b", 24, "read_error: timeout", "e2", 100),  # transient: scored again
    (3, "v1", "b", 24, "truncated: image file is truncated", "e3", 100),  # permanent: kept, unless --retry-errors
    (4, "v1", "b", 24, "not_an_image: text", "e4", 100),  # permanent
    (5, "v1", "b", 24, "mystery: what", "e5", 100),  # a kind nobody listed: transient
    (6, "v1", "b", 24, "read_error: x", "e6", 100),
    (6, "v1", "c", 24, None, "e6", 100),  # same instant: c wins
    (7, "v1", "b", 24, None, "e7", 100),
    (7, "v1", "c", 24, "access_denied: no", "e7", 100),  # c wins: transient
    (0, "v1", "z", 48, None, "e0", 100),
    (8, "v1", "z", 48, "read_error: x", "e8", 100),  # this run's: done
    (9, "v2", "d", 48, "read_error: x", "e9", 100),
    (10, "v2", "d", 48, None, "e10", 100),  # another model
    (12, "v1", "b", 24, None, None, None),  # no etag or size
    (13, "v1", "a", 72, None, "late", 100),
    (13, "v1", "b", 24, "read_error: x", "e13", 100),  # time beats run id
]
# Two rows of one run at one instant (old: either row, by chance): now the error row, so scored again.
TIE: list[Row] = [(11, "v1", "b", 24, None, "e11", 100), (11, "v1", "b", 24, "read_error: x", "e11", 100)]
CASES = [
    ("v1", "z", True, False),
    ("v1", "z", True, True),
    ("v1", "z", False, False),
    ("v2", "z", True, False),
    ("v1", "a", True, False),
    ("v1", "c", True, True),
    ("v3", "z", True, False),
    ("v1", "nobody", True, False),
]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> str:
    from deltalake import write_deltalake

    table = str(tmp_path_factory.mktemp("skips") / "t")
    write_deltalake(table, _rows(SMALL), partition_by=["dt"])
    write_deltalake(table, _rows(TIE), partition_by=["dt"], mode="append")
    return table


def _page(spec: list[tuple[int, str | None, int | None]]) -> pa.Table:
    return pa.table(
        {
            "uri": [f"s3://x/{u}.jpg" for u, _, _ in spec],
            "etag": [e for _, e, _ in spec],
            "size": [s for _, _, s in spec],
            "last_modified": [T0] * len(spec),
        },
        schema=LISTING_SCHEMA,
    )


def _hash(uri: str, etag: str, size: int) -> int:
    import duckdb

    return int(
        duckdb.execute(
            f"SELECT {incremental._OBJECT_HASH} FROM (SELECT $u AS uri, $e AS etag, $s AS size)",
            {"u": uri, "e": etag, "s": size},
        ).fetchone()[0]
    )  # type: ignore[index]


def test_skips_are_the_window_querys_sets_on_ties_errors_runs_and_versions(small: str) -> None:
    tie = {_hash("s3://x/11.jpg", "e11", 100)}
    for model_version, run_id, inc, retry in CASES:
        old_done, old_known = _old_sets(small, 1, model_version, run_id, inc, retry)
        skips = load_skips(small, 1, model_version, run_id, inc, retry)
        try:
            case = (model_version, run_id, inc, retry)
            assert np.array_equal(np.asarray(skips.done), old_done), case
            # The tie's row the old query kept was chance; the sets now never keep it.
            assert np.array_equal(
                np.asarray(skips.known), np.array(sorted(set(old_known.tolist()) - tie), np.uint64)
            ), case
            assert not tie & set(np.asarray(skips.known).tolist()), case
        finally:
            skips.close()


def test_skips_split_a_page_as_before(small: str) -> None:
    page = _page(
        [
            (0, "e0", 100),
            (1, "e1", 100),
            (1, "changed", 100),
            (2, "e2", 100),
            (3, "e3", 100),
            (4, "e4", 100),
            (5, "e5", 100),
            (6, "e6", 100),
            (7, "e7", 100),
            (8, "e8", 100),
            (9, "e9", 100),
            (10, "e10", 100),
            (11, "e11", 100),
            (12, None, None),
            (13, "late", 100),
            (13, "e13", 100),
            (99, "new", 1),
        ]
    )

    def todo(skips: Skips) -> tuple[list[str], int, int]:
        try:
            t, kept, skipped = skips.split(page)
        finally:
            skips.close()
        return [u.rsplit("/", 1)[1] for u in t.column("uri").to_pylist()], kept, skipped

    got = todo(load_skips(small, 1, "v1", "z", True))
    assert got == (["1.jpg", "2.jpg", "5.jpg", "7.jpg", "11.jpg", "13.jpg", "99.jpg"], 2, 8)
    # Built from the old query's arrays: the same, but for the tie, which it kept or not by chance.
    assert todo(Skips(*_old_sets(small, 1, "v1", "z", True, False)))[1:] in ((2, 8), (2, 9))
    assert todo(load_skips(small, 1, "v1", "z", True, retry_errors=True))[1:] == (2, 6)
    every = [f"{i}.jpg" for i in (1, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 13, 99)]
    assert todo(load_skips(small, 1, "v1", "z", False)) == (every, 2, 0)
    assert todo(load_skips(small, None, "v1", "z", True)) == (todo(Skips())[0], 0, 0)


def test_skips_in_many_passes_are_the_skips_in_one(small: str, monkeypatch: pytest.MonkeyPatch) -> None:
    one = load_skips(small, 1, "v1", "z", True)
    # 3 rows a pass: the table's ~30 rows take ~10 ranges of hash(uri), and the second sort as many.
    monkeypatch.setattr(incremental, "_LIMIT_BYTES_PER_ROW", parse_memory_limit("256MB") // 3)
    assert len(incremental._passes(30, parse_memory_limit("256MB"))) == 10
    many = load_skips(small, 1, "v1", "z", True)
    try:
        assert np.array_equal(np.asarray(one.known), np.asarray(many.known)) and one.known.size == 10
        assert np.array_equal(np.asarray(one.done), np.asarray(many.done)) and one.done.size == 2
    finally:
        one.close()
        many.close()


def test_skips_live_in_files_that_close_removes(small: str) -> None:
    skips = load_skips(small, 1, "v1", "z", True)
    assert isinstance(skips.known, np.memmap) and not skips.known.flags.writeable
    folder = Path(skips.known.filename).parent  # type: ignore[arg-type]
    assert sorted(p.name for p in folder.iterdir()) == ["done.u64", "known.u64"]  # the spill is gone already
    skips.close()
    assert not folder.exists() and skips.known.size == 0
    skips.close()  # twice is fine
    arrays = Skips(
        done=np.array([3, 1, 2], np.uint64), known=np.array([9, 7], np.uint64)
    )  # still built from arrays, sorted here
    assert arrays.done.tolist() == [1, 2, 3] and arrays.known.tolist() == [7, 9]
    arrays.close()


def test_skip_memory_limit_values() -> None:
    assert parse_memory_limit("256MB") == 256 * 10**6 and parse_memory_limit("1GiB") == 2**30
    assert parse_memory_limit(" 1.5gb ") == 1_500_000_000
    for bad in ("", "256", "lots", "256 MBs", "-1GB", "1KB"):
        with pytest.raises(DragonsError, match=r"--skip-memory-limit .*(256MB|16MB)"):
            parse_memory_limit(bad)
    with pytest.raises(DragonsError, match="--skip-memory-limit 'x'"):
        load_skips("/nowhere", None, "v1", "z", True, memory_limit="x")


# ---------------------------------------------------------------------------
# Bounded memory, at small scale: 1M rows of one model version at 24 MB, where
# the window query fails (it needs ~32 MB here, ~30 MB more per million rows).

BIG_ROWS = 1_000_000
LIMIT = "24MB"
# The old query in its own process: a DuckDB out-of-memory error in the middle of
# a pyarrow dataset scan can abort the interpreter on its way out.
OLD_PROBE = """
import os, sys
from dragons.score.query import QueryLimits, connect
from dragons.rowerrors import PERMANENT
sql = "SELECT count(*), bit_xor(h) FROM (" + sys.argv[2] + ")"
for limit in ("1GB", sys.argv[3]):
    con = connect(sys.argv[1], limits=QueryLimits(memory_limit=limit, timeout_s=0), commit_log=False)
    try:
        n, x = con.execute(sql, {"v": "v1", "r": "new", "permanent": [k.value for k in PERMANENT]}).fetchone()
        print(limit, "ok", n, x, flush=True)
    except Exception as exc:
        print(limit, "failed", type(exc).__name__, str(exc).splitlines()[0], flush=True)
    con.close()
os._exit(0)
"""


def _big_table(path: str, n: int) -> None:
    """Night 0 scores 90% of n objects; night 1 scores the first 10% again with a new
    etag, every 50th a transient error, every 70th (from the 2nd) a permanent one."""
    from deltalake import write_deltalake

    first = n * 9 // 10

    def rows(idx: np.ndarray, run: str, day: int, etag: str, error: list[str | None]) -> pa.RecordBatch:
        k = len(idx)
        digits = pc.utf8_lpad(pa.array(idx).cast(pa.string()), 8, "0")
        at = pa.array(
            np.full(k, np.datetime64(T0.replace(tzinfo=None)) + np.timedelta64(day, "D")).astype("datetime64[us]")
        )
        return pa.record_batch(
            {
                "uri": pc.binary_join_element_wise(PREFIX, digits, ".jpg", ""),
                "label": pa.array(np.full(k, "ants")),
                "score": pa.array(np.full(k, 0.75)),
                "p_ants": pa.array(np.full(k, 0.75)),
                "p_bees": pa.array(np.full(k, 0.25)),
                "novelty": pa.nulls(k, pa.float64()),
                "model_version": pa.array(np.full(k, "v1")),
                "run_id": pa.array(np.full(k, run)),
                "scored_at": at.cast(pa.timestamp("us", tz="UTC")),
                "error": pa.array(error, pa.string()),
                "error_kind": pa.array([_kind(e) for e in error], pa.string()),
                "etag": pc.binary_join_element_wise(pa.array(idx).cast(pa.string()), etag, ""),
                "size": pa.array(1000 + idx % 50_000),
                "last_modified": at.cast(pa.timestamp("us", tz="UTC")),
                "dt": pa.array(np.full(k, f"2026-11-{28 + day}")),
            },
            schema=schema(CLASSES),
        )

    again = np.arange(n - first)
    kinds = np.full(again.size, None, dtype=object)
    kinds[again % 70 == 1] = "truncated: x"
    kinds[again % 50 == 0] = "read_error: timeout"
    batches = [
        rows(np.arange(first), "night0", 0, "", [None] * first),
        rows(again, "night1", 1, "b", kinds.tolist()),
    ]
    write_deltalake(path, pa.RecordBatchReader.from_batches(schema(CLASSES), iter(batches)), partition_by=["dt"])


def test_skips_fit_a_memory_limit_the_window_query_does_not(tmp_path: Path) -> None:
    table = str(tmp_path / "big")
    _big_table(table, BIG_ROWS)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            OLD_PROBE,
            table,
            OLD_KNOWN.format(kept="error IS NULL OR error_kind IN $permanent"),
            LIMIT,
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    # (DuckDB may draw its progress bar on the same stdout.)
    lines = dict(line.split(" ", 1) for line in probe.stdout.splitlines() if line.startswith(("1GB ", f"{LIMIT} ")))
    assert lines.get(LIMIT, "").startswith("failed OutOfMemoryException Out of Memory Error"), (
        probe.stdout + probe.stderr
    )
    status, count, xor = lines["1GB"].split()
    assert status == "ok"

    skips = load_skips(table, 0, "v1", "new", True, memory_limit=LIMIT)
    try:
        # 900,000 objects, less the 2,000 whose newest row is a transient error.
        assert skips.known.size == int(count) == 898_000
        assert int(np.bitwise_xor.reduce(np.asarray(skips.known))) == int(xor)
        assert skips.done.size == 0
        digits = [f"{i:08d}" for i in (0, 1, 1, 2, 500_000, 999_999)]
        page = pa.table(
            {
                "uri": [f"{PREFIX}{d}.jpg" for d in digits],
                "etag": ["0b", "1b", "1", "2b", "500000", "x"],
                "size": [1000, 1001, 1001, 1002, 1000, 1],
                "last_modified": [T0] * 6,
            },
            schema=LISTING_SCHEMA,
        )
        todo, kept, skipped = skips.split(page)
        # 0: transient error; 1: permanent error (kept) but listed with its old etag too; 2, 500000: unchanged.
        assert [u[-12:-4] for u in todo.column("uri").to_pylist()] == ["00000000", "00000001", "00999999"]
        assert (kept, skipped) == (0, 3)
    finally:
        skips.close()
    resumed = load_skips(table, 0, "v1", "night0", False, memory_limit=LIMIT)
    try:
        assert resumed.done.size == 900_000 and resumed.known.size == 0
    finally:
        resumed.close()
