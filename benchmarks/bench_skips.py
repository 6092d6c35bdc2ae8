"""The resume and --incremental skip sets at scale (issue 28, item 4).

    python benchmarks/bench_skips.py --n 10000000      # the issue's figures (minutes, CPU heavy)
    python benchmarks/bench_skips.py --n 10000         # seconds: the test suite's size

Builds (once, cached under --work) a Delta table of N rows of one model version
with 70-character uris: night0 scores 90% of N objects, night1 scores the first
10% again with a new etag, every 50th a transient error and every 70th a
permanent one. Then, in one run:

* **today's query shape** (the window over every row, `dragons query`'s
  connection) at --limit, in a child process: ok, or how it fails;
* the new ``load_skips`` for an ``--incremental`` run at --limit: wall time,
  peak RSS of this process, peak machine memory above idle (MemTotal -
  MemAvailable, sampled every 0.2 s), peak temporary disk, and then the
  membership time for N listed rows in pages of --page-rows;
* a resume (this run's own rows) at --limit;
* both shapes again at --tight-limit, where the window query runs out of memory
  and the new sets do not.

The counts are checked against what the table was built to hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# 58 characters + 8 digits + ".jpg": 70-character uris.
PREFIX = "s3://dragons-archive-prod/photos/2026/11/28/camera-07/img_"
T0_US = 1_795_838_400_000_000  # 2026-11-28T02:00:00Z
DAY_US = 86_400_000_000
CLASSES = ["ants", "bees"]
BUILD_ROWS = 1_000_000  # rows per batch written: the build holds one batch at a time

# Today's query (before issue 28), as `dragons query` would run it, in its own process: a
# DuckDB out-of-memory error in the middle of a pyarrow dataset scan can abort the
# interpreter on its way out, and its memory must not count as this process's.
OLD_PROBE = """
import json, os, resource, sys, time
from dragons.score.query import QueryLimits, connect
from dragons.score.incremental import PERMANENT_ERRORS
sql = ("SELECT count(*) FROM (SELECT uri, etag, size, error FROM scores WHERE model_version = $v AND run_id <> $r "
       "QUALIFY row_number() OVER (PARTITION BY uri ORDER BY scored_at DESC, run_id DESC) = 1) "
       "WHERE error IS NULL OR split_part(error, ':', 1) IN $permanent")
con = connect(sys.argv[1], limits=QueryLimits(memory_limit=sys.argv[2], timeout_s=0), commit_log=False)
t0 = time.perf_counter()
try:
    n = con.execute(sql, {"v": "v1", "r": "bench-new", "permanent": list(PERMANENT_ERRORS)}).fetchone()[0]
    out = {"status": "ok", "known": n}
except Exception as exc:
    out = {"status": "failed", "error": type(exc).__name__ + ": " + str(exc).splitlines()[0]}
out["seconds"] = round(time.perf_counter() - t0, 1)
out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000, help="rows of the model version in the table")
    p.add_argument("--limit", default="256MB", help="--skip-memory-limit (and today's query's memory_limit)")
    p.add_argument("--tight-limit", default="64MB", help="a limit the window query cannot meet at 10M rows ('' = skip)")
    p.add_argument("--page-rows", type=int, default=4096, help="rows per listing page in the membership test")
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "dragons-bench-skips"),
        help="folder for the cached table and the skip sets' temporary files",
    )
    p.add_argument("--json", default="", help="write the figures here")
    return p


def _meminfo_used_mb() -> float:
    """MemTotal - MemAvailable in MB (bench_driver's measure: Ray's shared memory counts)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_driver import meminfo_used_mb  # type: ignore[import-not-found]

    return float(meminfo_used_mb())


def _disk_mb(folder: Path) -> float:
    """Bytes on disk (allocated blocks) under ``folder``."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:  # DuckDB removes spill files as it goes
                pass
    return total / 2**20


