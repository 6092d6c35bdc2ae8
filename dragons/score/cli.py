"""CLI wiring for scoring, querying and table maintenance (``dragons score|query|table``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from dragons.cliargs import Parser, add_config_args, config_from

FORMATS = ["table", "csv", "json"]  # dragons query / table output; the first is the default


def get_score_parser(prog: str = "dragons score") -> argparse.ArgumentParser:
    from dragons.score.config import DECODE_CHOICES, ScoreConfig

    p = Parser(prog=prog, description="Score every image under a prefix into a Delta Lake table of class probabilities "
                                      "(one run = one table version).")
    add_config_args(p.add_argument_group("what to score, and where"), ScoreConfig,
                    only=("model", "input", "manifest", "output", "run_id", "incremental", "dry_run"), required=("model", "output"))
    add_config_args(p.add_argument_group("resources and limits"), ScoreConfig,
                    only=("batch_size", "actors", "decode", "tta", "max_error_rate", "max_pixels", "max_bytes",
                          "no_progress_timeout_s"), choices={"decode": DECODE_CHOICES})
    add_config_args(p.add_argument_group("table files and logs"), ScoreConfig,
                    only=("file_size_mb", "spool_dir", "progress_s", "log_file"))
    return p


def score_main(args: argparse.Namespace) -> int:
    from dragons.score.config import ScoreConfig
    from dragons.score.pipeline import score

    m = score(config_from(ScoreConfig, args))
    if m.get("dry_run"):
        print(f"dry run: listed {m['listed']}  skipped {m['skipped']}  would score {m['would_score']}  (nothing written)",
              file=sys.stderr)
        return 0
    print(f"listed {m['listed']}  skipped {m['skipped']}  scored {m['scored']}  errors {m['errors']}  "
          f"-> {m['path']} (version {m['version']})")
    return 0


def _table_args(p: argparse.ArgumentParser) -> None:
    """The flags every table command shares: which table, and how to print what it answers."""
    p.add_argument("--table", required=True, help="table root (path or s3://)")
    p.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="output format")


def get_query_parser(prog: str = "dragons query") -> argparse.ArgumentParser:
    from dragons.score.query import QueryLimits

    p = Parser(prog=prog, description="Read-only SQL (DuckDB, streamed) over a Delta scores table. Views: `scores` "
                                      "(every row), `latest` (newest row per uri and model_version), `runs` (commit log).")
    _table_args(p)
    p.add_argument("--as-of", default=None, help="time travel: a table version (e.g. 3) or an ISO timestamp")
    add_config_args(p.add_argument_group("limits"), QueryLimits, flags={"timeout_s": "--timeout"})
    p.add_argument("sql", nargs="?", default=None, help="a SELECT; default: one line per run from the commit log")
    return p


def query_main(args: argparse.Namespace) -> int:
    from dragons.score.query import QueryLimits, format_table, run_sql

    limits = config_from(QueryLimits, args)
    print(format_table(run_sql(args.table, args.sql, as_of=args.as_of, limits=limits), args.format))
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
