"""Benchmarks for the Delta scores table (issue 9).

    python benchmarks/bench_table.py query   [--rows 5000000]   # dragons query peak RSS and time
    python benchmarks/bench_table.py listing [--objects 200000] [--local] # incremental --dry-run driver RSS

query: writes ROWS rows straight through the table writer (no Ray, no model) into
a local Delta table, then runs `dragons query ... GROUP BY label` in a child
process and prints its peak RSS (getrusage of the child) and wall time, against
the 1.5 GB bound.

listing: starts a local S3 endpoint (moto), uploads OBJECTS tiny objects with a
thread pool, commits rows for 3/4 of them (as if scored by the same model
version) straight through the table writer, then runs `dragons score
--incremental --dry-run` in a child process and prints its peak RSS, time and
counts. The dry run lists page by page, filters against the table and prints
the URIs it would score.

With --local the objects are tiny files in a temp folder (same code path after
the page source: os.scandir pages instead of list_objects_v2 pages). moto's
listing cost grows with the bucket (about 0.7 s a 1000-key page at 20k keys,
33 s a page at 200k keys on this machine), so 200k objects are measured locally
and the S3 path at 20k.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RSS_BOUND_MB = 1536  # issue 9: dragons query peak RSS <= 1.5 GB


def _child(
    cmd: list[str], stdout: int | None = subprocess.DEVNULL
) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(peak RSS MB of the child, wall s, result). Children are run one at a time, so
    RUSAGE_CHILDREN's max RSS is this child's."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print(f"warning: child peak RSS not above an earlier child's ({before} KB)", file=sys.stderr)
    return peak / 1024, wall, p


def _write_rows(table: str, n: int, run_id: str, batch: int = 200_000) -> float:
    from dragons.score.table import RunWriter

    t0 = time.perf_counter()
    w = RunWriter(table, run_id, datetime.now(timezone.utc), ["drogon", "viserion"], model_version="bench")
    for start in range(0, n, batch):
        k = min(batch, n - start)
        idx = pa.array(range(start, start + k))
        import pyarrow.compute as pc

        p = pc.divide(pc.cast(pc.bit_wise_and(idx, 1023), pa.float64()), 1023.0)
        w.add(
            pa.table(
                {
                    "uri": pc.binary_join_element_wise(
                        "s3://archive/2026-11-28/img_", pc.cast(idx, pa.string()), ".jpg", ""
                    ),
                    "label": pc.if_else(pc.greater(p, 0.5), "drogon", "viserion"),
                    "score": pc.max_element_wise(p, pc.subtract(1.0, p)),
                    "p_drogon": p,
                    "p_viserion": pc.subtract(1.0, p),
                    "error": pa.nulls(k, pa.string()),
                    "etag": pc.cast(idx, pa.string()),
                    "size": pa.array([50_000] * k, pa.int64()),
                }
            )
        )
    w.commit({"listed": n, "skipped": 0, "model_version": "bench", "input": "bench"})
    return time.perf_counter() - t0


def bench_query(rows: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-table-") as tmp:
        table = os.path.join(tmp, "scores")
        per_run = rows // 5  # five nightly runs
        t_write = sum(_write_rows(table, per_run, f"night{i}") for i in range(5))
        sql = "SELECT label, count(*) AS n FROM scores GROUP BY label ORDER BY label"
        peak, wall, p = _child(
            [sys.executable, "-m", "dragons.cli", "query", "--table", table, "--format", "json", sql],
            stdout=subprocess.PIPE,
        )
        assert p.returncode == 0, p.stderr
        counts = {json.loads(line)["label"]: json.loads(line)["n"] for line in p.stdout.splitlines()}
        assert sum(counts.values()) == per_run * 5, counts
        peak_l, wall_l, p2 = _child(
            [
                sys.executable,
                "-m",
                "dragons.cli",
                "query",
                "--table",
                table,
                "SELECT count(*) FROM latest WHERE model_version = 'bench'",
            ],
            stdout=subprocess.PIPE,
        )
        assert p2.returncode == 0, p2.stderr
        size_mb = sum(f.stat().st_size for f in Path(table).rglob("*") if f.is_file()) / 2**20
    return {
        "bench": "query",
        "rows": per_run * 5,
        "table_mb": round(size_mb, 1),
        "write_s": round(t_write, 1),
        "query_group_by_label_s": round(wall, 2),
        "query_peak_rss_mb": round(peak),
        "bound_mb": RSS_BOUND_MB,
        "within_bound": peak <= RSS_BOUND_MB,
        "counts": counts,
        "latest_count_s": round(wall_l, 2),
        "latest_peak_rss_mb": round(peak_l),
    }


def bench_listing(objects: int, threads: int = 32, local: bool = False) -> dict[str, object]:
    from dragons import storage
    from dragons.local import s3server
    from dragons.score.listing import iter_listing

    server = None if local else s3server.start()
    tmpdir = tempfile.TemporaryDirectory(prefix="bench-listing-")
    try:
        bucket = "bench-listing"
        if server is not None:
            server.apply_env()
            s3server.create_bucket(bucket)
            client = storage.boto3_client(max_pool_connections=threads)

        def put(i: int) -> None:
            key = f"archive/2026-11-{i % 28 + 1:02d}/img_{i:07d}.jpg"
            if local:
                path = Path(tmpdir.name, key)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"x" * (i % 7 + 1))
            else:
                client.put_object(Bucket=bucket, Key=key, Body=b"x" * (i % 7 + 1))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(1 if local else threads) as pool:
            list(pool.map(put, range(objects), chunksize=256))
        t_upload = time.perf_counter() - t0
        archive = os.path.join(tmpdir.name, "archive") if local else f"s3://{bucket}/archive"

        # The table already holds 3/4 of the objects, scored by this model version.
        from dragons.score.table import RunWriter

        table = os.path.join(tmpdir.name, "tables", "scores") if local else f"s3://{bucket}/tables/scores"
        known = objects * 3 // 4
        t0 = time.perf_counter()
        w = RunWriter(table, "night1", datetime.now(timezone.utc), ["drogon", "viserion"], model_version="bench-v1")
        seen = 0
        for page in iter_listing(archive):
            take = page.slice(0, max(0, min(page.num_rows, known - seen)))
            seen += take.num_rows
            if take.num_rows:
                w.add(
                    take.select(["uri", "etag", "size", "last_modified"]).append_column(
                        "label", pa.array(["drogon"] * take.num_rows)
                    )
                )
        w.commit({"listed": known, "skipped": 0, "model_version": "bench-v1"})
        t_table = time.perf_counter() - t0

        with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
            Path(tmp, "model.json").write_text(
                json.dumps(
                    {
                        "classes": ["drogon", "viserion"],
                        "version": "bench-v1",
                        "arch": "efficientnet_lite0",
                        "image_size": 224,
                    }
                )
            )
            peak, wall, p = _child(
                [
                    sys.executable,
                    "-m",
                    "dragons.cli",
                    "score",
                    "--model",
                    tmp,
                    "--input",
                    archive,
                    "--output",
                    table,
                    "--incremental",
                    "--dry-run",
                    "--log-file",
                    os.path.join(tmp, "dry.log"),
                ],
                stdout=subprocess.PIPE,
            )
            run_log = Path(tmp, "dry.log").read_text() if Path(tmp, "dry.log").exists() else ""
        assert p.returncode == 0, p.stderr
        would = len(p.stdout.splitlines())
        assert would == objects - known, (would, objects - known, p.stderr[-500:])
        summary = p.stderr.strip().splitlines()[-1]
        rss_line = next(
            (ln.split(" INFO ", 1)[-1] for ln in run_log.splitlines() if "listing done" in ln), ""
        )  # a log-only line
        base = subprocess.run(
            [
                sys.executable,
                "-c",
                "import resource, dragons.score.pipeline, dragons.score.incremental, deltalake, duckdb; "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
            ],
            capture_output=True,
            text=True,
        )
        base_peak = (
            int(base.stdout.strip()) / 1024
        )  # the driver's imports alone (torch, ray, pyarrow, duckdb, deltalake)
    finally:
        if server is not None:
            server.stop()
        tmpdir.cleanup()
    return {
        "bench": "incremental_dry_run",
        "source": "local folder" if local else "local S3 (moto)",
        "objects": objects,
        "driver_rss_after_listing": rss_line.strip(),
        "imports_only_peak_rss_mb": round(base_peak),
        "upload_s": round(t_upload, 1),
        "upload_objects_per_s": round(objects / t_upload),
        "table_rows": known,
        "table_write_s": round(t_table, 1),
        "dry_run_s": round(wall, 1),
        "dry_run_driver_peak_rss_mb": round(peak),
        "would_score": would,
        "summary": summary,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["query", "listing"])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--objects", type=int, default=200_000)
    ap.add_argument("--local", action="store_true", help="tiny files in a temp folder instead of the local S3 endpoint")
    args = ap.parse_args()
    out = bench_query(args.rows) if args.which == "query" else bench_listing(args.objects, local=args.local)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
