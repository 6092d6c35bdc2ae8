"""CLI wiring for scoring, querying, the demo and the scoring benchmark."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from dragons.cli import _Parser


def _default(name: str) -> Any:
    from dragons.score import ScoreConfig

    return ScoreConfig.__dataclass_fields__[name].default


def get_score_parser(prog: str = "dragons score") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Score every image under a prefix into a Parquet table of class probabilities.")
    p.add_argument("--model", required=True, help="model artifact (path or s3://)")
    p.add_argument("--input", default="", help="prefix to score (path or s3://bucket/prefix)")
    p.add_argument("--manifest", default="", help="Parquet or CSV file with a `uri` column, instead of --input")
    p.add_argument("--output", required=True, help="table root (path or s3://)")
    p.add_argument("--run-id", default="", help="run id; re-using one replaces that run (default: UTC timestamp)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=0, help="scoring actors (0 = sized from the cluster)")
    p.add_argument("--tta", type=int, default=0, help="test-time augmentation views (0 = off)")
    p.add_argument("--max-error-rate", type=float, default=1.0, help="exit non-zero above this share of error rows")
    p.add_argument("--max-pixels", type=int, default=_default("max_pixels"), help="larger images become error rows `too_large`")
    p.add_argument("--max-bytes", type=int, default=_default("max_bytes"), help="larger objects become error rows `too_large`, unread")
    p.add_argument("--rows-per-file", type=int, default=200_000, help="rows per Parquet part file")
    p.add_argument("--log-file", default="", help="progress log (default logs/score-<run_id>.log)")
    return p


def score_main(args: argparse.Namespace) -> int:
    from dragons.score import ScoreConfig, score

    cfg = ScoreConfig(**{k: v for k, v in vars(args).items() if k in ScoreConfig.__dataclass_fields__})
    m = score(cfg)
    print(f"listed {m['listed']}  scored {m['scored']}  errors {m['errors']}  -> {m['path']}")
    return 0


def get_query_parser(prog: str = "dragons query") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Read-only SQL over the committed rows of a scores table (the view is `scores`).")
    p.add_argument("--table", required=True, help="table root (path or s3://)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("sql", nargs="?", default=None, help="a SELECT over `scores`; default: a summary per run")
    return p


def query_main(args: argparse.Namespace) -> int:
    from dragons.query import format_table, run_sql

    print(format_table(run_sql(args.table, args.sql), args.format))
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
}
