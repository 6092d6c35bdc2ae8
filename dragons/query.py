"""``dragons query``: read-only SQL (DuckDB) over the committed rows of a table.

DuckDB's S3 extension cannot be downloaded offline, so pyarrow reads the
committed Parquet parts (local or S3) and DuckDB queries them in memory as the
view ``scores``. Only SELECT statements run; external file access is switched off.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pyarrow as pa

from dragons.errors import DragonsError
from dragons.table import read_committed

SUMMARY_SQL = """
SELECT run_id, dt, coalesce(label, '<error>') AS label, count(*) AS rows,
       round(avg(score), 4) AS mean_score, count(error) AS errors
FROM scores GROUP BY ALL ORDER BY dt, run_id, label
"""


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
                "only SELECT queries run (against the view `scores`)"
            )


def run_sql(table_uri: str, sql: str | None = None) -> pa.Table:
    import duckdb

    data = read_committed(table_uri)
    con = duckdb.connect(":memory:")
    try:
        con.register("scores", data)
        # No COPY ... TO, no reading or writing other files from a query.
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        query = sql or SUMMARY_SQL
        _check_read_only(con, query)
        try:
            return con.sql(query).to_arrow_table()
        except duckdb.Error as exc:
            raise DragonsError(f"query failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(t: pa.Table, fmt: str = "table") -> str:
    rows = t.to_pylist()
    if fmt == "json":
        return "\n".join(json.dumps(r, default=str) for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(t.column_names)
        for r in rows:
            w.writerow(["" if r[c] is None else r[c] for c in t.column_names])
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(r[c]) for c in t.column_names] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(t.column_names)]
    line = "  ".join(c.ljust(w) for c, w in zip(t.column_names, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
