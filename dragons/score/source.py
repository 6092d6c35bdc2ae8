"""Where a scoring run's objects come from: the listing (or a --manifest, or an
S3 Inventory), page by page, minus what the run skips, cut into blocks; and the
Ray Data source that streams them from up to --list-concurrency read tasks,
exactly once even when Ray retries one (see _stream_pages).

Kept apart from the pipeline on purpose: the read task's process imports this
module to run it, and this module imports neither torch nor the model (a Ray
worker with torch loaded holds ~370 MB more, for a task that only lists).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from dragons import storage
from dragons.errors import DragonsError
from dragons.score import listing
from dragons.score.config import ScoreConfig
from dragons.score.incremental import Skips, load_skips
from dragons.score.inventory import inventory_pages
from dragons.score.schema import LISTING_SCHEMA

log = logging.getLogger("dragons.score")

# The most rows a listing block holds. A block is one scoring-actor call, and Ray
# Data's cost is per block (bare Ray Data in this shape: ~12.8k rows/s with 256-row
# blocks, ~70k with 4,096), so blocks are sized for throughput: a listing page is
# cut by bytes (STREAM_BLOCK_BYTES, see _stream_pages), which at the ~100-200 bytes
# of a listed object is 5,000-10,000 rows, never more than this. The actor still
# feeds its model --batch-size images at a time.
BLOCK_ROWS = 16_384
# Ray Data's target block size for the run's dataset: a listing page is cut once
# its rows pass PAGE_OVER times it (see _stream_pages), which with rows of 60 bytes
# or more (uri, a 32-character etag, size, time) is at most BLOCK_ROWS rows. Blocks
# further on (the actors' rows, decoded images) are cut to it too: ~0.75 MiB.
STREAM_BLOCK_BYTES = 48 * BLOCK_ROWS
# ... and where the scoring actors decode (CPU clusters: a row is tens of ms of work),
# small blocks, so that every actor gets work and results stream: ~250 listed objects.
CPU_BLOCK_BYTES = 32 * 1024


def block_bytes(call_rows: int) -> int:
    """Ray Data's target block size for actor calls of ``call_rows`` rows: listing pages
    (cut by bytes, at 60+ bytes a row) of about that many rows, never below CPU_BLOCK_BYTES."""
    return min(STREAM_BLOCK_BYTES, max(CPU_BLOCK_BYTES, 48 * call_rows))


# CPU the listing read task asks for: it waits on LIST calls, and must never
# starve the scoring actors of a whole CPU on a small cluster.
LISTING_CPU = 0.1
# Memory Ray reserves for the listing read task's process (measured: ~130 MB
# without torch); Ray Data warns every 30 s about a task that uses more than it asked for.
LISTING_MEMORY = 256 * 2**20


def _manifest_pages(uri: str, page_rows: int) -> Iterator[pa.Table]:
    """A --manifest's rows, read in batches (CSV or Parquet): never the whole file in memory.

    ``uri`` is required; ``size``, ``etag`` and ``last_modified`` are used when the file
    has them (a manifest written from a listing or an inventory): a size lets the scoring
    actor refuse an object over --max-bytes unread, as from a listing."""
    fs, path = storage.filesystem(uri)
    shown = storage.redact(uri)
    types = {f.name: f.type for f in LISTING_SCHEMA}
    try:
        if uri.endswith(".parquet"):
            f: Any = pq.ParquetFile(fs.open_input_file(path))
            names = f.schema_arrow.names
            if "uri" not in names:
                raise DragonsError(f"--manifest {shown} has no 'uri' column (columns: {names})")
            batches: Iterator[pa.RecordBatch] = f.iter_batches(
                batch_size=page_rows, columns=[c for c in types if c in names]
            )
        else:
            f = pcsv.open_csv(
                fs.open_input_stream(path),
                read_options=pcsv.ReadOptions(block_size=1 << 20),
                convert_options=pcsv.ConvertOptions(column_types={"uri": pa.string(), "etag": pa.string()}),
            )
            if "uri" not in f.schema.names:
                raise DragonsError(f"--manifest {shown} has no 'uri' column (columns: {f.schema.names})")
            batches = iter(f)
        dropped = 0
        for batch in batches:
            col = batch.column(batch.schema.get_field_index("uri")).cast(pa.string())
            keep = pc.and_(pc.is_valid(col), pc.not_equal(pc.utf8_length(pc.fill_null(col, "")), 0))
            page = pa.Table.from_arrays(
                [
                    batch.column(batch.schema.get_field_index(c)).cast(t)
                    if c in batch.schema.names
                    else pa.nulls(batch.num_rows, t)
                    for c, t in types.items()
                ],
                schema=LISTING_SCHEMA,
            ).filter(keep)
            dropped += batch.num_rows - page.num_rows
            for start in range(0, page.num_rows, page_rows):
                yield page.slice(start, page_rows)
    except DragonsError:
        raise
    except (OSError, pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
        if not storage.exists(uri):
            raise DragonsError(f"--manifest {shown} does not exist: check the path") from None
        raise DragonsError(
            f"--manifest {shown} is not a readable Parquet/CSV file with a 'uri' column (and "
            f"optionally size, etag, last_modified): {storage.shorten(str(exc), 200)}"
        ) from None
    if dropped:  # nothing to name a row by: say so rather than drop them silently
        log.warning("--manifest %s: %d rows have an empty or null uri and are left out", shown, dropped)


def listing_pages(cfg: ScoreConfig) -> Iterator[pa.Table]:
    """The objects to score, one Arrow page at a time, in one stream (never one Python list)."""
    if cfg.manifest:
        yield from _manifest_pages(cfg.manifest, listing.PAGE_ROWS)
        return
    if not cfg.input:
        raise DragonsError("give --input (a prefix to score) or --manifest (a file of URIs)")
    if cfg.inventory:
        yield from inventory_pages(cfg.inventory, cfg.input, listing.PAGE_ROWS)
        return
    yield from listing.iter_listing(cfg.input)


@dataclass
class Counts:
    """What the listing found: listed = kept (this run holds them) + skipped (unchanged) + to_score."""

    listed: int = 0
    kept: int = 0
    skipped: int = 0
    to_score: int = 0
    pages: int = 0
    done: bool = False
    done_at: float = 0.0  # time.time() when the listing ended (for the run's timings)

    def add(self, listed: int, kept: int, skipped: int, to_score: int) -> None:
        self.listed += listed
        self.kept += kept
        self.skipped += skipped
        self.to_score += to_score
        self.pages += 1


# A page's place: (the unit's index in its stream's list, the last position listed into it).
Anchor = tuple[int, str]


class CountsActor:
    """Beside the driver: the listing streams' counts, page anchors and process ids.

    Everything is recorded per (stream, page) and the first record wins, so a
    retried stream, which replays its pages from the start, neither counts a page
    twice nor moves one: it reads the anchors back and lists page j as exactly the
    positions in (anchor[j-1], anchor[j]]."""

    def __init__(self) -> None:
        self.pages: dict[Any, tuple[int, int, int, int]] = {}
        self.anchors: dict[int, list[Anchor]] = {}
        self.pids: dict[int, list[int]] = {}
        self.streams = 1
        self.finished: set[int] = set()
        self.done = False
        self.done_at = 0.0

    def expect(self, streams: int) -> None:
        self.streams = streams

    def hello(self, stream: int, pid: int) -> list[Anchor]:
        """A stream (or its retry) starts: its process id, and the anchors of its earlier tries."""
        self.pids.setdefault(stream, []).append(pid)
        return list(self.anchors.get(stream, []))

    def anchor(self, stream: int, page: int, at: Anchor) -> None:
        got = self.anchors.setdefault(stream, [])
        if page == len(got):
            got.append(at)

    def report(self, page: Any, listed: int, kept: int, skipped: int, to_score: int) -> None:
        self.pages.setdefault(page, (listed, kept, skipped, to_score))

    def finish(self, stream: int = 0) -> None:
        self.finished.add(stream)
        if len(self.finished) >= self.streams and not self.done:
            self.done, self.done_at = True, time.time()

    def processes(self) -> dict[int, list[int]]:
        return dict(self.pids)

    def counts(self) -> Counts:
        c = Counts()
        for v in self.pages.values():
            c.add(*v)
        c.done, c.done_at = self.done, self.done_at
        return c


def load_run_skips(cfg: ScoreConfig, version: int | None, model_version: str, run_id: str) -> Any:
    """The run's skip sets as of ``version``, within --skip-memory-limit."""
    return load_skips(
        cfg.output,
        version,
        model_version,
        run_id,
        cfg.incremental,
        cfg.retry_errors,
        memory_limit=cfg.skip_memory_limit,
    )


