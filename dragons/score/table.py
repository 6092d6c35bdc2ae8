"""The scores table: a Delta Lake table (delta-rs) that every engine can read.

One run = one Delta commit. The driver spools the run's scored rows to a local
Parquet file while they stream in (so memory stays bounded and the counts are
known), then writes them with ONE ``write_deltalake`` call in ``overwrite`` mode
with the predicate ``run_id = '<id>'``: a first run adds its rows, a re-run
removes the old rows and adds the new ones in the same commit, and the counts
go into that commit's metadata. Data files a crashed run wrote are referenced
by no commit, so no Delta reader ever sees them; ``dragons table vacuum`` removes them.

Concurrency comes from Delta's optimistic commits (on S3 with conditional puts,
``conditional_put=etag``): two different run ids never read each other's rows,
so delta-rs rebases and both land; two writers of the same run id both read
"rows where run_id = X", so the second commit conflicts and fails with a clear
error instead of leaving both runs' rows.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dragons import storage
from dragons.columns import check_classes, prob_column
from dragons.errors import DragonsError

PARTITION = "dt"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Rows per batch read back from the spool into delta-rs: bounds the commit's memory.
SPOOL_BATCH_ROWS = 65_536
# Tries of one run's table write when S3 fails on the way (delta-rs retries single requests itself).
WRITE_ATTEMPTS = 4


def check_run_id(run_id: str) -> None:
    if not _RUN_ID.match(run_id):
        raise DragonsError(f"--run-id {run_id!r} is not valid: use letters, digits, '_', '.', '-' (at most 128)")


def schema(classes: list[str]) -> pa.Schema:
    cols = [pa.field("uri", pa.string(), nullable=False), pa.field("label", pa.string()), pa.field("score", pa.float64())]
    cols += [pa.field(prob_column(c), pa.float64()) for c in classes]
    cols += [pa.field("model_version", pa.string()), pa.field("run_id", pa.string()),
             pa.field("scored_at", pa.timestamp("us", tz="UTC")), pa.field("error", pa.string()),
             # What was scored: incremental runs skip objects whose etag and size are unchanged.
             pa.field("etag", pa.string()), pa.field("size", pa.int64()),
             pa.field("last_modified", pa.timestamp("us", tz="UTC")),
             pa.field(PARTITION, pa.string())]
    return pa.schema(cols)


# ---------------------------------------------------------------- location


def table_uri(root: str) -> str:
    """The table's URI as delta-rs wants it: ``s3://bucket/prefix`` or an absolute path."""
    return storage.parse(root).uri.rstrip("/")


def storage_options(uri: str) -> dict[str, str]:
    """delta-rs object-store options from the standard AWS variables.

    The one place the secret is read for delta-rs: never log or store the result.
    """
    if not storage.parse(uri).is_s3:
        return {}
    opts: dict[str, str] = {}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(var):
            opts[var] = os.environ[var]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    opts["AWS_REGION"] = region
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    # Commits are put-if-absent on the _delta_log entry: safe concurrent writers
    # without a DynamoDB lock (AWS S3 and moto support conditional puts).
    opts["conditional_put"] = "etag"
    return opts


