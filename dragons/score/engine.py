"""The one door to a scores table: delta-rs opens it, DuckDB reads it, and one
mapping turns their failures into ``error:`` lines.

* :func:`open_table`: the Delta table at a root (local or S3, with storage's AWS
  settings), as of a version or time; delta-rs' failures through
  ``storage.delta_errors``;
* :func:`connect_table`: a DuckDB connection over it (view ``scores`` and
  ``latest``) under :class:`QueryLimits`, locked down: SQL reaches no file, no
  network and no extension; :func:`new_connection` is the same connection with
  no table in it, for SQL over other Arrow data (a run's skip sets);
* :func:`guarded` / :func:`deadline` and :func:`sql_error`: a statement under
  ``--timeout``, and what a failed one tells the user (the limit it hit, and
  what to do).

``dragons query`` and export, the run report, the run writer's look at a run
(``table.run_progress``) and a run's skip sets all come through here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dragons import storage
from dragons.errors import DragonsError
from dragons.score.schema import LATEST_SQL


@dataclass
class QueryLimits:
    memory_limit: str = "1GB"  # DuckDB's memory_limit: beyond it queries spill or fail with a clear error
    threads: int = 2  # DuckDB worker threads
    timeout_s: float = 300.0  # wall clock; 0 = none
    # The flag that sets memory_limit and what to do when it is hit, for the error that names it.
    memory_flag: str = "--memory-limit"
    memory_advice: str = "aggregate more, select fewer columns, or raise --memory-limit"


def table_uri(root: str) -> str:
    """The table's URI as delta-rs wants it: ``s3://bucket/prefix`` or an absolute path."""
    return storage.parse(root).uri.rstrip("/")


def open_table(root: str, version: int | str | datetime | None = None) -> Any:
    """The Delta table at ``root`` (optionally as of a version or timestamp)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    uri = table_uri(root)
    # delta-rs fails as OSError, DeltaError, a bare Exception or a Rust panic: each
    # becomes `error: cannot open the table at ...` naming what to check.
    with storage.delta_errors(uri, "open"):
        try:
            dt = DeltaTable(uri, storage_options=storage.delta_options(uri))
        except TableNotFoundError:
            raise DragonsError(
                f"no Delta table at {uri}{_old_table_hint(uri)}: nothing has been scored there (check --table)"
            ) from None
        if version is not None:
            try:
                dt.load_as_version(version)
            except Exception as exc:  # noqa: BLE001 (delta-rs raises several types for a bad version or time)
                raise DragonsError(
                    f"--as-of {version}: no such table version ({storage.short_error(exc)}); "
                    f"versions run from 0 to {dt.version()}, see `dragons table history`"
                ) from None
    return dt


def _old_table_hint(uri: str) -> str:
    try:
        if storage.exists(uri) and any(e.uri.endswith("_manifest.json") for e in storage.list_files(uri)):
            return " (it holds an old Parquet+_manifest.json table: re-score into a new --output)"
    except DragonsError:
        pass
    return ""


def new_connection(limits: QueryLimits, spill_dir: str | None = None, ordered: bool = True) -> Any:
    """An in-memory DuckDB connection under ``limits``, locked down.

    ``spill_dir``: where DuckDB spills what does not fit ``memory_limit`` (DuckDB's
    own default otherwise). ``ordered=False`` lets results leave in any order
    (DuckDB then streams a sort with less memory)."""
    import duckdb  # heavy: only the commands that run SQL pay for it

    config: dict[str, Any] = {"threads": max(1, int(limits.threads)), "memory_limit": limits.memory_limit}
    if spill_dir is not None:
        config["temp_directory"] = spill_dir
    if not ordered:
        config["preserve_insertion_order"] = False
    con = duckdb.connect(":memory:", config=config)
    try:
        # No COPY ... TO, no reading or writing other files, no extensions from a query
        # (spilling is DuckDB's own and still allowed). Data comes in by register() only.
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:
        con.close()
        raise DragonsError(f"cannot set up the query engine: {storage.short_error(exc)}") from None
    return con


def connect_table(
    table: str | Any, limits: QueryLimits | None = None, as_of: int | datetime | None = None, latest: bool = True
) -> Any:
    """A locked-down DuckDB connection (:func:`new_connection`) with the view ``scores``
    over ``table`` (a root, opened here as of ``as_of``, or an open DeltaTable) and,
    with ``latest``, ``latest``. DuckDB pulls record batches from the table's pyarrow
    dataset on demand and pushes column selection and filters into the scan."""
    import duckdb

    # A root is opened (and its errors named) by open_table; an open table's scan is read here.
    dt = open_table(table, as_of) if isinstance(table, str) else table
    with storage.delta_errors(dt.table_uri, "read"):
        data = dt.to_pyarrow_dataset()
    con = new_connection(limits or QueryLimits())
    try:
        con.register("scores", data)
        if latest:
            con.execute(LATEST_SQL)
    except duckdb.Error as exc:
        con.close()
        raise DragonsError(f"cannot set up the query engine: {storage.short_error(exc)}") from None
    return con


@contextlib.contextmanager
def deadline(con: Any, limits: QueryLimits) -> Iterator[threading.Event]:
    """Interrupts ``con`` after ``--timeout`` seconds (0: never); the event says it did.

    The clock covers the whole ``with`` block: for an export, its writing too, so a
    stream that stalls (a slow disk, a reader that stopped) ends like a slow query.
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


# How DuckDB says it could not spill: the disk, or its cap on temporary files.
_NO_DISK = ("no space", "max_temp_directory_size", "temporary director")


def sql_error(
    exc: BaseException,
    limits: QueryLimits,
    timed_out: threading.Event | None = None,
    what: str = "query",
    disk: str | None = None,
) -> DragonsError:
    """What a failed statement tells the user: which limit it hit and what to do.

    ``what`` names the work in the message ("query", "reading what ... holds");
    ``disk``, the folder DuckDB spilled under (named when its disk ran out)."""
    import duckdb

    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    lowered = first.lower()
    if timed_out is not None and timed_out.is_set():
        return DragonsError(
            f"{what} stopped after --timeout {limits.timeout_s:g}s: narrow it "
            "(WHERE on dt/run_id, fewer columns) or raise --timeout"
        )
    if any(s in lowered for s in _NO_DISK):
        where = disk or "the temporary folder"
        return DragonsError(
            f"{what} ran out of temporary disk in {where}: {first}; free space there or point TMPDIR at a bigger disk"
        )
    if (
        isinstance(exc, duckdb.OutOfMemoryException)
        or "out of memory" in lowered
        or ("memory" in lowered and "limit" in lowered)
    ):
        return DragonsError(
            f"{what} needs more than {limits.memory_flag} {limits.memory_limit}: {first}; {limits.memory_advice}"
        )
    if isinstance(exc, duckdb.PermissionException) or "external access" in lowered:
        return DragonsError(f"the {what} tried to reach files or the network, which dragons refuses: {first}")
    return DragonsError(f"{what} failed: {first}")


@contextlib.contextmanager
def guarded(con: Any, limits: QueryLimits, what: str = "query") -> Iterator[threading.Event]:
    """Statements on ``con`` inside run under ``limits``' timeout (:func:`deadline`, whose
    event it yields); a DuckDB failure becomes the DragonsError :func:`sql_error` words."""
    import duckdb

    with deadline(con, limits) as timed_out:
        try:
            yield timed_out
        except duckdb.Error as exc:
            raise sql_error(exc, limits, timed_out, what) from None