class Sampler:
    """Peak RSS of this process (all, and less mapped files), peak machine memory (MemTotal - MemAvailable) and
    peak temporary disk under ``tmp``, sampled every 0.2 s while running."""

    def __init__(self, tmp: Path, every_s: float = 0.2) -> None:
        import psutil

        self.proc, self.tmp, self.every_s = psutil.Process(), tmp, every_s
        self.idle_mb = _meminfo_used_mb()
        self.peak_rss_mb = self.peak_anon_mb = self.peak_used_mb = self.peak_disk_mb = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            mem = self.proc.memory_info()
            self.peak_rss_mb = max(self.peak_rss_mb, mem.rss / 2**20)
            # Less the mapped files (the hash files, in the page cache): what the kernel cannot reclaim.
            self.peak_anon_mb = max(self.peak_anon_mb, (mem.rss - mem.shared) / 2**20)
            self.peak_used_mb = max(self.peak_used_mb, _meminfo_used_mb())
            self.peak_disk_mb = max(self.peak_disk_mb, _disk_mb(self.tmp))
            self._stop.wait(self.every_s)

    def __enter__(self) -> Self:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def figures(self) -> dict[str, float]:
        return {
            "peak_rss_mb": round(self.peak_rss_mb),
            "peak_rss_anon_mb": round(self.peak_anon_mb),
            "peak_above_idle_mb": round(self.peak_used_mb - self.idle_mb),
            "peak_temp_disk_mb": round(self.peak_disk_mb),
        }


