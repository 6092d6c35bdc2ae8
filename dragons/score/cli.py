"""CLI wiring for scoring, querying, reports, labelling exports and table maintenance
(``dragons score|query|report|export|table``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from dragons.cliargs import Parser, add_config_args, config_from
from dragons.errors import DragonsError
from dragons.runlog import run_log


def get_score_parser(prog: str = "dragons score") -> argparse.ArgumentParser:
    from dragons.score.config import ScoreConfig

    p = Parser(
        prog=prog,
        description="Score every image under a prefix into a Delta Lake table of class probabilities "
        "(committed in parts; running a run id again continues it).",
    )
    add_config_args(
        p.add_argument_group("what to score, and where"),
        ScoreConfig,
        only=(
            "model",
            "input",
            "manifest",
            "inventory",
            "output",
            "run_id",
            "date",
            "replace",
            "incremental",
            "retry_errors",
            "dry_run",
        ),
        required=("model", "output"),
    )
    add_config_args(
        p.add_argument_group("resources and limits"),
        ScoreConfig,
        only=(
            "batch_size",
            "block_rows",
            "actors",
            "use_gpu",
            "gpu_wait_s",
            "decode",
            "tta",
            "max_error_rate",
            "max_pixels",
            "max_bytes",
            "list_concurrency",
            "skip_memory_limit",
            "no_progress_timeout_s",
        ),
    )
    add_config_args(
        p.add_argument_group("table files, report and logs"),
        ScoreConfig,
        only=("commit_every", "commit_interval_s", "file_size_mb", "spool_dir", "report", "progress_s", "log_file"),
    )
    return p


def run_score(cfg: Any) -> dict[str, Any]:
    """``dragons score``: the pipeline, then the run's report (``--report``) and the
    ``--max-error-rate`` rule, once its rows are committed whatever happens here."""
    from dragons.score.pipeline import score

    m = score(cfg)
    if m.get("dry_run"):
        return m
    with run_log(cfg.log_file or os.path.join("logs", f"score-{m['run_id']}.log")):
        report_error = _write_report(cfg, m["run_id"]) if cfg.report else None
        rate = m["errors"] / max(m["rows"], 1)
        if rate > cfg.max_error_rate:
            raise DragonsError(
                f"run {m['run_id']}: error rate {rate:.2%} exceeds --max-error-rate "
                f"{cfg.max_error_rate:.2%} ({m['errors']} of {m['rows']}); the rows are committed, "
                "see the error column"
            )
        if report_error:
            raise report_error
    return m


def _write_report(cfg: Any, run_id: str) -> DragonsError | None:
    """The run's morning report (dragons report) into ``cfg.report``; an error to raise
    once the run is complete (its rows are committed whatever happens here)."""
    from dragons import storage
    from dragons.score.runreport import write_run_report

    try:
        summary = write_run_report(cfg.output, cfg.report, run_id=run_id)
    except Exception as exc:  # noqa: BLE001 (any failure: the table is complete, say how to redo the report)
        return DragonsError(
            f"run {run_id} is complete but its report could not be written to "
            f"{storage.redact(cfg.report)}: {storage.shorten(str(exc), 300)}; write it with "
            f"dragons report --table {storage.redact(cfg.output)} --run-id {run_id} --out DIR"
        )
    drift = (summary.get("drift") or {}).get("js_distance")
    logging.getLogger("dragons.score").info(
        "run %s: report %s (previous run %s, drift %s)",
        run_id,
        storage.join(cfg.report, "index.html"),
        summary.get("previous_run_id") or "none",
        "-" if drift is None else f"{drift:.3f}",
    )
    return None


def score_main(args: argparse.Namespace) -> int:
    from dragons.score.config import ScoreConfig

    m = run_score(config_from(ScoreConfig, args))
    if m.get("dry_run"):
        print(
            f"dry run: listed {m['listed']}  kept {m['kept']}  skipped {m['skipped']}  would score {m['would_score']}  "
            "(nothing written)",
            file=sys.stderr,
        )
        return 0
    print(
        f"listed {m['listed']}  kept {m['kept']}  skipped {m['skipped']}  new {m['new_rows']}  "
        f"-> run {m['run_id']} holds {m['rows']} rows ({m['errors']} errors) in {m['path']} (version {m['version']})"
    )
    return 0


def _table_flag(p: argparse.ArgumentParser | Any) -> None:
    """``--table``: which scores table a reading command opens (query, report, export, table)."""
    p.add_argument("--table", required=True, help="scores table root (path or s3://)")


def _limits_flags(p: argparse.ArgumentParser) -> None:
    """The query limits (memory, threads, --timeout) of every command that reads the table with DuckDB."""
    from dragons.score.query import QueryLimits

    # (memory_flag and memory_advice name a caller's own flag in the error: not flags of these commands.)
    add_config_args(p.add_argument_group("limits"), QueryLimits, only=("memory_limit", "threads", "timeout_s"))


def get_query_parser(prog: str = "dragons query") -> argparse.ArgumentParser:
    from dragons.score.export import FORMATS, TABLE_MAX_ROWS

    p = Parser(
        prog=prog,
        description="Read-only SQL (DuckDB, streamed) over a Delta scores table. Views: `scores` "
        "(every row), `latest` (newest row per uri and model_version), `runs` (one row "
        "per run: status, parts, counts), `commits` (one row per commit).",
    )
    _table_flag(p)
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=FORMATS[0],
        help=f"table: the terminal, first {TABLE_MAX_ROWS:,} rows; csv, json (JSON Lines) and parquet: "
        "every row, streamed",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="write the result to this local file (complete, or not at all) instead of stdout; "
        "required by --format parquet",
    )
    p.add_argument("--as-of", default=None, help="time travel: a table version (e.g. 3) or an ISO timestamp")
    _limits_flags(p)
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


# `dragons report --fail-on-drift X`: the exit status when the class mix drifted more
# than X (2 is every other error), so a CronJob or CI step can tell drift from a failure.
# `--fail-on-novelty X` exits with it too, when more than X of the rows are novel.
DRIFT_EXIT = 3


def get_report_parser(prog: str = "dragons report") -> argparse.ArgumentParser:
    from dragons.score.runreport import ReportOptions

    p = Parser(
        prog=prog,
        description="The morning after a night: an HTML report (index.html, summary.json, plots, "
        "thumbnails) of one scoring run, compared with the complete run before it and "
        "with the training set's class mix.",
    )
    g = p.add_argument_group("which run, and where the report goes")
    _table_flag(g)
    g.add_argument("--run-id", default=None, help="the run to report; default: the table's newest complete run")
    g.add_argument("--out", required=True, metavar="DIR", help="folder for index.html and summary.json (path or s3://)")
    g.add_argument(
        "--fail-on-drift",
        type=float,
        default=None,
        metavar="X",
        help=f"after writing the report, exit {DRIFT_EXIT} when the class mix's Jensen-Shannon distance "
        "from the previous run is above X (0..1); no previous run passes",
    )
    g.add_argument(
        "--fail-on-novelty",
        type=float,
        default=None,
        metavar="X",
        help=f"after writing the report, exit {DRIFT_EXIT} when the share of the run's rows above its "
        "model's novelty threshold (the 95th percentile at training: about 0.05 when nothing "
        "changed) is above X (0..1); a model without novelty statistics passes",
    )
    add_config_args(p.add_argument_group("what the report shows"), ReportOptions)
    _limits_flags(p)
    return p


def report_main(args: argparse.Namespace) -> int:
    from dragons.score.query import QueryLimits
    from dragons.score.runreport import ReportOptions, write_run_report

    if args.fail_on_drift is not None and not 0 <= args.fail_on_drift <= 1:
        raise DragonsError(
            f"--fail-on-drift {args.fail_on_drift:g}: give a Jensen-Shannon distance between 0 and 1 (e.g. 0.1)"
        )
    if args.fail_on_novelty is not None and not 0 <= args.fail_on_novelty <= 1:
        raise DragonsError(
            f"--fail-on-novelty {args.fail_on_novelty:g}: give a share of rows between 0 and 1 (e.g. 0.2)"
        )
    opts = config_from(ReportOptions, args)
    s = write_run_report(
        args.table,
        args.out,
        args.run_id,
        top=opts.top,
        surest=opts.surest,
        bins=opts.bins,
        thumb_px=opts.thumb_px,
        limits=config_from(QueryLimits, args),
        novel=opts.novel,
    )
    js = s["drift"]["js_distance"]
    c = s["counts"]
    print(
        f"run {s['run_id']}: scored {c['scored']}, errors {c['errors']}"
        + (f"; vs {s['previous_run_id']}: class-mix JS distance {js:.3f}" if js is not None else "; no previous run")
        + f" -> {s['report']}"
    )
    novel = _novelty_verdict(s, args.fail_on_novelty)
    if args.fail_on_drift is None:
        return novel
    if js is None:
        print(
            f"note: --fail-on-drift passes: run {s['run_id']} has no previous complete run to compare with",
            file=sys.stderr,
        )
        return 0
    if js > args.fail_on_drift:
        print(
            f"error: run {s['run_id']} drifted from {s['previous_run_id']}: class-mix Jensen-Shannon distance "
            f"{js:.3f} > --fail-on-drift {args.fail_on_drift:g}; see {s['report']} (exit {DRIFT_EXIT})",
            file=sys.stderr,
        )
        return DRIFT_EXIT
    return novel


def _novelty_verdict(s: dict[str, Any], limit: float | None) -> int:
    """``--fail-on-novelty``: DRIFT_EXIT when the run's share of novel rows is above ``limit``, with a line saying so."""
    nov = s.get("novelty") or {}
    if limit is None:
        return 0
    if nov.get("share") is None:
        print(
            f"note: --fail-on-novelty passes: run {s['run_id']} has no novelty scores (its model was trained "
            "without novelty statistics, or the table predates the novelty column)",
            file=sys.stderr,
        )
        return 0
    before = "" if nov.get("previous_share") is None else f"; the previous run had {nov['previous_share']:.1%}"
    if nov["share"] > limit:
        print(
            f"error: run {s['run_id']}: {nov['share']:.1%} of its rows ({nov['above']} of {nov['rows']}) are above "
            f"the model's novelty threshold {nov['threshold_p95']:.3f} > --fail-on-novelty {limit:g}{before}; "
            f"see the most novel images in {s['report']} (exit {DRIFT_EXIT})",
            file=sys.stderr,
        )
        return DRIFT_EXIT
    return 0


