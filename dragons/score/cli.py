"""CLI wiring for scoring, querying and table maintenance (``dragons score|query|table``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from dragons.cliargs import Parser, add_config_args, config_from

FORMATS = ["table", "csv", "json"]  # dragons query / table output; the first is the default


def get_score_parser(prog: str = "dragons score") -> argparse.ArgumentParser:
    from dragons.capacity import USE_GPU_CHOICES
    from dragons.score.config import DECODE_CHOICES, ScoreConfig

    p = Parser(prog=prog, description="Score every image under a prefix into a Delta Lake table of class probabilities "
                                      "(committed in parts; running a run id again continues it).")
    add_config_args(p.add_argument_group("what to score, and where"), ScoreConfig,
                    only=("model", "input", "manifest", "output", "run_id", "date", "replace", "incremental",
                          "retry_errors", "dry_run"), required=("model", "output"))
    add_config_args(p.add_argument_group("resources and limits"), ScoreConfig,
                    only=("batch_size", "actors", "use_gpu", "gpu_wait_s", "decode", "tta", "max_error_rate",
                          "max_pixels", "max_bytes", "no_progress_timeout_s"),
                    choices={"decode": DECODE_CHOICES, "use_gpu": USE_GPU_CHOICES}, flags={"gpu_wait_s": "--gpu-wait"})
    add_config_args(p.add_argument_group("table files and logs"), ScoreConfig,
                    only=("commit_every", "commit_interval_s", "file_size_mb", "spool_dir", "progress_s", "log_file"),
                    flags={"commit_interval_s": "--commit-interval"})
    return p


def score_main(args: argparse.Namespace) -> int:
    from dragons.score.config import ScoreConfig
    from dragons.score.pipeline import score

    m = score(config_from(ScoreConfig, args))
    if m.get("dry_run"):
        print(f"dry run: listed {m['listed']}  kept {m['kept']}  skipped {m['skipped']}  would score {m['would_score']}  "
              "(nothing written)",
              file=sys.stderr)
        return 0
    print(f"listed {m['listed']}  kept {m['kept']}  skipped {m['skipped']}  new {m['new_rows']}  "
          f"-> run {m['run_id']} holds {m['rows']} rows ({m['errors']} errors) in {m['path']} (version {m['version']})")
    return 0


def _table_args(p: argparse.ArgumentParser) -> None:
    """The flags every table command shares: which table, and how to print what it answers."""
    p.add_argument("--table", required=True, help="table root (path or s3://)")
    p.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="output format")


def get_query_parser(prog: str = "dragons query") -> argparse.ArgumentParser:
    from dragons.score.export import FORMATS as EXPORT_FORMATS, TABLE_MAX_ROWS
    from dragons.score.query import QueryLimits

    p = Parser(prog=prog, description="Read-only SQL (DuckDB, streamed) over a Delta scores table. Views: `scores` "
                                      "(every row), `latest` (newest row per uri and model_version), `runs` (one row "
                                      "per run: status, parts, counts), `commits` (one row per commit).")
    p.add_argument("--table", required=True, help="table root (path or s3://)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
                   help=f"table: the terminal, first {TABLE_MAX_ROWS:,} rows; csv, json (JSON Lines) and parquet: "
                        "every row, streamed")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the result to this local file (complete, or not at all) instead of stdout; "
                        "required by --format parquet")
    p.add_argument("--as-of", default=None, help="time travel: a table version (e.g. 3) or an ISO timestamp")
    add_config_args(p.add_argument_group("limits"), QueryLimits, flags={"timeout_s": "--timeout"})
    p.add_argument("sql", nargs="?", default=None, help="a SELECT; default: one line per run (the `runs` view)")
    return p


def query_main(args: argparse.Namespace) -> int:
    from dragons.score.export import check_target, export
    from dragons.score.query import QueryLimits, stream_sql

    out = check_target(args.format, args.out)  # a wrong --format/--out fails before the table is opened
    try:
        with stream_sql(args.table, args.sql, as_of=args.as_of, limits=config_from(QueryLimits, args)) as reader:
            rows = export(reader, args.format, out)
    except BrokenPipeError:
        # `dragons query ... | head`: the reader has what it wanted. Point stdout at
        # /dev/null so that Python's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if out:
        print(f"{rows} rows -> {out}", file=sys.stderr)
    return 0


def get_table_parser(prog: str = "dragons table") -> argparse.ArgumentParser:
    from dragons.score.maintenance import MaintenanceConfig

    p = Parser(prog=prog, description="Delta table maintenance: history, vacuum, optimize (compaction).")
    p.add_argument("action", choices=["history", "vacuum", "optimize"])
    _table_args(p)
    add_config_args(p, MaintenanceConfig)
    return p


def table_main(args: argparse.Namespace) -> int:
    from dragons.score import maintenance
    from dragons.score.query import format_table

    out = maintenance.run(args.action, args.table, config_from(maintenance.MaintenanceConfig, args))
    print(format_table(out, args.format))
    return 0


COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[Any], int]]] = {
    "score": (get_score_parser, score_main),
    "query": (get_query_parser, query_main),
    "table": (get_table_parser, table_main),
}
