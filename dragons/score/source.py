"""Where a scoring run's objects come from: the listing (or a --manifest), page
by page, minus what the run skips, cut into blocks; and the Ray Data source that
streams them from one read task.

Kept apart from the pipeline on purpose: the read task's process imports this
module to run it, and this module imports neither torch nor the model (a Ray
worker with torch loaded holds ~370 MB more, for a task that only lists).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from dragons import storage
from dragons.errors import DragonsError
from dragons.score import listing
from dragons.score.config import ScoreConfig

log = logging.getLogger("dragons.score")

# The listing read task yields this many rows at a time; Ray Data merges them
# into blocks of STREAM_BLOCK_BYTES (~200-250 listed objects, ~130 bytes each).
LISTING_YIELD_ROWS = 64
STREAM_BLOCK_BYTES = 32 * 1024
# CPU the listing read task asks for: it waits on LIST calls, and must never
# starve the scoring actors of a whole CPU on a small cluster.
LISTING_CPU = 0.1
# Memory Ray reserves for the listing read task's process (measured: ~130 MB
# without torch); Ray Data warns every 30 s about a task that uses more than it asked for.
LISTING_MEMORY = 256 * 2**20


def _manifest_pages(uri: str, page_rows: int) -> Iterator[pa.Table]:
    """A --manifest's URIs, read in batches (CSV or Parquet): never the whole file in memory."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    shown = storage.redact(uri)
    try:
        if uri.endswith(".parquet"):
            f: Any = pq.ParquetFile(fs.open_input_file(path))
            if "uri" not in f.schema_arrow.names:
                raise DragonsError(f"--manifest {shown} has no 'uri' column (columns: {f.schema_arrow.names})")
            batches: Iterator[pa.RecordBatch] = f.iter_batches(batch_size=page_rows, columns=["uri"])
        else:
            f = pcsv.open_csv(fs.open_input_stream(path), read_options=pcsv.ReadOptions(block_size=1 << 20),
                              convert_options=pcsv.ConvertOptions(column_types={"uri": pa.string()}))
            if "uri" not in f.schema.names:
                raise DragonsError(f"--manifest {shown} has no 'uri' column (columns: {f.schema.names})")
            batches = iter(f)
        dropped = 0
        for batch in batches:
            col = batch.column(batch.schema.get_field_index("uri")).cast(pa.string())
            keep = pc.and_(pc.is_valid(col), pc.not_equal(pc.utf8_length(pc.fill_null(col, "")), 0))
            uris = col.filter(keep)
            dropped += len(col) - len(uris)
            for start in range(0, len(uris), page_rows):
                yield listing.from_uris(uris.slice(start, page_rows))
    except DragonsError:
        raise
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        if not storage.exists(uri):
            raise DragonsError(f"--manifest {shown} does not exist: check the path") from None
        raise DragonsError(f"--manifest {shown} is not a readable Parquet/CSV file with a 'uri' column: "
                           f"{storage.redact(str(exc))[:200]}") from None
    if dropped:  # nothing to name a row by: say so rather than drop them silently
        log.warning("--manifest %s: %d rows have an empty or null uri and are left out", shown, dropped)


def listing_pages(cfg: ScoreConfig) -> Iterator[pa.Table]:
    """The objects to score, one Arrow page at a time (never one Python list)."""
    if cfg.manifest:
        yield from _manifest_pages(cfg.manifest, listing.PAGE_ROWS)
        return
    if not cfg.input:
        raise DragonsError("give --input (a prefix to score) or --manifest (a file of URIs)")
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


class CountsActor:
    """Holds the listing's counts for a driver whose listing runs in a Ray read task.

    Pages are reported by index, so a retried read task (which lists again from
    the start) does not count a page twice."""

    def __init__(self) -> None:
        self.pages: dict[int, tuple[int, int, int, int]] = {}
        self.done = False
        self.done_at = 0.0

    def report(self, page: int, listed: int, kept: int, skipped: int, to_score: int) -> None:
        self.pages[page] = (listed, kept, skipped, to_score)

    def finish(self) -> None:
        if not self.done:
            self.done, self.done_at = True, time.time()

    def counts(self) -> Counts:
        c = Counts()
        for v in self.pages.values():
            c.add(*v)
        c.done, c.done_at = self.done, self.done_at
        return c


def todo_blocks(cfg: ScoreConfig, version: int | None, model_version: str, run_id: str, rows_per_block: int,
                report: Any) -> Iterator[pa.Table]:
    """List, drop what the run skips, and cut what is left into blocks of ``rows_per_block``.

    Deterministic for a given table ``version`` (the skip sets are read as of
    it), so a retried read task yields the same blocks in the same order.
    ``report(page, listed, kept, skipped, to_score)`` is called once per page."""
    from dragons.score.incremental import load_skips

    skips = load_skips(cfg.output, version, model_version, run_id, cfg.incremental, cfg.retry_errors)
    try:
        for i, page in enumerate(listing_pages(cfg)):
            todo, kept, skipped = skips.split(page)
            report(i, page.num_rows, kept, skipped, todo.num_rows)
            for start in range(0, todo.num_rows, rows_per_block):
                # take copies: a block must not pin its whole page in the object store
                yield todo.take(pa.array(range(start, min(start + rows_per_block, todo.num_rows))))
    finally:
        skips.close()


def listing_source(cfg: ScoreConfig, version: int | None, model_version: str, run_id: str, rows_per_block: int,
                   counts: Any) -> Any:
    """A Ray Data datasource of one read task that streams ``todo_blocks``: the
    first blocks reach the scoring actors while the listing goes on (10M S3 keys
    are ~10,000 sequential LIST calls: the GPUs must not wait for all of them)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    args = (cfg, version, model_version, run_id, rows_per_block)

    def read() -> Iterator[pa.Table]:
        import ray

        def report(*page: int) -> None:
            counts.report.remote(*page)

        yield from todo_blocks(*args, report=report)
        ray.get(counts.finish.remote())

    class ListingSource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            return [ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None))]

    return ListingSource()