def get_export_parser(prog: str = "dragons export") -> argparse.ArgumentParser:
    from dragons.score.labelling import LABEL_FORMATS

    p = Parser(
        prog=prog,
        description="A run's least sure (and/or most novel) images as a labelling batch: Label "
        "Studio tasks with the model's prediction pre-filled, or CSV "
        "(uri,label,score,margin[,novelty]).",
    )
    _table_flag(p)
    p.add_argument("--run-id", required=True, help="the run to take the images from")
    p.add_argument("--uncertain", type=int, default=None, metavar="N", help="how many of its least sure images")
    p.add_argument(
        "--novel",
        type=int,
        default=None,
        metavar="N",
        help="how many of its most novel images (the highest novelty; with --uncertain: added after the "
        "least sure, none twice)",
    )
    p.add_argument(
        "--per-class",
        action="store_true",
        help="balance across predicted classes: N // classes from each, the rest least sure overall",
    )
    p.add_argument("--format", choices=LABEL_FORMATS, default=LABEL_FORMATS[0], help="output format")
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="write to this local file (complete, or not at all) instead of stdout",
    )
    _limits_flags(p)
    return p


def export_main(args: argparse.Namespace) -> int:
    from dragons.score.labelling import write_export
    from dragons.score.query import QueryLimits

    if args.uncertain is None and args.novel is None:
        raise DragonsError(
            "dragons export: say which images: --uncertain N (the least sure), --novel N (the most novel) or both"
        )
    n = write_export(
        args.table,
        args.run_id,
        args.uncertain,
        args.format,
        args.out,
        args.per_class,
        config_from(QueryLimits, args),
        novel=args.novel,
    )
    if args.out:
        print(f"{n} {'tasks' if args.format == 'label-studio' else 'rows'} -> {args.out}", file=sys.stderr)
    return 0


def get_table_parser(prog: str = "dragons table") -> argparse.ArgumentParser:
    from dragons.score.export import TEXT_FORMATS
    from dragons.score.maintenance import MaintenanceConfig

    p = Parser(prog=prog, description="Delta table maintenance: history, vacuum, optimize (compaction).")
    p.add_argument(
        "action",
        choices=["history", "vacuum", "optimize"],
        help="history: the newest commits; vacuum: delete files no version needs; optimize: compact small files",
    )
    _table_flag(p)
    p.add_argument("--format", choices=TEXT_FORMATS, default=TEXT_FORMATS[0], help="output format")
    add_config_args(p, MaintenanceConfig)
    return p


def table_main(args: argparse.Namespace) -> int:
    from dragons.score import maintenance
    from dragons.score.export import format_table

    out = maintenance.run(args.action, args.table, config_from(maintenance.MaintenanceConfig, args))
    print(format_table(out, args.format))
    return 0


COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[Any], int]]] = {
    "score": (get_score_parser, score_main),
    "query": (get_query_parser, query_main),
    "report": (get_report_parser, report_main),
    "export": (get_export_parser, export_main),
    "table": (get_table_parser, table_main),
}