@dataclass(frozen=True)
class SharedSkips:
    """Skip-set files the driver built once: listing streams on its node map them (each
    stream building its own would read the table N times and hold N copies)."""

    node: str
    done: str
    known: str


def share_skips(skips: Any) -> SharedSkips | None:
    """What the streams need to map the driver's ``skips`` (None: nothing to share)."""
    import ray

    if skips.paths is None:
        return None
    return SharedSkips(ray.get_runtime_context().get_node_id(), *skips.paths)


def _load_skips(
    cfg: ScoreConfig, version: int | None, model_version: str, run_id: str, shared: SharedSkips | None = None
) -> Any:
    """A stream's skip sets: the driver's files when the stream runs on its node, else built here."""
    if shared is not None:
        import ray

        if ray.get_runtime_context().get_node_id() == shared.node and all(
            os.path.exists(p) for p in (shared.done, shared.known)
        ):
            return Skips.mapped(shared.done, shared.known)
    return load_run_skips(cfg, version, model_version, run_id)


def todo_blocks(
    cfg: ScoreConfig,
    version: int | None,
    model_version: str,
    run_id: str,
    rows_per_block: int,
    report: Any,
    skips: Any = None,
) -> Iterator[pa.Table]:
    """List (one stream), drop what the run skips, and cut what is left into blocks of ``rows_per_block``.

    Deterministic for a given table ``version`` (the skip sets are read as of it;
    ``skips``: already loaded, else loaded and closed here).
    ``report(page, listed, kept, skipped, to_score)`` is called once per page."""
    owned = skips is None
    skips = load_run_skips(cfg, version, model_version, run_id) if owned else skips
    try:
        for i, page in enumerate(listing_pages(cfg)):
            todo, kept, skipped = skips.split(page)
            report(i, page.num_rows, kept, skipped, todo.num_rows)
            for start in range(0, todo.num_rows, rows_per_block):
                # take copies: a block must not pin its whole page in the object store
                yield todo.take(pa.array(range(start, min(start + rows_per_block, todo.num_rows))))
    finally:
        if owned:
            skips.close()


