"""The scores table: a Delta Lake table (delta-rs) that every engine can read.

A run is committed in **parts**: the driver spools scored rows to a local
Parquet file and, every ``commit_every`` rows or ``commit_interval_s`` seconds,
appends them to the table as one Delta commit. Each commit is tagged with the
run id, its part number, the run's totals so far and a status (``part``, then
``complete`` or ``failed`` on the run's last commit), and carries a Delta app
transaction ``(dragons-score:<run id>, part)``. So:

* a run killed at any moment loses at most its uncommitted part: every part
  already committed stays, and running the same run id again continues it
  (the listing skips what the run already holds, see ``score/incremental.py``);
* two writers of one run id are fenced: each writes through the table version
  it last committed, and delta-rs refuses a commit when a newer commit carries
  the same app transaction id (``CommitFailedError``), so the slower writer
  stops with a clear error and never adds a second row for an object;
* ``--replace`` starts a run id over: its first commit deletes the run's rows.

Data files a killed run wrote but never committed are referenced by no commit,
so no Delta reader sees them; ``dragons table vacuum`` removes them. On S3 a
commit is a put-if-absent of the log entry (``conditional_put=etag``).
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
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dragons import storage
from dragons.columns import check_classes
from dragons.errors import DragonsError
from dragons.score.schema import PARTITION, schema

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Rows per batch read back from the spool into delta-rs: bounds the commit's memory.
SPOOL_BATCH_ROWS = 65_536
# Tries of one run's table write when S3 fails on the way (delta-rs retries single requests itself).
WRITE_ATTEMPTS = 4


def check_run_id(run_id: str) -> None:
    if not _RUN_ID.match(run_id):
        raise DragonsError(f"--run-id {run_id!r} is not valid: use letters, digits, '_', '.', '-' (at most 128)")


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
    except BaseException as exc:  # delta-rs fails as OSError, DeltaError, Exception or a Rust panic
        if not storage.is_delta_failure(exc):
            raise
        raise storage.delta_failure(uri, exc, "open") from None
    if version is not None:
        try:
            dt.load_as_version(version)
        except BaseException as exc:  # delta-rs raises several types for a bad version/time
            if not isinstance(exc, Exception) and not storage.is_delta_failure(exc):
                raise
            raise DragonsError(f"--as-of {version}: no such table version ({storage.short_error(exc)}); "
                               f"versions run from 0 to {dt.version()}, see `dragons table history`") from None
    return dt


def check_output(root: str) -> None:
    """Fail before any image is read when the output cannot be written (a missing
    bucket, a wrong endpoint, a read-only credential): storage's write probe, whose
    name starts with '.', which Delta and Hive readers ignore."""
    storage.check_writable(table_uri(root), "--output")


# ---------------------------------------------------------------- writing

APP_PREFIX = "dragons-score:"  # Delta app transaction id of a run: this + the run id
# What a run's commit says of it (``dragons_status`` in the commit's metadata).
PART, COMPLETE, FAILED, REPLACED, CREATED = "part", "complete", "failed", "replaced", "created"


def app_id(run_id: str) -> str:
    return APP_PREFIX + run_id


@dataclass
class RunState:
    """What the table holds of one run id when a writer starts (one aggregate query)."""

    part: int = 0  # the run's last committed part number (its app transaction version); 0 = none
    rows: int = 0  # rows the run holds
    errors: int = 0  # of which error rows
    date: str | None = None  # the run's dt, from its rows


def run_state(dt: Any, run_id: str) -> RunState:
    """The run's part number and rows in table ``dt`` (a DeltaTable at a fixed version)."""
    import duckdb

    part = dt.transaction_version(app_id(run_id)) or 0
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        con.register("scores", dt.to_pyarrow_dataset())
        n, errors, date = con.execute("SELECT count(*), count(error), min(dt) FROM scores WHERE run_id = $r",
                                      {"r": run_id}).fetchone()
    except duckdb.Error as exc:
        raise DragonsError(f"cannot read what the table holds of run {run_id}: "
                           f"{storage.redact(str(exc).splitlines()[0])[:300]}") from None
    finally:
        con.close()
    return RunState(part=int(part), rows=int(n or 0), errors=int(errors or 0), date=date)


