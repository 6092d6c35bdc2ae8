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
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa

from dragons import storage
from dragons.errors import DragonsError
from dragons.score.schema import COMMIT_COLUMNS, LATEST_SQL, RUN_COLUMNS, SUMMARY_SQL

# Rows per record batch handed out by stream_sql: big enough for Parquet row
# groups and fast CSV, small enough (a few MB of Arrow) to be nothing beside DuckDB's memory.
BATCH_ROWS = 65_536


@dataclass
class QueryLimits:
    memory_limit: str = "1GB"  # DuckDB's memory_limit: beyond it queries spill or fail with a clear error
    threads: int = 2  # DuckDB worker threads
    timeout_s: float = 300.0  # wall clock; 0 = none


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
        from datetime import timezone

        ts = ts.replace(tzinfo=timezone.utc)
    return ts


def _log_tables(root: str) -> tuple[pa.Table, pa.Table]:
    """The ``commits`` and ``runs`` views' tables, from one read of the commit log."""
    from dragons.score.table import run_history, runs_summary

    commits = run_history(root)
    runs = runs_summary(commits)

    def table(rows: list[dict[str, Any]], cols: dict[str, pa.DataType]) -> pa.Table:
        return pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in cols.items()})

    return table(commits, COMMIT_COLUMNS), table(runs, RUN_COLUMNS)


def connect(
    root: str, as_of: int | datetime | None = None, limits: QueryLimits | None = None, commit_log: bool = True
) -> Any:
    """A locked-down DuckDB connection with the views ``scores``, ``latest``, and
    with ``commit_log`` ``runs`` and ``commits`` (they read the whole Delta log:
    callers that only scan rows, like a run's skip sets, leave them out)."""
    import duckdb

    from dragons.score.table import open_table

    limits = limits or QueryLimits()
    # delta-rs reports storage trouble as OSError, DeltaError, a bare Exception or
    # a Rust panic (BaseException): each becomes `error: ...` naming the table.
    with storage.delta_errors(root, "read"):
        dt = open_table(root, as_of)
        data = dt.to_pyarrow_dataset()
        commits, runs = _log_tables(root) if commit_log else (None, None)
    con = duckdb.connect(
        ":memory:", config={"threads": max(1, int(limits.threads)), "memory_limit": limits.memory_limit}
    )
    try:
        con.register("scores", data)
        con.execute(LATEST_SQL)
        if commit_log:
            con.register("runs", runs)
            con.register("commits", commits)
        # No COPY ... TO, no reading or writing other files, no extensions from a query.
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:
        con.close()
        raise DragonsError(f"cannot set up the query engine: {str(exc).splitlines()[0]}") from None
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
def _deadline(con: Any, limits: QueryLimits) -> Iterator[threading.Event]:
    """Interrupts ``con`` after ``--timeout`` seconds (0: never); the event says it did.

    The clock covers the whole query, an export's writing included: a stream
    that stalls (a slow disk, a reader that stopped) ends like a slow query.
    """
    timed_out = threading.Event()
    timer: threading.Timer | None = None
    if limits.timeout_s and limits.timeout_s > 0:

        def stop() -> None:
            timed_out.set()
            con.interrupt()

        timer = threading.Timer(limits.timeout_s, stop)
        timer.daemon = True
        timer.start()
    try:
        yield timed_out
    finally:
        if timer is not None:
            timer.cancel()


def _query_error(exc: BaseException, limits: QueryLimits, timed_out: threading.Event) -> DragonsError:
    """What a failed query tells the user: which limit it hit and what to do."""
    import duckdb

    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    if timed_out.is_set():
        return DragonsError(
            f"query stopped after --timeout {limits.timeout_s:g}s: narrow it "
            "(WHERE on dt/run_id, fewer columns) or raise --timeout"
        )
    if isinstance(exc, duckdb.OutOfMemoryException) or "memory" in first.lower() and "limit" in first.lower():
        return DragonsError(
            f"query needs more than --memory-limit {limits.memory_limit}: {first}; "
            "aggregate more, select fewer columns, or raise --memory-limit"
        )
    if isinstance(exc, duckdb.PermissionException) or "external access" in first.lower():
        return DragonsError(f"the query tried to reach files or the network, which dragons query refuses: {first}")
    return DragonsError(f"query failed: {first}")


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
        with _deadline(con, limits) as timed_out:
            try:
                # A blocking query (ORDER BY, aggregates) runs here; a pipeline, batch by batch.
                source = con.sql(query).to_arrow_reader(batch_rows)
            except duckdb.Error as exc:
                raise _query_error(exc, limits, timed_out) from None

            def batches() -> Iterator[pa.RecordBatch]:
                while True:
                    try:
                        batch = source.read_next_batch()
                    except StopIteration:
                        return
                    except (duckdb.Error, pa.ArrowException) as exc:
                        raise _query_error(exc, limits, timed_out) from None
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
    from dragons.score import export

    reader = pa.RecordBatchReader.from_batches(t.schema, t.to_batches())
    if fmt == "table":
        text = io.StringIO()
        export.write_table(reader, text, max_rows=max_rows, note=sys.stderr)
        return text.getvalue().rstrip("\n")
    data = io.BytesIO()
    export.WRITERS[fmt](reader, data)
    return data.getvalue().decode("utf-8").rstrip("\n")
