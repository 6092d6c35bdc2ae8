"""Writing a query's result: every row, batch by batch, or the first rows for a person.

``dragons query --format csv|json|parquet`` writes **every** row of the result,
one Arrow record batch at a time as DuckDB produces it (``query.stream_sql``):
neither the result nor the output is ever held whole, so an export of any size
needs DuckDB's memory (``--memory-limit``) plus one batch. Formats:

* ``csv``: a header line, then one line per row (pyarrow's CSV writer: strings
  quoted, NULL as an empty field, timestamps ``2026-12-02 10:15:00.000000+0000``;
  list/struct/map and interval values as JSON text);
* ``json``: JSON Lines, one JSON object per row and line (it streams, a reader
  can stop at any line, and ``jq``, pandas ``read_json(lines=True)`` and DuckDB
  ``read_json`` read it; a JSON array is invalid until its closing bracket).
  Timestamps, dates and decimals as strings, NULL/NaN/infinity as ``null``;
* ``parquet``: one Parquet file (zstd), a row group per batch; ``--out`` only;
* ``table``: aligned columns for the terminal, cut after ``TABLE_MAX_ROWS`` rows
  with a note on stderr (never inside the output).

``--out FILE`` is written under a temporary name in the same folder and renamed
when complete, so a failed or interrupted export never leaves a half file under
the final name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import sys
from collections.abc import Iterator
from typing import IO, Any, BinaryIO, Callable, TextIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dragons import storage
from dragons.errors import DragonsError

FORMATS = ["table", "csv", "json", "parquet"]  # dragons query --format; the first is the default
TEXT_FORMATS = FORMATS[:3]  # the ones a command can print (parquet needs --out): dragons table --format
TABLE_MAX_ROWS = 10_000  # rows the terminal table shows
JSON_SLICE_ROWS = 4_096  # rows turned into Python objects at a time (JSON has no Arrow writer)


# ----------------------------------------------------------------- csv


def _csv_writable(field: pa.Field) -> bool:
    """Whether pyarrow's CSV writer takes this column type (it refuses list,
    struct, map and interval columns, which DuckDB returns for list(), {...}, ...)."""
    try:
        with pacsv.CSVWriter(pa.BufferOutputStream(), pa.schema([field])) as w:
            w.write_batch(pa.record_batch([pa.nulls(1, field.type)], schema=pa.schema([field])))
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False


# Cells a spreadsheet would evaluate as a formula (OWASP, "CSV Injection"): a class
# folder named =HYPERLINK(...) or a key beginning with '+' must open as text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_RE = "^[=+\\-@\t\r]"


def safe_cell(text: str) -> str:
    """A CSV cell that opens as text: a leading formula character gets OWASP's ``'`` before it."""
    return "'" + text if text.startswith(FORMULA_START) else text


def _safe_text(col: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """``safe_cell`` over a string column, in Arrow (numbers are never touched: -0.5 stays a number)."""
    import pyarrow.compute as pc

    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return col
    risky = pc.fill_null(pc.match_substring_regex(col, _FORMULA_RE), False)
    return pc.if_else(risky, pc.binary_join_element_wise("'", col, ""), col)


def _as_json_text(col: pa.Array) -> pa.Array:
    return pa.array([None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string())


def write_csv(reader: pa.RecordBatchReader, out: BinaryIO | IO[bytes]) -> int:
    """Every row as CSV with a header line; returns the number of rows. Text cells that
    begin like a formula are neutralised (``safe_cell``), the header's names too."""
    textual = [i for i, f in enumerate(reader.schema) if not _csv_writable(f)]
    schema = reader.schema
    for i in textual:
        schema = schema.set(i, pa.field(schema.field(i).name, pa.string()))
    schema = pa.schema([f.with_name(safe_cell(f.name)) for f in schema])
    rows = 0
    with pacsv.CSVWriter(out, schema) as w:
        for batch in reader:
            cols = list(batch.columns)
            for i in textual:
                cols[i] = _as_json_text(cols[i])
            w.write_batch(pa.record_batch([_safe_text(c) for c in cols], schema=schema))
            rows += batch.num_rows
    return rows


# ----------------------------------------------------------------- json lines


def _json_ready(col: pa.Array) -> pa.Array:
    """A column prepared in Arrow, in one go, for Python's json writer.

    Timestamps, dates, times and decimals become text: turning them into Python
    objects first took half an export's time (tz-aware datetimes). NaN and
    infinities become null: JSON has no such numbers (Python would write ``NaN``).
    """
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t) or pa.types.is_decimal(t):
        return col.cast(pa.string())
    if pa.types.is_floating(t):
        return pc.if_else(pc.is_finite(col), col, pa.scalar(None, t))
    return col  # the rest as Python's json writes them (intervals, bytes: as text via str)


def write_jsonl(reader: pa.RecordBatchReader, out: BinaryIO | IO[bytes]) -> int:
    """Every row as one JSON object per line (JSON Lines); returns the number of rows.

    Timestamps, dates and decimals are strings in the CSV writer's form
    (``2026-12-02 10:15:00.000000+0000``); NULL, NaN and infinities are ``null``.
    """
    names = reader.schema.names
    encode = json.JSONEncoder(default=str, check_circular=False).encode
    rows = 0
    for batch in reader:
        for start in range(0, batch.num_rows, JSON_SLICE_ROWS):
            part = batch.slice(start, JSON_SLICE_ROWS)
            columns = [_json_ready(c).to_pylist() for c in part.columns]
            lines = (encode(dict(zip(names, values))) for values in zip(*columns))
            out.write(("\n".join(lines) + "\n").encode("utf-8"))
            rows += part.num_rows
    return rows


