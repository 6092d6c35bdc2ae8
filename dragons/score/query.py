"""``dragons query``: read-only SQL (DuckDB) over a Delta scores table, streamed.

The Delta table (its files as of the chosen version) becomes a pyarrow dataset
registered in DuckDB: DuckDB pulls record batches on demand and pushes column
selection and filters into the scan, so memory does not grow with the table.
We use the pyarrow dataset rather than DuckDB's ``delta_scan`` so that the
table is read by Python (delta-rs' object store) and DuckDB itself can be
locked down: no external access, no file reads or writes from SQL, only SELECT.

Views: ``scores`` (every row), ``latest`` (the newest row per uri and
model_version), ``runs`` (one row per commit, from the Delta log).
"""

from __future__ import annotations

import csv
import io
import json
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa

from dragons.errors import DragonsError

SUMMARY_SQL = """
SELECT version, committed_at, run_id, listed, skipped, scored, errors, model_version, input
FROM runs WHERE operation = 'WRITE' ORDER BY version
"""

LATEST_SQL = """
CREATE VIEW latest AS
SELECT * FROM scores
QUALIFY row_number() OVER (PARTITION BY uri, model_version ORDER BY scored_at DESC, run_id DESC) = 1
"""


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
        raise DragonsError(f"--as-of {value!r}: give a table version (e.g. 3) or an ISO timestamp "
                           "(e.g. 2026-11-28T02:00:00Z)") from None
    if ts.tzinfo is None:
        from datetime import timezone

        ts = ts.replace(tzinfo=timezone.utc)
    return ts


def _runs_table(root: str) -> pa.Table:
    from dragons.score.table import run_history

    rows = run_history(root)
    cols = ["version", "committed_at", "operation", "run_id", "listed", "skipped", "scored", "errors", "rows",
            "model_version", "model", "input", "incremental", "files_added", "files_removed"]
    types = {"version": pa.int64(), "listed": pa.int64(), "skipped": pa.int64(), "scored": pa.int64(),
             "errors": pa.int64(), "rows": pa.int64(), "files_added": pa.int64(), "files_removed": pa.int64(),
             "incremental": pa.bool_()}
    return pa.table({c: pa.array([r.get(c) for r in rows], types.get(c, pa.string())) for c in cols})


def connect(root: str, as_of: int | datetime | None = None, limits: QueryLimits | None = None) -> Any:
    """A locked-down DuckDB connection with the views ``scores``, ``latest`` and ``runs``."""
    import duckdb

    from dragons.score.table import open_table

    limits = limits or QueryLimits()
    dt = open_table(root, as_of)
    data = dt.to_pyarrow_dataset()
    con = duckdb.connect(":memory:", config={"threads": max(1, int(limits.threads)), "memory_limit": limits.memory_limit})
    try:
        con.register("scores", data)
        con.execute(LATEST_SQL)
        con.register("runs", _runs_table(root))
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


def run_sql(table_uri: str, sql: str | None = None, as_of: int | datetime | str | None = None,
            limits: QueryLimits | None = None) -> pa.Table:
    import duckdb

    limits = limits or QueryLimits()
    if isinstance(as_of, str):
        as_of = parse_as_of(as_of)
    con = connect(table_uri, as_of, limits)
    timer: threading.Timer | None = None
    timed_out = threading.Event()
    try:
        query = sql or SUMMARY_SQL
        _check_read_only(con, query)
        if limits.timeout_s and limits.timeout_s > 0:
            def stop() -> None:
                timed_out.set()
                con.interrupt()

            timer = threading.Timer(limits.timeout_s, stop)
            timer.daemon = True
            timer.start()
        try:
            return con.sql(query).to_arrow_table()
        except duckdb.Error as exc:
            first = str(exc).splitlines()[0]
            if timed_out.is_set():
                raise DragonsError(f"query stopped after --timeout {limits.timeout_s:g}s: narrow it "
                                   "(WHERE on dt/run_id, fewer columns) or raise --timeout") from None
            if isinstance(exc, duckdb.OutOfMemoryException) or "memory" in first.lower() and "limit" in first.lower():
                raise DragonsError(f"query needs more than --memory-limit {limits.memory_limit}: {first}; "
                                   "aggregate more, select fewer columns, or raise --memory-limit") from None
            if isinstance(exc, duckdb.PermissionException) or "external access" in first.lower():
                raise DragonsError(f"the query tried to reach files or the network, which dragons query refuses: {first}") from None
            raise DragonsError(f"query failed: {first}") from None
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(t: pa.Table, fmt: str = "table", max_rows: int = 10_000) -> str:
    """Text for the terminal; at most ``max_rows`` rows (a note says how many more)."""
    total = t.num_rows
    rows = t.slice(0, max_rows).to_pylist()
    more = f"\n({total - max_rows} more rows not shown: add LIMIT or aggregate)" if total > max_rows else ""
    if fmt == "json":
        return "\n".join(json.dumps(r, default=str) for r in rows) + more
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(t.column_names)
        for r in rows:
            w.writerow(["" if r[c] is None else r[c] for c in t.column_names])
        return buf.getvalue().rstrip("\n") + more
    cells = [[_cell(r[c]) for c in t.column_names] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(t.column_names)]
    line = "  ".join(c.ljust(w) for c, w in zip(t.column_names, widths)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    out.append(f"({total} row{'s' if total != 1 else ''})")
    return "\n".join(out) + more