def _uris(idx: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(PREFIX, pc.utf8_lpad(pa.array(idx).cast(pa.string()), 8, "0"), ".jpg", "")


def _etags(idx: np.ndarray, suffix: str) -> pa.Array:
    return pc.binary_join_element_wise(pa.array(idx).cast(pa.string()), suffix, "")


def _sizes(idx: np.ndarray) -> pa.Array:
    return pa.array(1000 + idx % 50_000)


def _rows(idx: np.ndarray, run_id: str, day: int, etag: str, error: pa.Array) -> pa.RecordBatch:
    from dragons.score.schema import schema

    k = idx.size
    at = pa.array(np.full(k, T0_US + day * DAY_US, dtype=np.int64)).cast(pa.timestamp("us", tz="UTC"))
    p = (idx % 997) / 997.0
    return pa.record_batch(
        {
            "uri": _uris(idx),
            "label": pa.array(np.where(p > 0.5, "ants", "bees")),
            "score": pa.array(np.maximum(p, 1 - p)),
            "p_ants": pa.array(p),
            "p_bees": pa.array(1 - p),
            "novelty": pa.nulls(k, pa.float64()),
            "model_version": pa.array(np.full(k, "v1")),
            "run_id": pa.array(np.full(k, run_id)),
            "scored_at": at,
            "error": error,
            # The kind as the scorer writes it (dragons.rowerrors): the text before the ':'.
            "error_kind": pc.list_element(pc.split_pattern(error, ":", max_splits=1), 0),
            "etag": _etags(idx, etag),
            "size": _sizes(idx),
            "last_modified": at,
            "dt": pa.array(np.full(k, f"2026-11-{28 + day}")),
        },
        schema=schema(CLASSES),
    )


def _errors(again: np.ndarray) -> pa.Array:
    kinds = np.full(again.size, None, dtype=object)
    kinds[again % 70 == 1] = "truncated: image file is truncated"  # permanent: stays known
    kinds[again % 50 == 0] = "read_error: timeout"  # transient: scored again
    return pa.array(kinds.tolist(), pa.string())


def build_table(work: Path, n: int) -> str:
    """The table of ``n`` rows (night0: 90% of the objects; night1: the first 10% again), reused when there."""
    from deltalake import write_deltalake

    from dragons.score.schema import schema

    root = work / f"table-{n}"
    done = work / f"table-{n}.done"
    if done.exists():
        return str(root)
    first = n * 9 // 10

    def batches() -> Any:
        for a in range(0, first, BUILD_ROWS):
            idx = np.arange(a, min(first, a + BUILD_ROWS))
            yield _rows(idx, "night0", 0, "", pa.nulls(idx.size, pa.string()))
        for a in range(0, n - first, BUILD_ROWS):
            idx = np.arange(a, min(n - first, a + BUILD_ROWS))
            yield _rows(idx, "night1", 1, "b", _errors(idx))

    t0 = time.perf_counter()
    write_deltalake(
        str(root), pa.RecordBatchReader.from_batches(schema(CLASSES), batches()), partition_by=["dt"], mode="overwrite"
    )
    done.write_text(str(n))
    print(f"built a table of {n:,} rows in {time.perf_counter() - t0:.0f}s under {root}", flush=True)
    return str(root)


def expected(n: int) -> dict[str, int]:
    """What the table was built to hold, for a run `bench-new` of model v1 listing objects 0..n-1."""
    first = n * 9 // 10
    transient = len(range(0, n - first, 50))
    return {
        "known": first - transient,
        "done_night0": first,
        "skipped": first - transient,
        "to_score": n - first + transient,
    }


def old_query(table: str, limit: str) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", OLD_PROBE, table, limit],
        check=False,
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"limit": limit, **json.loads(line[len("RESULT ") :])}
    return {"limit": limit, "status": "crashed", "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}


def load(table: str, tmp: Path, run_id: str, incremental: bool, limit: str) -> tuple[Any, dict[str, Any]]:
    from dragons.errors import DragonsError
    from dragons.score.incremental import load_skips

    with Sampler(tmp) as s:
        t0 = time.perf_counter()
        try:
            skips = load_skips(table, 0, "v1", run_id, incremental, memory_limit=limit)
            status = "ok"
        except DragonsError as exc:
            skips, status = None, f"failed: {exc}"
        wall = time.perf_counter() - t0
    fig: dict[str, Any] = {"limit": limit, "status": status, "seconds": round(wall, 1), **s.figures()}
    if skips is not None:
        fig.update(done=int(skips.done.size), known=int(skips.known.size))
    return skips, fig


def membership(skips: Any, n: int, page_rows: int, tmp: Path) -> dict[str, Any]:
    """``Skips.split`` over ``n`` listed objects (0..n-1, each with the etag it has now), in pages."""
    from dragons.score.schema import LISTING_SCHEMA

    first = n * 9 // 10
    changed = n - first  # night1 rescored objects 0..changed-1 with etag "<i>b"
    spent = 0.0
    kept = skipped = todo = 0
    lm = pa.array(np.full(page_rows, T0_US, dtype=np.int64)).cast(pa.timestamp("us", tz="UTC"))
    with Sampler(tmp) as s:
        for start in range(0, n, page_rows):
            idx = np.arange(start, min(n, start + page_rows))
            etags = pc.if_else(pa.array(idx < changed), _etags(idx, "b"), _etags(idx, ""))
            page = pa.table([_uris(idx), etags, _sizes(idx), lm.slice(0, idx.size)], schema=LISTING_SCHEMA)
            t0 = time.perf_counter()
            t, k, sk = skips.split(page)
            spent += time.perf_counter() - t0
            kept, skipped, todo = kept + k, skipped + sk, todo + t.num_rows
    return {
        "rows": n,
        "page_rows": page_rows,
        "seconds": round(spent, 2),
        "rows_per_s": round(n / max(spent, 1e-9)),
        "us_per_page": round(1e6 * spent / max(1, -(-n // page_rows)), 1),
        "kept": kept,
        "skipped": skipped,
        "to_score": todo,
        **s.figures(),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    from dragons.score.incremental import _passes, parse_memory_limit

    work = Path(args.work)
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(tmp)  # load_skips' private folder lands here, where the sampler sees its size
    table = build_table(work, args.n)
    want = expected(args.n)
    out: dict[str, Any] = {"n": args.n, "load_average": os.getloadavg()}
    print(
        f"{args.n:,} rows of one model version; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
        f"the sort takes {len(_passes(args.n, parse_memory_limit(args.limit)))} pass(es) at {args.limit}",
        flush=True,
    )

    out["old"] = [old_query(table, args.limit)]
    print(f"today's window query at {args.limit}: {json.dumps(out['old'][0])}", flush=True)

    skips, fig = load(table, tmp, "bench-new", True, args.limit)
    print(f"load_skips --incremental at {args.limit}: {json.dumps(fig)}", flush=True)
    out["incremental"] = fig
    assert skips is not None, fig
    assert fig["known"] == want["known"], (fig, want)
    try:
        out["membership"] = membership(skips, args.n, args.page_rows, tmp)
    finally:
        skips.close()
    print(f"membership: {json.dumps(out['membership'])}", flush=True)
    assert (out["membership"]["skipped"], out["membership"]["to_score"]) == (want["skipped"], want["to_score"])

    resumed, fig = load(table, tmp, "night0", False, args.limit)
    print(f"load_skips resume (run night0) at {args.limit}: {json.dumps(fig)}", flush=True)
    out["resume"] = fig
    assert resumed is not None and fig["done"] == want["done_night0"], fig
    resumed.close()

    if args.tight_limit:
        out["old"].append(old_query(table, args.tight_limit))
        print(f"today's window query at {args.tight_limit}: {json.dumps(out['old'][-1])}", flush=True)
        tight, fig = load(table, tmp, "bench-new", True, args.tight_limit)
        print(f"load_skips --incremental at {args.tight_limit}: {json.dumps(fig)}", flush=True)
        out["tight"] = fig
        if tight is not None:
            assert fig["known"] == want["known"], fig
            tight.close()
    left = list(tmp.iterdir())
    assert not left, f"temporary files left behind: {left}"
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