COUNTS_ACTOR_PREFIX = "dragons-listing-"


def new_counts() -> Any:
    """The actor that holds a streamed listing's counts, beside the driver: a lost
    worker node must not take the run's counts with it. Named (``COUNTS_ACTOR_PREFIX``
    and a random suffix) so that an operator or a test can find the streams' processes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return (
        ray.remote(num_cpus=0)(CountsActor)
        .options(scheduling_strategy=here, name=COUNTS_ACTOR_PREFIX + secrets.token_hex(4))
        .remote()
    )


def counts_now(actor: Any) -> Counts:
    """The listing's counts so far (for progress lines)."""
    import ray

    counts: Counts = ray.get(actor.counts.remote())
    return counts


def final_counts(actor: Any) -> Counts:
    """The listing's counts once it ended; a clean error when they were lost or it did not end."""
    import ray

    try:
        counts: Counts = ray.get(actor.counts.remote())
    except ray.exceptions.RayError as exc:
        raise DragonsError(
            f"the listing's counts were lost ({type(exc).__name__}); the committed parts are kept: "
            "run the same command again to continue"
        ) from None
    if not counts.done:
        raise DragonsError(
            "the listing ended before its last page (its read task failed); the committed parts are "
            "kept: run the same command again to continue"
        )
    return counts


# How often Ray retries a listing stream whose process died (its replay is exactly once, see _stream_pages).
LISTING_RETRIES = 3


def plan_units(cfg: ScoreConfig) -> list[list[listing.Unit]]:
    """The input's units, dealt round-robin to at most --list-concurrency streams
    (in the driver: a few LIST calls). A --manifest is one stream of its own."""
    if cfg.inventory:
        units = listing.inventory_units(cfg.inventory, cfg.input)
    elif cfg.input and not cfg.manifest:
        units = listing.split(cfg.input, cfg.list_concurrency)
    else:
        return [[]]
    n = max(1, min(cfg.list_concurrency, len(units)))
    return [units[i::n] for i in range(n)]


