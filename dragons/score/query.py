"""``dragons query``: read-only SQL (DuckDB) over a Delta scores table, streamed.

The Delta table (its files as of the chosen version) becomes a pyarrow dataset
registered in DuckDB: DuckDB pulls record batches on demand and pushes column
selection and filters into the scan, so memory does not grow with the table.
We use the pyarrow dataset rather than DuckDB's ``delta_scan`` so that the
table is read by Python (delta-rs' object store) and DuckDB itself can be
locked down: no external access, no file reads or writes from SQL, only SELECT.

Views: ``scores`` (every row), ``latest`` (the newest row per uri and
model_version), ``runs`` (one row per run: status, parts, counts) and
``commits`` (one row per commit), both from the Delta log.

The result streams too: :func:`stream_sql` hands out DuckDB's result as Arrow
record batches pulled on demand (``dragons.score.export`` writes them as CSV,
JSON Lines or Parquet), so only DuckDB's own working memory, bounded by
``--memory-limit``, and one batch are ever held.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from dragons import storage
from dragons.errors import DragonsError
from dragons.score import export
from dragons.score.engine import QueryLimits, connect_table, guarded, sql_error  # QueryLimits: callers' too
from dragons.score.schema import COMMIT_COLUMNS, RUN_COLUMNS, SUMMARY_SQL

# Rows per record batch handed out by stream_sql: big enough for Parquet row
# groups and fast CSV, small enough (a few MB of Arrow) to be nothing beside DuckDB's memory.
BATCH_ROWS = 65_536


def parse_as_of(value: str | None) -> int | datetime | None:
    """``--as-of``: a table version (integer) or an ISO-8601 timestamp."""
    if value is None or value == "":
        return None
    if value.isdigit():
        return int(value)
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise DragonsError(
            f"--as-of {value!r}: give a table version (e.g. 3) or an ISO timestamp (e.g. 2026-11-28T02:00:00Z)"
        ) from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts


def _log_tables(root: str) -> tuple[pa.Table, pa.Table]:
    """The ``commits`` and ``runs`` views' tables, from one read of the commit log."""
    from dragons.score.table import run_history, runs_summary

    with storage.delta_errors(root, "read"):
        commits = run_history(root)
    runs = runs_summary(commits)

    def table(rows: list[dict[str, Any]], cols: dict[str, pa.DataType]) -> pa.Table:
        return pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in cols.items()})

    return table(commits, COMMIT_COLUMNS), table(runs, RUN_COLUMNS)


def connect(
    root: str, as_of: int | datetime | None = None, limits: QueryLimits | None = None, commit_log: bool = True
) -> Any:
    """The table's locked-down DuckDB connection (``engine.connect_table``: views ``scores``,
    ``latest``) and with ``commit_log`` ``runs`` and ``commits`` (they read the whole Delta
    log: callers that only scan rows leave them out)."""
    # The log first: a table that cannot be opened fails before a connection exists.
    logs = _log_tables(root) if commit_log else None
    con = connect_table(root, limits, as_of)
    if logs is not None:
        con.register("commits", logs[0])
        con.register("runs", logs[1])
    return con


def _check_read_only(con: Any, sql: str) -> None:
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise DragonsError(f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise DragonsError("no SQL statement given")
    for st in statements:
        if st.type != duckdb.StatementType.SELECT:
            raise DragonsError(
                f"the table is opened read-only: {st.type.name} statements are refused; "
                "only SELECT queries run (against the views `scores`, `latest`, `runs`)"
            )


@contextlib.contextmanager
def stream_sql(
    table_uri: str,
    sql: str | None = None,
    as_of: int | datetime | str | None = None,
    limits: QueryLimits | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pa.RecordBatchReader]:
    """The result of ``sql`` (default: one row per run) as a reader of Arrow record batches.

    DuckDB computes batches as the reader asks for them (a streaming result),
    so a result of any size passes through in ``batch_rows`` pieces; operators
    that must see everything first (ORDER BY, window functions) stay within
    ``--memory-limit`` or fail with the error that names it. A failure while
    reading (a limit, the timeout) is raised by the reader as a DragonsError.
    The reader is valid inside the ``with`` block only: leaving it closes DuckDB.
    """
    import duckdb

    limits = limits or QueryLimits()
    if isinstance(as_of, str):
        as_of = parse_as_of(as_of)
    con = connect(table_uri, as_of, limits)
    try:
        query = sql or SUMMARY_SQL
        _check_read_only(con, query)
        # The deadline covers the reading too (see engine.deadline): the whole block is guarded.
        with guarded(con, limits) as timed_out:
            # A blocking query (ORDER BY, aggregates) runs here; a pipeline, batch by batch.
            source = con.sql(query).to_arrow_reader(batch_rows)

            def batches() -> Iterator[pa.RecordBatch]:
                while True:
                    try:
                        batch = source.read_next_batch()
                    except StopIteration:
                        return
                    except (duckdb.Error, pa.ArrowException) as exc:
                        raise sql_error(exc, limits, timed_out) from None
                    yield batch

            yield pa.RecordBatchReader.from_batches(source.schema, batches())
    finally:
        con.close()


def run_sql(
    table_uri: str, sql: str | None = None, as_of: int | datetime | str | None = None, limits: QueryLimits | None = None
) -> pa.Table:
    """The whole result as one table: for results known to be small (tests,
    summaries). Exports stream instead (:func:`stream_sql`)."""
    with stream_sql(table_uri, sql, as_of, limits) as reader:
        return reader.read_all()


def format_table(t: pa.Table, fmt: str = "table", max_rows: int = 10_000) -> str:
    """``t`` as text in ``fmt`` (table, csv or json): every row, except that the
    terminal ``table`` shows at most ``max_rows`` and then says so on stderr."""
    reader = pa.RecordBatchReader.from_batches(t.schema, t.to_batches())
    if fmt == "table":
        text = io.StringIO()
        export.write_table(reader, text, max_rows=max_rows, note=sys.stderr)
        return text.getvalue().rstrip("\n")
    data = io.BytesIO()
    export.WRITERS[fmt](reader, data)
    return data.getvalue().decode("utf-8").rstrip("\n")