@dataclass
class RunWriter:
    """Appends a run's rows to the table part by part (see the module docstring).

    ``begin`` reads what the table holds of the run (creating the table if there
    is none); ``add`` spools each scored batch in the table schema and commits a
    part when it is due; ``finish`` commits the rest as the run's ``complete``
    commit with its counts; ``fail`` records a ``failed`` commit without the
    uncommitted rows. A killed driver leaves at most one part's spool file in the
    temp dir and data files no commit names.
    """

    root: str
    run_id: str
    started: datetime
    classes: list[str]
    model_version: str = ""
    date: str = ""  # the run's logical date (its dt); "" = the date its rows already have, else started's date
    replace: bool = False  # delete the run's earlier rows in its first commit (rescore from scratch)
    commit_every: int = 0  # rows per part; 0 = no row limit
    commit_interval_s: float = 0.0  # seconds per part; 0 = no time limit (neither: one part at the end)
    spool_dir: str = ""  # "" = the system temp dir
    target_file_size: int | None = None  # bytes per data file; None = delta-rs' default (~100 MB)
    info: dict[str, Any] = field(default_factory=dict)  # run metadata for its first and last commits (redacted)
    rows: int = 0  # rows the run holds in the table, committed (after begin: earlier attempts' included)
    errors: int = 0
    parts: int = 0  # parts this writer committed
    first_part_at: float = 0.0  # time.time() of this writer's first commit that added rows
    schema: pa.Schema = field(init=False)
    _spool: str = field(init=False, default="")
    _writer: Any = field(init=False, default=None)
    _pending: int = field(init=False, default=0)
    _pending_errors: int = field(init=False, default=0)
    _dt: Any = field(init=False, default=None)
    _part: int = field(init=False, default=0)
    _since: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        check_classes(self.classes)
        self.uri = table_uri(self.root)
        self.schema = schema(self.classes)
        self.dt = self.date

    @property
    def part(self) -> int:
        """The run's last committed part number."""
        return self._part

    @property
    def table_version(self) -> int:
        """The table version this writer's handle sits at (after ``begin``: what the run starts from)."""
        return int(self._dt.version())

    # -- start

    def begin(self) -> RunState:
        """Read the run's state (creating an empty table where there is none) and,
        with ``replace``, delete its earlier rows. Returns the state found."""
        with storage.delta_errors(self.uri, "open"):
            self._dt = _open_or_create(self.uri, self.schema)
            state = run_state(self._dt, self.run_id)
        self._part = state.part
        if state.date and self.date and self.date != state.date and not self.replace:
            raise DragonsError(f"run {self.run_id} already holds rows dated {state.date}; --date {self.date} would split "
                               "the night: leave --date out to continue it, or add --replace to rescore it under the new date")
        self.dt = self.date or state.date or self.started.strftime("%Y-%m-%d")
        if self.replace and state.rows:
            self._delete_rows()
            state = RunState(part=self._part, date=state.date)
        self.rows, self.errors = state.rows, state.errors
        self._since = time.monotonic()
        return state

    def _delete_rows(self) -> None:
        from deltalake.transaction import CommitProperties, Transaction

        part = self._part + 1
        meta = self._meta(REPLACED, part)
        from deltalake.exceptions import CommitFailedError

        with storage.delta_errors(self.uri, "write"):
            try:
                self._dt.delete(predicate=f"run_id = '{self.run_id}'", commit_properties=CommitProperties(
                    custom_metadata=meta, app_transactions=[Transaction(app_id(self.run_id), part)]))
            except CommitFailedError as exc:
                raise _commit_error(self.uri, self.run_id, exc) from None
        self._part = part

    # -- rows

    def add(self, batch: pa.Table | pa.RecordBatch, model_version: str | None = None) -> bool:
        """Spool a batch; commit a part whenever one is due (a part holds at most
        ``commit_every`` rows: a batch may end one part and start the next).
        True when a part was committed."""
        if self._dt is None:
            self.begin()
        t = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        committed = False
        while True:
            room = self.commit_every - self._pending if self.commit_every else t.num_rows
            head, t = t.slice(0, room), t.slice(room)
            if head.num_rows:
                self._spool_rows(self._normalise(head, model_version))
            if self._pending and self.due():
                self._commit(PART)
                committed = True
            if not t.num_rows:
                return committed

    def _spool_rows(self, out: pa.Table) -> None:
        if self._writer is None:
            fd, self._spool = tempfile.mkstemp(prefix=f"dragons-spool-{self.run_id}-", suffix=".parquet",
                                               dir=self.spool_dir or None)
            os.close(fd)
            self._writer = pq.ParquetWriter(self._spool, self.schema, compression="zstd")
        self._writer.write_table(out)
        self._pending += out.num_rows
        self._pending_errors += out.num_rows - out.column("error").null_count

    def due(self) -> bool:
        """A part is due: enough rows, or enough time since the last part."""
        return bool((self.commit_every and self._pending >= self.commit_every)
                    or (self.commit_interval_s and time.monotonic() - self._since >= self.commit_interval_s))

    def _normalise(self, t: pa.Table, model_version: str | None) -> pa.Table:
        n = t.num_rows
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
        return pa.Table.from_arrays(cols, schema=self.schema)

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if not self._spool:
            return
        if self._writer is not None and self._writer.is_open:
            self._writer.close()
        yield from pq.ParquetFile(self._spool).iter_batches(batch_size=SPOOL_BATCH_ROWS)

    # -- commits

    def finish(self, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Commit what is pending as the run's ``complete`` commit, with ``info`` (the
        run's counts) in its metadata; returns that metadata with the version."""
        if self._dt is None:
            self.begin()
        return self._commit(COMPLETE, {**self.info, **(info or {})})

    commit = finish  # a run of one part: add(), then commit()

    def fail(self, reason: str) -> None:
        """Best effort: a ``failed`` commit (no rows: the uncommitted part is dropped)
        so the runs view says why the run stopped, when this writer has committed
        parts. Never raises."""
        self.discard()
        # Only a writer that has committed parts records the failure: one that never
        # committed may be a second attempt beside a healthy one, whose next part
        # its marker would fence. Its error is on the terminal and in the log.
        if self._dt is None or self.parts == 0:
            return
        try:
            self._commit(FAILED, {"failure": storage.redact(reason)[:500]})
        except Exception:  # noqa: BLE001 (the run is failing already; its error is the one to show)
            pass

    def _meta(self, status: str, part: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        rows, errors = self.rows + self._pending, self.errors + self._pending_errors
        meta = {"dragons_run_id": self.run_id, "dragons_part": part, "dragons_status": status, "rows": rows,
                "scored": rows - errors, "errors": errors, "part_rows": self._pending, "dt": self.dt,
                "started_at": self.started.isoformat(), "model_version": self.model_version,
                "commit_interval_s": self.commit_interval_s, **(extra or {})}
        return {k: v for k, v in meta.items() if v is not None}

    def _commit(self, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        part = self._part + 1
        first = self.parts == 0
        meta = self._meta(status, part, {**(self.info if first else {}), **(extra or {})})
        try:
            version = self._append(part, meta)
        finally:
            self.discard()
        self._part = part
        self.parts += 1
        if meta["part_rows"] and not self.first_part_at:
            self.first_part_at = time.time()
        self.rows, self.errors = meta["rows"], meta["errors"]
        self._since = time.monotonic()
        return {**meta, "version": version, "path": self.uri, "run_id": self.run_id}

    def _append(self, part: int, meta: dict[str, Any]) -> int:
        """Append the pending rows as part ``part``: one Delta commit; returns its version.

        The write goes through this writer's own table handle, which sits at its
        last commit, so delta-rs sees any commit another writer of this run made
        since (same app transaction id) and refuses ours. A write that fails on the
        way is tried again, up to ``WRITE_ATTEMPTS`` times, unless the log shows it
        landed (only its answer was lost)."""
        from deltalake import write_deltalake
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import CommitProperties, Transaction

        attempt = uuid.uuid4().hex[:16]
        custom = {**meta, "dragons_attempt": attempt}
        json.dumps(custom)  # fail here, not inside delta-rs, on anything not JSON-able
        props = CommitProperties(custom_metadata=custom, app_transactions=[
            Transaction(app_id(self.run_id), part, last_updated=int(time.time() * 1000))])
        for n in range(1, WRITE_ATTEMPTS + 1):
            try:
                write_deltalake(
                    self._dt, pa.RecordBatchReader.from_batches(self.schema, self._batches()), mode="append",
                    partition_by=[PARTITION],
                    # A model with other classes adds its p_<class> columns (older rows read NULL there).
                    schema_mode="merge", storage_options=storage_options(self.uri),
                    target_file_size=self.target_file_size, commit_properties=props)
                return int(self._dt.version())
            except CommitFailedError as exc:
                landed = _landed(self.uri, attempt)  # our own earlier try may be the commit we lost to
                if landed is not None:
                    self._dt = landed[1]
                    return landed[0]
                raise _commit_error(self.uri, self.run_id, exc) from None
            except BaseException as exc:  # S3 trouble: OSError, delta-rs' own error types, a Rust panic
                if not storage.is_delta_failure(exc):
                    raise
                if not isinstance(exc, Exception):  # a panic: the same write would panic again
                    raise storage.delta_failure(self.uri, exc, "write") from None
                landed = _landed(self.uri, attempt)
                if landed is not None:
                    self._dt = landed[1]
                    return landed[0]
                if n == WRITE_ATTEMPTS:
                    raise DragonsError(f"cannot write the table at {self.uri} ({n} tries): {storage.short_error(exc)}; the run's "
                                       "committed parts are kept: run the same command again to continue") from None
                time.sleep(min(30.0, 2.0 ** n))
        raise AssertionError("unreachable")

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._spool and os.path.exists(self._spool):
            os.remove(self._spool)
        self._spool, self._writer = "", None
        self._pending = self._pending_errors = 0


def _commit_error(uri: str, run_id: str, exc: BaseException) -> DragonsError:
    return DragonsError(
        f"run {run_id}: another writer committed to this run id in {uri} first ({storage.short_error(exc)}); it carries the run "
        "on, and every part committed so far is kept: let it finish, or run the same command again after it stops")


def _open_or_create(uri: str, schema_: pa.Schema) -> Any:
    """The table's handle at its newest version; an empty table where there is none.

    Creating it first (one empty commit) means every writer of a run writes
    through a handle, so two first runs of one id into a new table are fenced too."""
    from deltalake import DeltaTable, write_deltalake
    from deltalake.transaction import CommitProperties

    opts = storage_options(uri)
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        try:
            write_deltalake(uri, schema_.empty_table(), mode="append", partition_by=[PARTITION], storage_options=opts,
                            commit_properties=CommitProperties(custom_metadata={"dragons_status": CREATED}),
                            # File statistics on every column: Delta's default covers the first
                            # 32, and from 28 classes on run_id is beyond them, so queries and
                            # conflict checks on run_id could not skip other runs' files.
                            configuration={"delta.dataSkippingNumIndexedCols": "-1"})
        except Exception:  # noqa: BLE001 (another writer created it first: open theirs)
            if not DeltaTable.is_deltatable(uri, storage_options=opts):
                raise
    return open_table(uri)


def _landed(uri: str, attempt: str) -> tuple[int, Any] | None:
    """(version, fresh handle) of the commit tagged ``attempt``, if it is in the recent log."""
    try:
        dt = open_table(uri)
        for h in dt.history(50):
            if h.get("dragons_attempt") == attempt:
                dt.load_as_version(int(h["version"]))  # the handle sits at our commit, as after a clean write
                return int(h["version"]), dt
    except Exception:  # noqa: BLE001 (no table yet, or the endpoint is still failing)
        pass
    return None


def run_history(root: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The table's commits, newest first, with dragons' run metadata flattened."""
    dt = open_table(root)
    out = []
    for h in dt.history(limit):
        params = h.get("operationParameters") or {}
        metrics = h.get("operationMetrics") or {}
        run_id = h.get("dragons_run_id")
        # Commits from before parts (one commit a run, overwrite) carry no status: complete.
        status = h.get("dragons_status") or (COMPLETE if run_id else None)
        out.append({
            "version": h.get("version"),
            "committed_at": datetime.fromtimestamp(h.get("timestamp", 0) / 1000, timezone.utc).isoformat(timespec="seconds"),
            "operation": h.get("operation"),
            "run_id": run_id, "status": status, "part": h.get("dragons_part", 1 if run_id else None),
            "part_rows": h.get("part_rows", h.get("rows", metrics.get("num_added_rows")) if run_id else None),
            "listed": h.get("listed"), "skipped": h.get("skipped"), "kept": h.get("kept"),
            "scored": h.get("scored"), "errors": h.get("errors"),
            "rows": h.get("rows", metrics.get("num_added_rows")),
            "model_version": h.get("model_version"), "model": h.get("model"), "input": h.get("input"),
            "incremental": h.get("incremental"), "dt": h.get("dt"), "started_at": h.get("started_at"),
            "commit_interval_s": h.get("commit_interval_s"), "failure": h.get("failure"),
            "files_added": metrics.get("num_added_files"), "files_removed": metrics.get("num_removed_files"),
            "predicate": params.get("predicate"),
        })
    return out


# A run whose last commit is a part is "running" while parts keep coming (within
# this many commit intervals of now), else "partial": stopped, resumable.
RUNNING_INTERVALS = 3.0
# ... and, for runs committed by row count alone (no interval), within this many seconds.
NO_INTERVAL_RUNNING_S = 900.0


def runs_summary(commits: list[dict[str, Any]], now: datetime | None = None) -> list[dict[str, Any]]:
    """One line per run from ``run_history``'s commits: status, parts, counts.

    status: ``complete`` (its last commit completed it), ``failed`` (its last
    commit recorded a failure), ``running`` (parts still arriving) or ``partial``
    (parts committed, then nothing: killed; run it again to continue)."""
    now = now or datetime.now(timezone.utc)
    runs: dict[str, dict[str, Any]] = {}
    for c in sorted(commits, key=lambda c: c["version"]):
        rid = c.get("run_id")
        if not rid:
            continue
        r = runs.setdefault(rid, {"run_id": rid, "parts": 0, "first_version": c["version"]})
        if c.get("status") == REPLACED:
            r["parts"] = 0
        elif c.get("status") in (PART, COMPLETE) and (c.get("part_rows") or 0) > 0:
            r["parts"] += 1
        r.update({"status": c.get("status"), "last_version": c["version"], "committed_at": c["committed_at"],
                  "rows": c.get("rows"), "scored": c.get("scored"), "errors": c.get("errors"),
                  "model_version": c.get("model_version") or r.get("model_version"), "dt": c.get("dt") or r.get("dt"),
                  "failure": c.get("failure")})
        for k in ("listed", "skipped", "kept", "input", "model", "incremental"):
            if c.get(k) is not None:
                r[k] = c[k]
        if c.get("started_at"):
            r.setdefault("started_at", c["started_at"])
        interval = float(c.get("commit_interval_s") or 0)
        r["_stale_after"] = RUNNING_INTERVALS * interval if interval else NO_INTERVAL_RUNNING_S
    out = []
    for r in runs.values():
        if r["status"] in (PART, REPLACED):
            age = (now - datetime.fromisoformat(r["committed_at"])).total_seconds()
            r["status"] = "running" if age <= r["_stale_after"] else "partial"
        r.pop("_stale_after")
        out.append(r)
    return sorted(out, key=lambda r: r["first_version"])