def listing_dataset(
    cfg: ScoreConfig,
    version: int | None,
    model_version: str,
    run_id: str,
    counts: Any,
    shared: SharedSkips | None = None,
    target_bytes: int = STREAM_BLOCK_BYTES,
) -> Any:
    """The objects to score as a Ray Data dataset streamed by up to --list-concurrency
    listing read tasks (``counts``: the actor from ``new_counts``; ``shared``: the
    driver's skip-set files), in blocks of about ``target_bytes`` (``block_bytes``)."""
    import ray
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    streams = plan_units(cfg)
    ray.get(counts.expect.remote(len(streams)))
    # The read tasks list beside the driver: losing a worker node never restarts the listing.
    node = ray.get_runtime_context().get_node_id()
    ds = ray.data.read_datasource(
        listing_source(cfg, version, model_version, run_id, streams, counts, shared),
        override_num_blocks=len(streams),
        num_cpus=LISTING_CPU,
        memory=LISTING_MEMORY,
        # Retried when a stream's process dies: its replay is exactly once (_stream_pages).
        ray_remote_args={
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True),
            "max_retries": LISTING_RETRIES,
        },
    )
    # Ray Data merges what a read task yields until it passes this many bytes and
    # slices what passes 1.5 times it (output_buffer.py): pages are cut to land in
    # between, so each page leaves as one block (PAGE_OVER, _stream_pages).
    ds.context.target_max_block_size = target_bytes
    return ds


def listing_source(
    cfg: ScoreConfig,
    version: int | None,
    model_version: str,
    run_id: str,
    streams: list[list[listing.Unit]],
    counts: Any,
    shared: SharedSkips | None = None,
) -> Any:
    """A Ray Data datasource of one read task per stream of units: the first
    blocks reach the scoring actors while the listing goes on."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def task(stream: int) -> ReadTask:
        def read() -> Iterator[pa.Table]:
            yield from _stream_pages(cfg, version, model_version, run_id, stream, streams[stream], counts, shared)

        return ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None))

    class ListingSource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            return [task(i) for i in range(len(streams))]

    return ListingSource()


# Exactly once under retries. Ray Data runs each read task as a Ray streaming
# generator (_map_task in ray/data/_internal/execution/operators/map_operator.py
# yields each block, then its metadata: two generator items a block). When the
# task's process dies, Ray submits it again (max_retries) and the owner keeps the
# items it already has: TaskManager::HandleReportGeneratorItemReturns ignores
# reports of an older attempt ("Stale object reports from the previous attempt",
# in _raylet.so) and inserts a retry's item only at an index not yet used, so the
# retry's first k items are dropped and it goes on from item k. Ray checks nothing
# else: StreamingGeneratorReplayInconsistentError (ray/exceptions.py:1039) is
# raised only when a replay after a *successful* attempt (lineage reconstruction)
# yields a different number of items. In-task retries (DataContext.retried_map_errors,
# off by default) skip by index too (iterate_with_retry in ray/data/_internal/util.py).
# So a replay is exactly once only if its i-th block covers the same objects as
# the first try's i-th block. Two things make it so:
# * pages are anchored by position: page j's last position is recorded in the
#   counts actor before page j is yielded, and a retry lists page j as exactly
#   (anchor[j-1], anchor[j]]: objects that changed meanwhile can change what a
#   page holds, never shift a page's bounds; pages past the anchors are new;
# * one page is one block. Ray Data's BlockOutputBuffer (ray/data/_internal/
#   output_buffer.py) merges yielded tables until they pass target_max_block_size
#   and slices a block of 1.5 times it or more, and drops empty tables: a page of
#   4,096 rows under a 4 MiB target leaves merged with the next ones. So pages are
#   cut by bytes, not rows: a page ends at the first row that takes it past
#   PAGE_OVER times the target (never empty, never near 1.5 times), and a replayed
#   page whose size left (target, 1.5 target) because many objects changed in its
#   range stops the task with an error rather than shift the blocks after it.
POS = "_pos"
PAGE_OVER = 1.25
# Arrow bytes a listed row takes besides its strings: 2 offsets, size, last_modified.
ROW_FIXED_BYTES = 4 + 4 + 8 + 8
Chunk = tuple[int, pa.Table, pa.Array]  # (unit index in the stream, listed rows, their positions)


def _chunks(cfg: ScoreConfig, units: list[listing.Unit]) -> Iterator[Chunk]:
    """A stream's units in order, a listing page at a time; a --manifest by row number."""
    if not units:
        row = 0
        for t in listing_pages(cfg):
            yield 0, t, pc.utf8_lpad(pa.array(range(row, row + t.num_rows)).cast(pa.string()), 12, "0")
            row += t.num_rows
        return
    for u, unit in enumerate(units):
        for t, pos in listing.iter_unit(unit):
            yield u, t, pos


def _row_bytes(t: pa.Table) -> np.ndarray:
    """Each row's Arrow bytes (what Ray Data sizes a block by), without a loop over rows."""
    uri = pc.fill_null(pc.binary_length(t.column("uri")), 0)
    etag = pc.fill_null(pc.binary_length(t.column("etag")), 0)
    return np.asarray(pc.add(uri, etag).to_numpy(zero_copy_only=False), dtype=np.int64) + ROW_FIXED_BYTES