def open_table(root: str, version: int | str | datetime | None = None) -> Any:
    """The Delta table at ``root`` (optionally as of a version or timestamp)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    uri = table_uri(root)
    try:
        dt = DeltaTable(uri, storage_options=storage_options(uri))
    except TableNotFoundError:
        hint = ""
        try:
            if storage.exists(uri) and any(e.uri.endswith("_manifest.json") for e in storage.list_files(uri)):
                hint = " (it holds an old Parquet+_manifest.json table: re-score into a new --output)"
        except DragonsError:
            pass
        raise DragonsError(f"no Delta table at {uri}{hint}: nothing has been scored there (check --table)") from None
    except OSError as exc:
        storage.exists(uri)  # raises the clearer cause: endpoint unreachable, no bucket, access denied
        raise DragonsError(f"cannot open the table at {uri}: {_short(exc)}") from None
    if version is not None:
        try:
            dt.load_as_version(version)
        except Exception as exc:  # delta-rs raises several types for a bad version/time
            raise DragonsError(f"--as-of {version}: no such table version ({_short(exc)}); "
                               f"versions run from 0 to {dt.version()}, see `dragons table history`") from None
    return dt


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return storage.redact(text[0][:300]) if text else type(exc).__name__


def check_output(root: str) -> None:
    """Fail before any image is read when the output cannot be written (a missing
    bucket, a wrong endpoint, a read-only credential): storage's write probe, whose
    name starts with '.', which Delta and Hive readers ignore."""
    storage.check_writable(table_uri(root), "--output")


# ---------------------------------------------------------------- writing


@dataclass
class RunWriter:
    """Spools a run's rows locally, then commits them as one Delta version.

    ``add`` normalises each scored batch to the table schema and appends it to a
    local Parquet spool; ``commit`` streams the spool into one ``write_deltalake``
    call. A killed driver leaves at most a spool file in the temp dir and data
    files no commit names.
    """

    root: str
    run_id: str
    started: datetime
    classes: list[str]
    model_version: str = ""
    spool_dir: str = ""  # "" = the system temp dir
    target_file_size: int | None = None  # bytes per data file; None = delta-rs' default (~100 MB)
    rows: int = 0
    errors: int = 0
    schema: pa.Schema = field(init=False)
    _spool: str = field(init=False, default="")
    _writer: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        check_classes(self.classes)
        self.uri = table_uri(self.root)
        self.dt = self.started.strftime("%Y-%m-%d")
        self.schema = schema(self.classes)

    def add(self, batch: pa.Table | pa.RecordBatch, model_version: str | None = None) -> None:
        t = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        n = t.num_rows
        if n == 0:
            return
        now = datetime.now(timezone.utc)
        extra = {
            "model_version": pa.array([model_version or self.model_version] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            PARTITION: pa.array([self.dt] * n, pa.string()),
        }
        cols = []
        for f in self.schema:
            if f.name in extra:
                cols.append(extra[f.name])
            elif f.name in t.column_names:
                col = t.column(f.name)
                if pa.types.is_floating(col.type):
                    # NaN probabilities (error rows), and nulls that numpy batches turned
                    # into NaN (a --manifest has no sizes), become SQL NULLs.
                    col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
                cols.append(pc.cast(col, f.type))
            else:
                cols.append(pa.nulls(n, f.type))
        out = pa.Table.from_arrays(cols, schema=self.schema)
        if self._writer is None:
            fd, self._spool = tempfile.mkstemp(prefix=f"dragons-spool-{self.run_id}-", suffix=".parquet",
                                               dir=self.spool_dir or None)
            os.close(fd)
            self._writer = pq.ParquetWriter(self._spool, self.schema, compression="zstd")
        self._writer.write_table(out)
        self.rows += n
        self.errors += n - out.column("error").null_count

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if not self._spool:
            return
        if self._writer is not None and self._writer.is_open:
            self._writer.close()
        yield from pq.ParquetFile(self._spool).iter_batches(batch_size=SPOOL_BATCH_ROWS)

    def commit(self, info: dict[str, Any]) -> dict[str, Any]:
        """One Delta commit holding the run's rows (replacing any earlier rows of
        this run id) and ``info`` plus the counts in its metadata."""
        meta = {"dragons_run_id": self.run_id, "rows": self.rows, "scored": self.rows - self.errors,
                "errors": self.errors, "started_at": self.started.isoformat(), **info}
        try:
            # A factory, not a reader: a retried write reads the spool again from the start.
            version = write_run(self.uri, self.run_id, lambda: pa.RecordBatchReader.from_batches(self.schema, self._batches()),
                                meta, self.target_file_size)
        finally:
            self.discard()
        return {**meta, "version": version, "path": self.uri, "run_id": self.run_id, "dt": self.dt}

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._spool and os.path.exists(self._spool):
            os.remove(self._spool)
        self._spool, self._writer = "", None


def write_run(uri: str, run_id: str, data: pa.RecordBatchReader | Callable[[], pa.RecordBatchReader],
              meta: dict[str, Any], target_file_size: int | None = None) -> int:
    """Commit ``data`` as run ``run_id``: exactly one table version; returns it.

    With ``data`` a factory, a write that fails on the way (an S3 5xx or a reset
    that delta-rs' own retries did not absorb) is tried again, up to
    ``WRITE_ATTEMPTS`` times, unless the commit log shows this attempt landed
    (only its answer was lost). Data files of a failed try are referenced by no
    commit: invisible, and ``dragons table vacuum`` removes them.
    """
    from deltalake import write_deltalake
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import CommitProperties

    check_run_id(run_id)
    opts = storage_options(uri)
    # Finds this commit's version afterwards even if other writers committed since.
    attempt = uuid.uuid4().hex[:16]
    custom = {k: v for k, v in meta.items() if v is not None} | {"dragons_attempt": attempt}
    json.dumps(custom)  # fail here, not inside delta-rs, on anything not JSON-able
    tries = WRITE_ATTEMPTS if callable(data) else 1
    for n in range(1, tries + 1):
        try:
            write_deltalake(
                uri, data() if callable(data) else data, mode="overwrite", predicate=f"run_id = '{run_id}'",
                partition_by=[PARTITION],
                # A model with other classes adds its p_<class> columns (older rows read NULL there).
                schema_mode="merge", storage_options=opts, target_file_size=target_file_size,
                commit_properties=CommitProperties(custom_metadata=custom),
                # File statistics on every column (applied when the table is created):
                # Delta's default covers the first 32, and from 28 classes on run_id is
                # beyond them, so a concurrent commit of *another* run id could not be
                # told apart from this run's predicate and failed as a conflict.
                configuration={"delta.dataSkippingNumIndexedCols": "-1"},
            )
            break
        except CommitFailedError as exc:
            raise DragonsError(
                f"run {run_id}: another writer's commit to {uri} conflicts with this run's (the same run id, or "
                f"a table created before dragons kept statistics on every column) ({_short(exc)}); the table holds "
                "nothing of this run: re-run later with the same --run-id, or use another --run-id") from None
        except OSError as exc:
            if _attempt_version(uri, attempt) is not None:
                break  # it landed; only the answer was lost
            if n == tries:
                raise DragonsError(f"cannot write the table at {uri} ({tries} tries): {_short(exc)}") from None
            time.sleep(min(30.0, 2.0 ** n))
    version = _attempt_version(uri, attempt)
    return int(version if version is not None else open_table(uri).version())


def _attempt_version(uri: str, attempt: str) -> int | None:
    """The version of the commit tagged ``attempt``, if it is in the recent log."""
    try:
        for h in open_table(uri).history(50):
            if h.get("dragons_attempt") == attempt:
                return int(h["version"])
    except (DragonsError, OSError):
        pass  # no table yet, or the endpoint is still failing
    return None


def run_history(root: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The table's commits, newest first, with dragons' run metadata flattened."""
    dt = open_table(root)
    out = []
    for h in dt.history(limit):
        params = h.get("operationParameters") or {}
        metrics = h.get("operationMetrics") or {}
        out.append({
            "version": h.get("version"),
            "committed_at": datetime.fromtimestamp(h.get("timestamp", 0) / 1000, timezone.utc).isoformat(timespec="seconds"),
            "operation": h.get("operation"),
            "run_id": h.get("dragons_run_id"),
            "listed": h.get("listed"), "skipped": h.get("skipped"), "scored": h.get("scored"), "errors": h.get("errors"),
            "rows": h.get("rows", metrics.get("num_added_rows")),
            "model_version": h.get("model_version"), "model": h.get("model"), "input": h.get("input"),
            "incremental": h.get("incremental"),
            "files_added": metrics.get("num_added_files"), "files_removed": metrics.get("num_removed_files"),
            "predicate": params.get("predicate"),
        })
    return out

