"""Which listed objects a run still has to score: resume and ``--incremental``.

Two sets, both read from the table *as of one version* (fixed when the run
starts, so a retried listing task filters exactly as the first try did), each
kept as one sorted array of 64-bit hashes (8 bytes an object, not a Python set
of strings):

* **done**: objects this run id already holds (committed parts of an earlier,
  killed attempt). They are kept as they are and skipped: that is resume.
* **known** (``--incremental`` only): objects whose ``latest`` row for this
  model version, in another run, has the same etag and size and is not a
  transient error. A new model version therefore scores everything.

Each listing page is hashed the same way and filtered with a binary search. A
64-bit collision (probability ~ n^2 / 2^65, about 3e-6 for 10M objects) would
skip one object for one night.

Bounded memory, at any table size (issue 28): the sets are built by DuckDB
under ``--skip-memory-limit`` with a private temporary folder to spill to. The
newest row per object is not a window function (DuckDB's window and hash
aggregate need memory that grows with the rows) but an external sort by
``hash(uri), scored_at DESC, run_id DESC`` whose first row per uri hash is kept
while the result streams out; a sort's memory still grows slowly (its merge
pins a block per sorted run), so a table too big for one sort is done in
passes, each over one range of ``hash(uri)``. The hashes go to files in that
folder, read back as read-only memory maps: the page cache holds them, which
the kernel reclaims, so the listing process does not grow with the table.

Error kinds: a row's ``error_kind`` (``dragons.rowerrors.ErrorKind``). Permanent
kinds describe the object itself and stay until it changes; transient ones
(``read_error``, ``access_denied``, ``not_found``) may not come back:
``--incremental`` scores those objects again, and ``--retry-errors`` scores
every error row again. An error row without a kind (written before the column,
see ``_kept_sql``) counts as transient.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from dragons import storage
from dragons.errors import DragonsError
from dragons.rowerrors import ERROR_KIND, PERMANENT
from dragons.score.engine import QueryLimits, new_connection, open_table, sql_error

_OBJECT_HASH = "hash(uri::VARCHAR, coalesce(etag, '')::VARCHAR, coalesce(size, -1)::BIGINT)"
_URI_HASH = "hash(uri::VARCHAR)"

# The columns the sets read; nothing else of a row is decoded.
_SCAN_COLUMNS = ["uri", "etag", "size", "error", ERROR_KIND, "scored_at", "run_id"]
# Rows per Arrow batch read from the table, and per batch streamed out of a sort:
# a few MB each, nothing beside DuckDB's memory.
_SCAN_ROWS = 65_536
_FETCH_ROWS = 262_144
# Bytes of --skip-memory-limit per row one sort pass may take. Measured (one
# thread, 70-character uris): a pass of 1M rows needs ~20 MB, 10M ~40 MB, 30M
# ~80 MB, growing like the square root of the rows; 8 bytes a row leaves two to
# three times that (256MB: 33M rows a pass, so 100M rows take 3 passes).
_LIMIT_BYTES_PER_ROW = 8
# Below this DuckDB cannot even sort a small table.
_MIN_MEMORY = 16 * 10**6
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*$", re.IGNORECASE)


def parse_memory_limit(value: str) -> int:
    """``--skip-memory-limit`` in bytes (DuckDB's units: MB = 10^6, MiB = 2^20)."""
    m = _SIZE.match(str(value))
    if m is None:
        raise DragonsError(f"--skip-memory-limit {value!r} is not a size: give one like 256MB or 1GB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < _MIN_MEMORY:
        raise DragonsError(
            f"--skip-memory-limit {value!r} is too small for the skip sets: give at least 16MB "
            "(the default, 256MB, holds any table)"
        )
    return size


def _sorted(hashes: Any) -> np.ndarray:
    return np.sort(np.asarray(hashes, dtype=np.uint64))


def _member(sorted_hashes: np.ndarray, h: np.ndarray) -> np.ndarray:
    if sorted_hashes.size == 0:
        return np.zeros(h.size, dtype=bool)
    # Searching in ascending order lets numpy narrow each search by the last one and
    # walk the (mapped) set forwards: 2-3 times faster for a page of 4,096 than random order.
    order = np.argsort(h)
    ordered = h[order]
    pos = np.minimum(np.searchsorted(sorted_hashes, ordered), sorted_hashes.size - 1)
    found = np.empty(h.size, dtype=bool)
    found[order] = np.asarray(sorted_hashes[pos]) == ordered
    return found


def _open_hashes(path: str) -> np.ndarray:
    """A sorted hash file as a read-only memory map (numpy cannot map an empty file)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, np.uint64)
    return np.memmap(path, dtype=np.uint64, mode="r")


@dataclass
class Skips:
    """The objects a run skips: ``done`` (this run's, by uri) and ``known`` (unchanged).

    Built from arrays (sorted here) or, by :func:`load_skips`, from files of sorted
    hashes mapped read-only; :meth:`close` removes those files."""

    done: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    known: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    _con: Any = field(init=False, default=None, repr=False)
    _files: Any = field(init=False, default=None, repr=False)  # removes the folder behind done/known
    paths: tuple[str, str] | None = field(init=False, default=None)  # the files behind done/known, when mapped

    def __post_init__(self) -> None:
        self.done, self.known = _sorted(self.done), _sorted(self.known)

    @classmethod
    def on_disk(cls, folder: str, done: str, known: str) -> Skips:
        """The sets in the files ``done`` and ``known`` (sorted uint64) under ``folder``,
        which is removed at :meth:`close`, or when the Skips is collected."""
        skips = cls.mapped(done, known)
        # Even a Skips nobody closes must not leave gigabytes in the temp folder.
        skips._files = weakref.finalize(skips, shutil.rmtree, folder, True)
        return skips

    @classmethod
    def mapped(cls, done: str, known: str) -> Skips:
        """The sets in files another Skips owns (the driver's, mapped by the listing streams
        on its node: one build, one copy in the page cache); :meth:`close` leaves them."""
        skips = cls()
        skips.done, skips.known = _open_hashes(done), _open_hashes(known)
        skips.paths = (done, known)
        return skips

    def split(self, page: pa.Table) -> tuple[pa.Table, int, int]:
        """(rows still to score, rows this run already holds, rows unchanged since an earlier run)."""
        if page.num_rows == 0 or (self.done.size == 0 and self.known.size == 0):
            return page, 0, 0
        if self._con is None:
            # Hashes of one listing page at a time: one thread, little memory.
            self._con = new_connection(QueryLimits(threads=1, memory_limit="256MB", timeout_s=0))
        self._con.register("page", page)
        h = self._con.execute(f"SELECT {_URI_HASH} AS u, {_OBJECT_HASH} AS o FROM page").fetchnumpy()
        self._con.unregister("page")
        done = _member(self.done, np.asarray(h["u"], dtype=np.uint64))
        known = _member(self.known, np.asarray(h["o"], dtype=np.uint64)) & ~done
        return page.filter(pa.array(~(done | known))), int(done.sum()), int(known.sum())

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        # Drop the maps before their files go.
        self.done, self.known = np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        if self._files is not None:
            self._files()
            self._files = None


def _passes(rows: int, limit_bytes: int) -> list[tuple[int, int]]:
    """The ``hash(uri)`` ranges [lo, hi], ascending, that split ``rows`` into sorts that fit the limit."""
    n = max(1, math.ceil(rows / max(1, limit_bytes // _LIMIT_BYTES_PER_ROW)))
    return [((k << 64) // n, ((k + 1) << 64) // n - 1) for k in range(n)]


def _first_of_each(sorted_values: np.ndarray, previous: int | None) -> np.ndarray:
    """True at the first of each run of equal values (the stream continues ``previous``)."""
    first = np.empty(sorted_values.size, dtype=bool)
    if sorted_values.size:
        first[0] = previous is None or int(sorted_values[0]) != previous
        np.not_equal(sorted_values[1:], sorted_values[:-1], out=first[1:])
    return first


def _stream(con: Any, sql: str, params: dict[str, Any] | None = None) -> Iterator[pa.RecordBatch]:
    """A sorted query's result, batch by batch: DuckDB keeps the sort spilled, not the result in Python."""
    yield from con.execute(sql, params or {}).fetch_record_batch(_FETCH_ROWS)


def _column(batch: pa.RecordBatch, i: int) -> np.ndarray:
    return np.asarray(batch.column(i).to_numpy(zero_copy_only=False))


class _Builder:
    """One DuckDB connection under ``limits``, spilling under ``folder``, and the
    files of hashes it writes there."""

    def __init__(self, folder: str, limits: QueryLimits) -> None:
        self.folder, self.limits = folder, limits
        self.limit_bytes = parse_memory_limit(limits.memory_limit)
        self.spill = os.path.join(folder, "spill")
        # The order of rows is the sorts' business: unordered results stream with less memory.
        self.con = new_connection(limits, spill_dir=self.spill, ordered=False)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def write_sorted(
        self,
        name: str,
        ranges: list[tuple[int, int]],
        source: Callable[[], pa.RecordBatchReader],
        sql: str,
        pick: Callable[[pa.RecordBatch, int | None], tuple[np.ndarray, int | None]],
        params: dict[str, Any] | None = None,
    ) -> int:
        """Runs ``sql`` (sorted by its first column ``u``, over the view ``src``) once per
        range of ``u`` and appends what ``pick`` keeps of each batch to the file ``name``:
        the ranges ascend, so the file is sorted. Returns the hashes written."""
        written = 0
        with open(self.path(name), "wb") as out:
            for lo, hi in ranges:
                self.con.register("src", source())
                try:
                    previous: int | None = None
                    ranged = sql.format(where=f"u BETWEEN {lo}::UBIGINT AND {hi}::UBIGINT")
                    for batch in _stream(self.con, ranged, params):
                        keep, previous = pick(batch, previous)
                        written += _append(out, keep)
                finally:
                    self.con.unregister("src")
        return written

    def close(self) -> None:
        self.con.close()


def _append(out: BinaryIO, hashes: np.ndarray) -> int:
    np.ascontiguousarray(hashes, dtype=np.uint64).tofile(out)
    return int(hashes.size)


def _distinct(batch: pa.RecordBatch, previous: int | None) -> tuple[np.ndarray, int | None]:
    """Each hash once, of a stream sorted by it."""
    u = _column(batch, 0).astype(np.uint64, copy=False)
    return u[_first_of_each(u, previous)], (int(u[-1]) if u.size else previous)


def _newest_kept(batch: pa.RecordBatch, previous: int | None) -> tuple[np.ndarray, int | None]:
    """Of a stream sorted by (uri hash, newest first): the object hash of each uri's
    newest row, where that row is one to keep (not a transient error)."""
    u = _column(batch, 0).astype(np.uint64, copy=False)
    o, kept = _column(batch, 1).astype(np.uint64, copy=False), _column(batch, 2).astype(bool, copy=False)
    return o[_first_of_each(u, previous) & kept], (int(u[-1]) if u.size else previous)


def _file_reader(path: str) -> pa.RecordBatchReader:
    """A file of uint64 hashes as an Arrow stream of column ``u``, a batch at a time."""
    schema = pa.schema([pa.field("u", pa.uint64(), nullable=False)])
    data = _open_hashes(path)

    def batches() -> Iterator[pa.RecordBatch]:
        for start in range(0, data.size, _FETCH_ROWS):
            yield pa.record_batch([pa.array(np.array(data[start : start + _FETCH_ROWS]))], schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def _done_file(b: _Builder, dataset: Any, run_id: str) -> str:
    """The uri hashes of the rows run ``run_id`` holds, sorted, each once."""
    import pyarrow.dataset as pds

    flt = pds.field("run_id") == run_id
    b.write_sorted(
        "done.u64",
        _passes(dataset.count_rows(filter=flt), b.limit_bytes),
        lambda: _scan(dataset, flt),
        f"SELECT u FROM (SELECT {_URI_HASH} AS u FROM src) WHERE {{where}} ORDER BY u",
        _distinct,
    )
    return b.path("done.u64")


def _known_file(b: _Builder, dataset: Any, model_version: str, run_id: str, retry_errors: bool) -> str:
    """The object hashes of each uri's newest row for ``model_version`` in other runs,
    where that row is kept (no error, or a permanent one without --retry-errors), sorted."""
    import pyarrow.dataset as pds

    flt = (pds.field("model_version") == model_version) & (pds.field("run_id") != run_id)
    kept, params = _kept_sql(ERROR_KIND in dataset.schema.names and not retry_errors)
    # schema.newest_row's order (scored_at DESC, then run_id DESC; NULLS LAST is DuckDB's
    # default there), then, for rows that tie on both, the rule a retried listing must
    # repeat: an error row first (score it again), then the smaller object hash.
    sql = (
        f"SELECT u, o, k FROM (SELECT {_URI_HASH} AS u, {_OBJECT_HASH} AS o, coalesce({kept}, false) AS k, "
        "scored_at, run_id FROM src) WHERE {where} "
        "ORDER BY u, scored_at DESC NULLS LAST, run_id DESC NULLS LAST, k, o"
    )
    n = b.write_sorted(
        "known.unsorted",
        _passes(dataset.count_rows(filter=flt), b.limit_bytes),
        lambda: _scan(dataset, flt),
        sql,
        _newest_kept,
        params,
    )
    # Those hashes come out in uri-hash order: a second, narrow sort puts them in their own.
    unsorted = b.path("known.unsorted")
    b.write_sorted(
        "known.u64",
        _passes(n, b.limit_bytes),
        lambda: _file_reader(unsorted),
        "SELECT u FROM src WHERE {where} ORDER BY u",
        _distinct,
    )
    os.remove(unsorted)
    return b.path("known.u64")


def _kept_sql(permanent_kept: bool) -> tuple[str, dict[str, Any]]:
    """(SQL, parameters) of a row an unchanged object keeps: one without an error, and
    with ``permanent_kept`` one whose error is of a permanent kind (the enum's split).

    An error row whose ``error_kind`` is NULL (written before the column existed; a
    table without the column at all reads as such) counts as transient: its object is
    scored again, which loses nothing, and the new row has its kind."""
    if not permanent_kept:
        return "error IS NULL", {}
    return f"error IS NULL OR {ERROR_KIND} IN $permanent", {"permanent": sorted(k.value for k in PERMANENT)}


def _scan(dataset: Any, flt: Any) -> pa.RecordBatchReader:
    """The rows ``flt`` selects, only the columns the sets need (those the table has), a few batches read ahead."""
    columns = [c for c in _SCAN_COLUMNS if c in dataset.schema.names]
    return dataset.scanner(
        columns=columns, filter=flt, batch_size=_SCAN_ROWS, batch_readahead=2, fragment_readahead=1
    ).to_reader()


def load_skips(
    table_root: str,
    version: int | None,
    model_version: str,
    run_id: str,
    incremental: bool,
    retry_errors: bool = False,
    memory_limit: str = "256MB",
) -> Skips:
    """What run ``run_id`` skips, read from the table as of ``version`` (None: no table yet),
    within ``memory_limit`` of DuckDB memory (``--skip-memory-limit``), spilling to TMPDIR."""
    parse_memory_limit(memory_limit)  # a bad --skip-memory-limit fails before the table is read
    if version is None:
        return Skips()

    with storage.delta_errors(table_root, "read"):
        dataset = open_table(table_root, version).to_pyarrow_dataset()
    # One thread: the table arrives as one Arrow stream, and each thread would hold a
    # sort state of its own within the same limit. No deadline: a night waits for its sets.
    limits = QueryLimits(
        memory_limit=memory_limit,
        threads=1,
        timeout_s=0,
        memory_flag="--skip-memory-limit",
        memory_advice="raise it (e.g. --skip-memory-limit 1GB)",
    )
    folder = tempfile.mkdtemp(prefix="dragons-skips-")
    try:
        b = _Builder(folder, limits)
        try:
            done = _done_file(b, dataset, run_id)
            known = _known_file(b, dataset, model_version, run_id, retry_errors) if incremental else b.path("known.u64")
            if not incremental:
                open(known, "wb").close()
        finally:
            b.close()
        shutil.rmtree(b.spill, ignore_errors=True)
        # Arrow keeps freed scan buffers for reuse; the listing that follows needs none of them.
        pa.default_memory_pool().release_unused()
        return Skips.on_disk(folder, done, known)
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, DragonsError) or not isinstance(exc, Exception):
            raise
        what = f"reading what {table_root} holds for run {run_id}"
        raise sql_error(exc, limits, what=what, disk=os.path.dirname(folder)) from None