# ----------------------------------------------------------------- parquet


def write_parquet(reader: pa.RecordBatchReader, out: BinaryIO | IO[bytes]) -> int:
    """Every row into one Parquet file (zstd, a row group per batch); returns the number of rows."""
    rows = 0
    with pq.ParquetWriter(out, reader.schema, compression="zstd") as w:
        for batch in reader:
            w.write_batch(batch)
            rows += batch.num_rows
    return rows


WRITERS: dict[str, Callable[[pa.RecordBatchReader, Any], int]] = {
    "csv": write_csv,
    "json": write_jsonl,
    "parquet": write_parquet,
}


# ----------------------------------------------------------------- terminal table


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_table(
    reader: pa.RecordBatchReader,
    out: TextIO | IO[str],
    max_rows: int = TABLE_MAX_ROWS,
    note: TextIO | IO[str] | None = None,
) -> int:
    """The first ``max_rows`` rows as aligned columns; returns the rows shown.

    Column widths need every shown row first, so this is the one format that
    holds rows, and only up to ``max_rows``: it stops reading there (a huge
    result is not computed to the end just to be counted) and says so on
    ``note`` (stderr), outside the output.
    """
    names = reader.schema.names
    cells: list[list[str]] = []
    cut = False
    for batch in reader:
        take = max_rows - len(cells)
        if batch.num_rows > take:
            cut = True
        part = batch.slice(0, max(0, take))
        cells += [[_cell(v) for v in values] for values in zip(*(c.to_pylist() for c in part.columns))]
        if cut:
            break
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(names)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(names, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    n = len(cells)
    lines.append(f"(first {n} rows)" if cut else f"({n} row{'s' if n != 1 else ''})")
    out.write("\n".join(lines) + "\n")
    if cut:
        print(
            f"note: the table format shows the first {max_rows:,} rows and more were left out: add LIMIT or "
            "aggregate, or write every row with --format csv|json|parquet [--out FILE]",
            file=note or sys.stderr,
            flush=True,
        )
    return n


# ----------------------------------------------------------------- where it goes


def check_target(fmt: str, out: str | None) -> str | None:
    """Validate ``--format``/``--out`` before any query runs; returns the local path to write, or None (stdout)."""
    if fmt not in FORMATS:
        raise DragonsError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not out:
        if fmt == "parquet":
            raise DragonsError("--format parquet writes a binary file: give --out FILE (e.g. --out scores.parquet)")
        return None
    if fmt == "table":
        raise DragonsError(
            f"--out {out}: the table format is for the terminal (and cut at {TABLE_MAX_ROWS:,} rows); "
            "write a file with --format csv, json or parquet"
        )
    loc = storage.parse(out)
    if loc.is_s3:
        raise DragonsError(
            f"--out {out}: exports are written to a local file; write it here and copy it "
            "(e.g. aws s3 cp FILE s3://...)"
        )
    if os.path.isdir(loc.path):
        raise DragonsError(f"--out {out} is a folder: give a file name (e.g. {os.path.join(out, 'result.' + fmt)})")
    folder = os.path.dirname(loc.path)
    if not os.path.isdir(folder):
        raise DragonsError(f"--out {out}: folder {folder} does not exist: create it first")
    return loc.path


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """A new file that appears under ``path`` only once written completely.

    Written as ``.<name>.part-<pid>-<random>`` in the same folder (the same
    filesystem, so the rename is atomic), renamed on success and deleted on any
    failure, Ctrl-C included. Created with mode 0666 less the umask, as any file.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.part-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise DragonsError(
            f"--out {path}: cannot create a file in {folder} ({exc.strerror}): check that the folder is writable"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise DragonsError(
            f"--out {path}: cannot write it ({exc.strerror or exc}); nothing was left under that name: "
            "check the free space and permissions"
        ) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def format_table(t: pa.Table, fmt: str = FORMATS[0]) -> str:
    """A small result (``dragons table``, the demo) as text in one of ``TEXT_FORMATS``:
    every row, except that the terminal ``table`` stops at ``TABLE_MAX_ROWS`` and says so on stderr."""
    if fmt not in TEXT_FORMATS:
        raise DragonsError(f"--format {fmt!r}: choose one of {', '.join(TEXT_FORMATS)}")
    reader = pa.RecordBatchReader.from_batches(t.schema, t.to_batches())
    if fmt == "table":
        text = io.StringIO()
        write_table(reader, text, note=sys.stderr)
        return text.getvalue().rstrip("\n")
    data = io.BytesIO()
    WRITERS[fmt](reader, data)
    return data.getvalue().decode("utf-8").rstrip("\n")


def export(reader: pa.RecordBatchReader, fmt: str, out: str | None = None) -> int:
    """Write ``reader`` in ``fmt`` to the file ``out`` (see :func:`check_target`) or stdout; returns the rows written."""
    if fmt == "table":
        return write_table(reader, sys.stdout)
    if out is None:
        sys.stdout.flush()  # the text layer's buffer first: the rows go to the bytes underneath
        rows = WRITERS[fmt](reader, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return rows
    with atomic_file(out) as f:
        return WRITERS[fmt](reader, f)