def _upto(pos: pa.Array, last: str) -> int:
    """How many of the sorted positions are <= last."""
    return int(np.searchsorted(np.asarray(pos.to_numpy(zero_copy_only=False), dtype=object), last, side="right"))


@dataclass
class _Page:
    """The page being built: its rows to score and what it counted."""

    parts: list[pa.Table]
    bytes: int = 0
    listed: int = 0
    kept: int = 0
    skipped: int = 0
    last: str | None = None

    def add(self, skips: Any, listed: pa.Table) -> None:
        if listed.num_rows == 0:
            return
        todo, kept, skipped = skips.split(listed)
        self.parts.append(todo)
        self.bytes += int(_row_bytes(todo).sum())
        self.listed += listed.num_rows
        self.kept, self.skipped = self.kept + kept, self.skipped + skipped
        self.last = str(listed.column(POS)[-1])

    def table(self) -> pa.Table:
        """The page's rows as one fresh table (copies: it must not pin the listing pages)."""
        if not self.parts:
            return listing.from_uris([]).cast(listing.LISTING_SCHEMA)
        return pa.concat_tables(self.parts).drop_columns([POS]).combine_chunks()

    def counts(self) -> tuple[int, int, int, int]:
        return self.listed, self.kept, self.skipped, sum(p.num_rows for p in self.parts)


def cut_pages(
    chunks: Iterator[Chunk], skips: Any, anchors: list[Anchor], limit: int
) -> Iterator[tuple[_Page, Anchor | None]]:
    """A stream's pages: the first ``len(anchors)`` end at their anchors, later ones
    at the row that takes their rows to score past ``limit`` bytes; the last page
    (no anchor) holds what is left."""
    page, j = _Page([]), 0
    for u, table, pos in chunks:
        t = table.append_column(POS, pos)
        while True:
            if j < len(anchors):
                au, last = anchors[j]
                n = t.num_rows if u < au else _upto(t.column(POS), last) if u == au else 0
                closes = n < t.num_rows or (u == au and n > 0 and str(t.column(POS)[n - 1]) == last)
                at: Anchor = anchors[j]
            else:
                todo, _, _ = skips.split(t)
                over = np.flatnonzero(np.cumsum(_row_bytes(todo)) + page.bytes > limit)
                closes = over.size > 0
                n = _upto(t.column(POS), str(todo.column(POS)[int(over[0])])) if closes else t.num_rows
                at = (u, str(t.column(POS)[n - 1])) if closes else (u, "")
            page.add(skips, t.slice(0, n))
            t = t.slice(n)
            if not closes:
                break
            yield page, at
            page, j = _Page([]), j + 1
            if t.num_rows == 0:
                break
    while j < len(anchors):  # anchored pages whose objects are all gone now
        yield page, anchors[j]
        page, j = _Page([]), j + 1
    yield page, None


def _stream_pages(
    cfg: ScoreConfig,
    version: int | None,
    model_version: str,
    run_id: str,
    stream: int,
    units: list[listing.Unit],
    counts: Any,
    shared: SharedSkips | None = None,
    target: int | None = None,
) -> Iterator[pa.Table]:
    """One listing stream's blocks (one per page), anchored and counted in ``counts``."""
    import ray
    from ray.data.context import DataContext

    target = target or DataContext.get_current().target_max_block_size or STREAM_BLOCK_BYTES
    anchors: list[Anchor] = ray.get(counts.hello.remote(stream, os.getpid()))
    skips = _load_skips(cfg, version, model_version, run_id, shared)
    try:
        for j, (page, at) in enumerate(cut_pages(_chunks(cfg, units), skips, anchors, int(PAGE_OVER * target))):
            block = page.table()
            if at is not None and j < len(anchors) and not target < block.nbytes < 1.5 * target:
                raise DragonsError(
                    f"the objects under --input {storage.redact(cfg.input)} changed too much while a listing stream "
                    f"was retried (page {j} of stream {stream} now holds {block.num_rows} objects to score): it stops "
                    "rather than score one twice; the committed parts are kept: run the same command again"
                )
            if at is not None:
                ray.get(counts.anchor.remote(stream, j, at))
            ray.get(counts.report.remote((stream, j), *page.counts()))
            yield block
        ray.get(counts.finish.remote(stream))
    finally:
        skips.close()
