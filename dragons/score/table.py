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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from dragons import storage
from dragons.columns import check_classes
from dragons.errors import DragonsError
from dragons.score.engine import QueryLimits, connect_table, guarded, open_table, table_uri
from dragons.score.schema import PARTITION, schema

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Tries of one run's table write when S3 fails on the way (delta-rs retries single requests itself).
WRITE_ATTEMPTS = 4


def check_run_id(run_id: str) -> None:
    if not _RUN_ID.match(run_id):
        raise DragonsError(f"--run-id {run_id!r} is not valid: use letters, digits, '_', '.', '-' (at most 128)")


# ---------------------------------------------------------------- location


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
class RunProgress:
    """How far a run id has got in the table when a writer starts (one aggregate query)."""

    part: int = 0  # the run's last committed part number (its app transaction version); 0 = none
    rows: int = 0  # rows the run holds
    errors: int = 0  # of which error rows
    date: str | None = None  # the run's dt, from its rows


def run_progress(dt: Any, run_id: str) -> RunProgress:
    """The run's part number and rows in table ``dt`` (a DeltaTable at a fixed version)."""
    part = dt.transaction_version(app_id(run_id)) or 0
    # One thread, no deadline: a count over one run's rows, which the scan's run_id filter narrows.
    limits = QueryLimits(threads=1, timeout_s=0)
    con = connect_table(dt, limits, latest=False)
    try:
        with guarded(con, limits, f"reading what the table holds of run {run_id}"):
            row = con.execute(
                "SELECT count(*), count(error), min(dt) FROM scores WHERE run_id = $r", {"r": run_id}
            ).fetchone()
    finally:
        con.close()
    assert row is not None  # an aggregate always has its one row
    n, errors, date = row
    return RunProgress(part=int(part), rows=int(n or 0), errors=int(errors or 0), date=date)


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
    # What the run scores (model version, classes, input, options that change a row):
    # recorded on every commit; a writer that continues the run id must match it.
    binding: dict[str, Any] = field(default_factory=dict)
    # Parts commit on a committer thread while the caller goes on adding rows (a
    # commit takes a Delta write and a log entry: seconds on S3, which the driver's
    # loop must not wait for). The final commit always waits for them.
    background: bool = False
    on_commit: Callable[[int, int], None] | None = None  # (part, rows the run holds) after each part commits
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
    _queued: int = field(init=False, default=0)  # the last part number handed to the committer
    _queued_rows: int = field(init=False, default=0)  # rows (and errors) the run holds once the queue commits
    _queued_errors: int = field(init=False, default=0)
    _committer: Any = field(init=False, default=None)
    _inflight: list[Any] = field(init=False, default_factory=list)
    _begun_at: int = field(init=False, default=0)

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

    def begin(self) -> RunProgress:
        """Read the run's state (creating an empty table where there is none) and,
        with ``replace``, delete its earlier rows. Returns the state found."""
        with storage.delta_errors(self.uri, "open"):
            self._dt = _open_or_create(self.uri, self.schema)
            state = run_progress(self._dt, self.run_id)
        self._part = state.part
        if state.part and not self.replace:
            self._check_binding()
        if state.date and self.date and self.date != state.date and not self.replace:
            raise DragonsError(
                f"run {self.run_id} already holds rows dated {state.date}; --date {self.date} would split "
                "the night: leave --date out to continue it, or add --replace to rescore it under the new date"
            )
        self.dt = self.date or state.date or self.started.strftime("%Y-%m-%d")
        if self.replace and state.rows:
            self._delete_rows()
            state = RunProgress(part=self._part, date=state.date)
        self.rows, self.errors = state.rows, state.errors
        self._queued, self._queued_rows, self._queued_errors = self._part, self.rows, self.errors
        self._begun_at = self._part  # this writer's first commit carries the run's info
        self._since = time.monotonic()
        return state

    def _check_binding(self) -> None:
        """Refuse to continue a run id with another model, input or row options: its rows
        would mix two kinds of answers under one run, and it would end ``complete``."""
        if not self.binding:
            return
        found = run_binding(self._dt, self.run_id)
        if found is None:
            return  # a run committed before bindings: nothing recorded to compare
        diff = [
            f"{k}: the run has {found.get(k)!r}, this command {v!r}"
            for k, v in self.binding.items()
            if k in found and found[k] != v
        ]
        if diff:
            raise DragonsError(
                f"run {self.run_id} in {self.uri} was started with something else ({'; '.join(diff)}); "
                "continuing it would mix the two in one run. Add --replace to rescore the run from "
                "scratch with this command, or give a new --run-id"
            )

    def _delete_rows(self) -> None:
        from deltalake.transaction import CommitProperties, Transaction

        part = self._part + 1
        meta = self._meta(REPLACED, part)
        from deltalake.exceptions import CommitFailedError

        with storage.delta_errors(self.uri, "write"):
            try:
                self._dt.delete(
                    predicate=f"run_id = '{self.run_id}'",
                    commit_properties=CommitProperties(
                        custom_metadata=meta, app_transactions=[Transaction(app_id(self.run_id), part)]
                    ),
                )
            except CommitFailedError as exc:
                raise _commit_error(self.uri, self.run_id, exc) from None
        self._part = self._queued = part

    # -- rows

    def add(self, batch: pa.Table | pa.RecordBatch, model_version: str | None = None) -> bool:
        """Spool a batch; commit a part whenever one is due (a part holds at most
        ``commit_every`` rows: a batch may end one part and start the next).
        True when a part was committed."""
        if self._dt is None:
            self.begin()
        self._raise_failed()
        t = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        committed = False
        while True:
            room = self.commit_every - self._pending if self.commit_every else t.num_rows
            head, t = t.slice(0, room), t.slice(room)
            if head.num_rows:
                self._spool_rows(self._normalise(head, model_version))
            if self._pending and self.due():
                if self.background:
                    self._hand_off()
                else:
                    self._commit(PART)
                committed = True
            if not t.num_rows:
                return committed

    def _spool_rows(self, out: pa.Table) -> None:
        if self._writer is None:
            fd, self._spool = tempfile.mkstemp(
                prefix=f"dragons-spool-{self.run_id}-", suffix=".arrow", dir=self.spool_dir or None
            )
            os.close(fd)
            # Arrow IPC, uncompressed: the spool is read back within minutes, and compressing
            # it cost the scoring loop more CPU (zstd Parquet: ~3.6 us a row) than the rest of a row.
            self._writer = pa.ipc.new_file(self._spool, self.schema)
        self._writer.write_table(out)
        self._pending += out.num_rows
        self._pending_errors += out.num_rows - out.column("error").null_count

    def due(self) -> bool:
        """A part is due: enough rows, or enough time since the last part."""
        return bool(
            (self.commit_every and self._pending >= self.commit_every)
            or (self.commit_interval_s and time.monotonic() - self._since >= self.commit_interval_s)
        )

    def _normalise(self, t: pa.Table, model_version: str | None) -> pa.Table:
        n = t.num_rows
        now = datetime.now(timezone.utc)
        extra = {
            "model_version": pa.repeat(pa.scalar(model_version or self.model_version, pa.string()), n),
            "run_id": pa.repeat(pa.scalar(self.run_id, pa.string()), n),
            "scored_at": pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), n),
            PARTITION: pa.repeat(pa.scalar(self.dt, pa.string()), n),
        }
        cols = []
        for f in self.schema:
            if f.name in extra:
                cols.append(extra[f.name])
            elif f.name in t.column_names:
                col = t.column(f.name)
                if pa.types.is_floating(col.type) and col.null_count < n:
                    # NaN probabilities (error rows), and nulls that numpy batches turned
                    # into NaN (a --manifest has no sizes), become SQL NULLs.
                    col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
                cols.append(col if col.type == f.type else pc.cast(col, f.type))
            else:
                cols.append(pa.nulls(n, f.type))
        return pa.Table.from_arrays(cols, schema=self.schema)

    def _batches(self, spool: str) -> Iterator[pa.RecordBatch]:
        if spool:  # batch by batch, as written (copied out of the file: a commit holds one at a time)
            with pa.OSFile(spool) as source:
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)

    def _close_spool(self) -> str:
        """Close the spool being written and hand its path over (the writer starts a new one)."""
        if self._writer is not None:
            self._writer.close()
        spool, self._spool, self._writer = self._spool, "", None
        return spool

    # -- the committer thread

    def _hand_off(self) -> None:
        """Queue the pending rows as the next part; the committer thread commits it."""
        self._raise_failed()
        while len(self._inflight) >= 2:  # commits slower than scoring: wait, rather than queue spools without end
            self._inflight.pop(0).result()
        part = self._queued + 1
        meta = self._meta(PART, part, self.info if part == self._begun_at + 1 else None)
        spool = self._close_spool()
        self._queued, self._queued_rows, self._queued_errors = part, meta["rows"], meta["errors"]
        self._pending = self._pending_errors = 0
        self._since = time.monotonic()
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dragons-commit")
        self._inflight.append(self._committer.submit(self._commit_spool, spool, part, meta))

    def _raise_failed(self) -> None:
        """Surface a part the committer could not commit (on the caller's thread, at its next call)."""
        while self._inflight and self._inflight[0].done():
            self._inflight.pop(0).result()

    def drain(self) -> None:
        """Wait for every queued part; raise the first failure."""
        while self._inflight:
            self._inflight.pop(0).result()

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
        try:
            self.drain()
        except Exception:  # noqa: BLE001 (the run is failing already; its error is the one to show)
            self._inflight.clear()
        # Only a writer that has committed parts records the failure: one that never
        # committed may be a second attempt beside a healthy one, whose next part
        # its marker would fence. Its error is on the terminal and in the log.
        if self._dt is None or self.parts == 0:
            return
        try:
            self._commit(FAILED, {"failure": storage.shorten(reason, 500)})
        except Exception:  # noqa: BLE001 (the run is failing already; its error is the one to show)
            pass

    def _meta(self, status: str, part: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        rows, errors = self._queued_rows + self._pending, self._queued_errors + self._pending_errors
        meta = {
            "dragons_run_id": self.run_id,
            "dragons_part": part,
            "dragons_status": status,
            "rows": rows,
            "scored": rows - errors,
            "errors": errors,
            "part_rows": self._pending,
            "dt": self.dt,
            "started_at": self.started.isoformat(),
            "model_version": self.model_version,
            "commit_interval_s": self.commit_interval_s,
            "binding": json.dumps(self.binding, sort_keys=True) if self.binding else None,
            "input": self.binding.get("input"),
            **(extra or {}),
        }
        return {k: v for k, v in meta.items() if v is not None}

    def _commit(self, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Commit what is pending now, on this thread, after every queued part."""
        self.drain()
        part = self._queued + 1
        first = part == self._begun_at + 1
        meta = self._meta(status, part, {**(self.info if first else {}), **(extra or {})})
        spool = self._close_spool()
        self._pending = self._pending_errors = 0
        version = self._commit_spool(spool, part, meta)
        self._queued, self._queued_rows, self._queued_errors = part, meta["rows"], meta["errors"]
        self._since = time.monotonic()
        return {**meta, "version": version, "path": self.uri, "run_id": self.run_id}

    def _commit_spool(self, spool: str, part: int, meta: dict[str, Any]) -> int:
        """Append one spool file as part ``part`` (then remove it); the writer's counters follow."""
        try:
            version = self._append(spool, part, meta)
        finally:
            if spool and os.path.exists(spool):
                os.remove(spool)
        self._part = part
        self.parts += 1
        if meta["part_rows"] and not self.first_part_at:
            self.first_part_at = time.time()
        self.rows, self.errors = meta["rows"], meta["errors"]
        if self.on_commit is not None and meta["dragons_status"] == PART:
            self.on_commit(part, meta["rows"])
        return version

    def _append(self, spool: str, part: int, meta: dict[str, Any]) -> int:
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
        props = CommitProperties(
            custom_metadata=custom,
            app_transactions=[Transaction(app_id(self.run_id), part, last_updated=int(time.time() * 1000))],
        )
        conflicts = 0
        n = 0
        # A Rust panic is no Exception: the same write would panic again, so it is not
        # retried but leaves through delta_errors as the `error:` naming the table.
        with storage.delta_errors(self.uri, "write"):
            while n < WRITE_ATTEMPTS:
                n += 1
                try:
                    write_deltalake(
                        self._dt,
                        pa.RecordBatchReader.from_batches(self.schema, self._batches(spool)),
                        mode="append",
                        partition_by=[PARTITION],
                        # A model with other classes adds its p_<class> columns (older rows read NULL there).
                        schema_mode="merge",
                        storage_options=storage.delta_options(self.uri),
                        target_file_size=self.target_file_size,
                        commit_properties=props,
                    )
                    return int(self._dt.version())
                except CommitFailedError as exc:
                    landed = _landed(self.uri, attempt)  # our own earlier try may be the commit we lost to
                    if landed is not None:
                        self._dt = landed[1]
                        return landed[0]
                    conflicts += 1
                    self._dt = self._after_conflict(exc, conflicts)  # raises unless a retry is safe
                    continue
                except Exception as exc:  # S3 trouble: OSError, delta-rs' own error types
                    if not storage.is_delta_failure(exc):
                        raise
                    landed = _landed(self.uri, attempt)
                    if landed is not None:
                        self._dt = landed[1]
                        return landed[0]
                    if n == WRITE_ATTEMPTS:
                        raise DragonsError(
                            f"cannot write the table at {self.uri} ({n} tries): {storage.short_error(exc)}; the run's "
                            "committed parts are kept: run the same command again to continue"
                        ) from None
                    time.sleep(min(30.0, 2.0**n))
            raise AssertionError("unreachable")

    def _after_conflict(self, exc: BaseException, conflicts: int) -> Any:
        """A commit delta-rs refused: a fresh handle to retry on, or the error that names the conflict.

        delta-rs checks our commit against every commit since our handle's version
        (this writer's last part). Only a commit carrying this run's app transaction
        is a rival writer; a schema change (another model's p_<class> columns), an
        append, or a delete of other rows is retried on a fresh snapshot, once the
        fresh snapshot shows that no rival advanced the run and its rows are intact."""
        kind = conflict_kind(exc)
        if kind == RIVAL:
            raise _commit_error(self.uri, self.run_id, exc) from None
        if kind == PROTOCOL:
            raise DragonsError(
                f"run {self.run_id}: the table at {self.uri} changed its Delta protocol during the run "
                f"({storage.short_error(exc)}); dragons writes protocol 1/2 tables: undo the upgrade or "
                "score into a new --output; every part committed so far is kept"
            ) from None
        if conflicts > CONFLICT_RETRIES:
            raise DragonsError(
                f"run {self.run_id}: {conflicts} commits in a row refused by concurrent changes to "
                f"{self.uri} ({storage.short_error(exc)}); every part committed so far is kept: run the "
                "same command again when the table is quieter"
            ) from None
        fresh = open_table(self.uri)
        if (fresh.transaction_version(app_id(self.run_id)) or 0) != self._part:
            raise _commit_error(self.uri, self.run_id, exc) from None
        if kind == DELETE and run_progress(fresh, self.run_id).rows != self.rows:
            raise DragonsError(
                f"run {self.run_id}: rows of this run were deleted from {self.uri} while it ran "
                f"({storage.short_error(exc)}); its counts no longer hold: rescore it with --replace, or "
                "under a new --run-id"
            ) from None
        time.sleep(min(5.0, 0.2 * 2**conflicts))
        return fresh

    def discard(self) -> None:
        """Drop the uncommitted spool (a failing or finished run). Parts already
        handed to the committer still commit: they are whole parts of the run."""
        spool = self._close_spool()
        if spool and os.path.exists(spool):
            os.remove(spool)
        self._pending = self._pending_errors = 0


# What a refused commit means (delta-rs' CommitFailedError, read from its message:
# deltalake 1.6.6 raises one type for every conflict kind).
RIVAL, PROTOCOL, DELETE, RETRY = "rival", "protocol", "delete", "retry"
_CONFLICTS = (
    ("Concurrent transaction failed", RIVAL),  # a newer commit carries our app transaction id
    ("Protocol changed", PROTOCOL),
    ("deleted data this operation read", DELETE),
    ("deleted the same data", DELETE),
    ("Metadata changed", RETRY),
    ("concurrent transactions added new data", RETRY),
)
# Commits in a row a writer retries after conflicts that are not a rival's.
CONFLICT_RETRIES = 5


def conflict_kind(exc: BaseException) -> str:
    """``rival`` (another writer of the run id: fenced), ``protocol`` (the table was upgraded),
    ``delete`` (rows removed under us: retried only if this run's are intact) or ``retry``
    (an append, schema change or anything else: retried on a fresh snapshot)."""
    text = str(exc)
    return next((kind for marker, kind in _CONFLICTS if marker in text), RETRY)


def _commit_error(uri: str, run_id: str, exc: BaseException) -> DragonsError:
    return DragonsError(
        f"run {run_id}: another writer committed to this run id in {uri} first ({storage.short_error(exc)}); it carries the run "
        "on, and every part committed so far is kept: let it finish, or run the same command again after it stops"
    )


def run_binding(dt: Any, run_id: str) -> dict[str, Any] | None:
    """What run ``run_id`` was bound to by its newest commit (None: none recorded). Reads
    the log newest first, a window at a time: a run being continued committed recently."""
    seen = 0
    for limit in (100, None):
        history = dt.history(limit)
        for h in history[seen:]:
            if h.get("dragons_run_id") == run_id and h.get("binding"):
                found: dict[str, Any] = json.loads(h["binding"])
                return found
        if limit is not None and len(history) < limit:
            return None
        seen = len(history)
    return None


def bound_model_version(root: str, run_id: str) -> str | None:
    """The model version run ``run_id`` is bound to in the table at ``root``; None: no table,
    no commit of the run, or a run from before bindings. Cheap for a new run id: its
    transaction version answers first, with no walk through the table's history."""
    from deltalake import DeltaTable

    uri = table_uri(root)
    with storage.delta_errors(uri, "read"):
        if not DeltaTable.is_deltatable(uri, storage_options=storage.delta_options(uri)):
            return None
        dt = open_table(root)
        if not dt.transaction_version(app_id(run_id)):
            return None
        found = run_binding(dt, run_id)
    version = None if found is None else found.get("model_version")
    return str(version) if version else None


def _open_or_create(uri: str, schema_: pa.Schema) -> Any:
    """The table's handle at its newest version; an empty table where there is none.

    Creating it first (one empty commit) means every writer of a run writes
    through a handle, so two first runs of one id into a new table are fenced too."""
    from deltalake import DeltaTable, write_deltalake
    from deltalake.transaction import CommitProperties

    opts = storage.delta_options(uri)
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        try:
            write_deltalake(
                uri,
                schema_.empty_table(),
                mode="append",
                partition_by=[PARTITION],
                storage_options=opts,
                commit_properties=CommitProperties(custom_metadata={"dragons_status": CREATED}),
                # File statistics on every column: Delta's default covers the first
                # 32, and from 28 classes on run_id is beyond them, so queries and
                # conflict checks on run_id could not skip other runs' files.
                configuration={"delta.dataSkippingNumIndexedCols": "-1"},
            )
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
        out.append(
            {
                "version": h.get("version"),
                "committed_at": datetime.fromtimestamp(h.get("timestamp", 0) / 1000, timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "operation": h.get("operation"),
                "run_id": run_id,
                "status": status,
                "part": h.get("dragons_part", 1 if run_id else None),
                "part_rows": h.get("part_rows", h.get("rows", metrics.get("num_added_rows")) if run_id else None),
                "listed": h.get("listed"),
                "skipped": h.get("skipped"),
                "kept": h.get("kept"),
                "scored": h.get("scored"),
                "errors": h.get("errors"),
                "rows": h.get("rows", metrics.get("num_added_rows")),
                "model_version": h.get("model_version"),
                "model": h.get("model"),
                "input": h.get("input"),
                "incremental": h.get("incremental"),
                "dt": h.get("dt"),
                "started_at": h.get("started_at"),
                "commit_interval_s": h.get("commit_interval_s"),
                "failure": h.get("failure"),
                "files_added": metrics.get("num_added_files"),
                "files_removed": metrics.get("num_removed_files"),
                "predicate": params.get("predicate"),
            }
        )
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
        r.update(
            {
                "status": c.get("status"),
                "last_version": c["version"],
                "committed_at": c["committed_at"],
                "rows": c.get("rows"),
                "scored": c.get("scored"),
                "errors": c.get("errors"),
                "model_version": c.get("model_version") or r.get("model_version"),
                "dt": c.get("dt") or r.get("dt"),
                "failure": c.get("failure"),
            }
        )
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
