"""CLI wiring for scoring, querying, the demo and the scoring benchmark."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from dragons.cli import _Parser


def get_score_parser(prog: str = "dragons score") -> argparse.ArgumentParser:
    from dragons.score import ScoreConfig

    d = ScoreConfig()  # defaults live on the config
    p = _Parser(prog=prog, description="Score every image under a prefix into a Delta Lake table of class probabilities "
                                       "(one run = one table version).")
    p.add_argument("--model", required=True, help="model artifact (path or s3://)")
    p.add_argument("--input", default="", help="prefix to score (path or s3://bucket/prefix)")
    p.add_argument("--manifest", default="", help="Parquet or CSV file with a `uri` column, instead of --input")
    p.add_argument("--output", required=True, help="table root (path or s3://)")
    p.add_argument("--run-id", default="", help="run id; re-using one replaces that run (default: UTC timestamp)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=0, help="scoring actors (0 = sized from the cluster)")
    p.add_argument("--tta", type=int, default=0, help="test-time augmentation views (0 = off)")
    p.add_argument("--max-error-rate", type=float, default=1.0, help="exit non-zero above this share of error rows")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="larger images become error rows `too_large`")
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="larger objects become error rows `too_large`, unread")
    p.add_argument("--incremental", action="store_true",
                   help="score only objects new or changed (etag/size) since this model version's rows in the table")
    p.add_argument("--dry-run", action="store_true", help="print the URIs that would be scored and the counts; write nothing")
    p.add_argument("--file-size-mb", type=int, default=d.file_size_mb, help="target data file size (0 = delta-rs default)")
    p.add_argument("--spool-dir", default=d.spool_dir, help="local folder for the run's rows before the commit (default: temp dir)")
    p.add_argument("--log-file", default="", help="progress log (default logs/score-<run_id>.log)")
    return p


def score_main(args: argparse.Namespace) -> int:
    from dragons.score import ScoreConfig, score

    cfg = ScoreConfig(**{k: v for k, v in vars(args).items() if k in ScoreConfig.__dataclass_fields__})
    m = score(cfg)
    if m.get("dry_run"):
        print(f"dry run: listed {m['listed']}  skipped {m['skipped']}  would score {m['would_score']}  (nothing written)",
              file=sys.stderr)
        return 0
    print(f"listed {m['listed']}  skipped {m['skipped']}  scored {m['scored']}  errors {m['errors']}  "
          f"-> {m['path']} (version {m['version']})")
    return 0


def get_query_parser(prog: str = "dragons query") -> argparse.ArgumentParser:
    from dragons.query import QueryLimits

    d = QueryLimits()
    p = _Parser(prog=prog, description="Read-only SQL (DuckDB, streamed) over a Delta scores table. Views: `scores` "
                                       "(every row), `latest` (newest row per uri and model_version), `runs` (commit log).")
    p.add_argument("--table", required=True, help="table root (path or s3://)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--as-of", default=None, help="time travel: a table version (e.g. 3) or an ISO timestamp")
    p.add_argument("--memory-limit", default=d.memory_limit, help="DuckDB memory limit (e.g. 1GB)")
    p.add_argument("--threads", type=int, default=d.threads, help="DuckDB threads")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds before the query is stopped (0 = none)")
    p.add_argument("sql", nargs="?", default=None, help="a SELECT; default: one line per run from the commit log")
    return p


def query_main(args: argparse.Namespace) -> int:
    from dragons.query import QueryLimits, format_table, run_sql

    limits = QueryLimits(memory_limit=args.memory_limit, threads=args.threads, timeout_s=args.timeout)
    print(format_table(run_sql(args.table, args.sql, as_of=args.as_of, limits=limits), args.format))
    return 0


def get_table_parser(prog: str = "dragons table") -> argparse.ArgumentParser:
    from dragons.maintenance import MaintenanceConfig

    d = MaintenanceConfig()
    p = _Parser(prog=prog, description="Delta table maintenance: history, vacuum, optimize (compaction).")
    p.add_argument("action", choices=["history", "vacuum", "optimize"])
    p.add_argument("--table", required=True, help="table root (path or s3://)")
    p.add_argument("--limit", type=int, default=d.limit, help="history: newest N commits (0 = all)")
    p.add_argument("--retention-hours", type=float, default=d.retention_hours,
                   help="vacuum: keep unreferenced files younger than this (time travel needs them)")
    p.add_argument("--dry-run", action="store_true", help="vacuum: list what would be deleted")
    p.add_argument("--target-size-mb", type=int, default=d.target_size_mb, help="optimize: target file size")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    return p


def table_main(args: argparse.Namespace) -> int:
    from dragons import maintenance
    from dragons.query import format_table

    cfg = maintenance.MaintenanceConfig(limit=args.limit, retention_hours=args.retention_hours, dry_run=args.dry_run,
                                        target_size_mb=args.target_size_mb)
    out = maintenance.run(args.action, args.table, cfg)
    print(format_table(out, args.format))
    return 0


def get_demo_parser(prog: str = "dragons demo") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="End to end on embedded defaults: local S3, draw data, train, score, query.")
    p.add_argument("--data", default="", help="use this image folder (path or s3://) instead of drawing dragons")
    p.add_argument("--workdir", default="dragons_demo", help="local folder for drawn data and logs")
    p.add_argument("--epochs", type=int, default=1, help="unfrozen fine-tuning epochs")
    return p


def demo_main(args: argparse.Namespace) -> int:
    from dragons.demo import run_demo

    run_demo(args.data, args.workdir, args.epochs)
    return 0


COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[Any], int]]] = {
    "score": (get_score_parser, score_main),
    "query": (get_query_parser, query_main),
    "demo": (get_demo_parser, demo_main),
    "table": (get_table_parser, table_main),
}
