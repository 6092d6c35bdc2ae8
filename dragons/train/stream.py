"""Where a worker's images come from, batch by batch.

One interface, :class:`Source` (``batches``, ``row_ids``), one implementation:

* :class:`StreamShard`: the worker's own rows of the data set,
  read and decoded to the base square the recipe needs and no larger, and
  consumed as they arrive: beside GPU workers in Ray Data decode actors
  (``map_batches(DecodeBatch)``, ``iter_batches(prefetch_batches=...)``); on
  CPU clusters by the same ``DecodeBatch`` on threads in the worker itself.
  Memory is bounded by the chunks in flight, not by the number of images.
  (Tests train on images in memory through the same interface: tests/helpers_hardening.py.)

Sharding is ours, not Ray's streaming split: every epoch the driver's row list
is permuted with a seeded generator (the same on every rank) and rank ``r``
takes rows ``r::world`` of it. The shards are disjoint and complete (each
image once per epoch across workers), and since Ray Data is told to preserve
order, a seed gives the same batches, and the same model, on every run. Ray's
``streaming_split`` hands blocks to whichever worker asks first: the same seed
then gave 5 or 6 validation errors from run to run, and its ``equal`` mode drops
rows.

Every rank must run the same number of steps (DDP's all-reduce is collective),
so a shard of n rows is cut into exactly ``steps = ceil(max_n / batch_size)``
batches whose sizes differ by at most one (:func:`split_sizes`).
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from dragons.errors import DragonsError
from dragons.raycluster import DATA_CPU_SHARE
from dragons.train.ranks import all_reduce

# Images per Ray Data block: small blocks keep the memory in flight low (64 base
# squares of 320 px are 20 MB) and let decoding overlap the first steps.
ROWS_PER_BLOCK = 64
# Ray Data batches the consumer keeps decoded ahead of the model.
PREFETCH_BATCHES = 2
# CPU share each decode actor asks for (JPEG decoding at base-square size is light): the
# share every Ray Data step beside the model asks for.
DECODE_ACTOR_CPUS = DATA_CPU_SHARE
MAX_DECODE_ACTORS = 4  # per training worker: enough to keep a GPU fed
DECODE_IO_THREADS = 4  # reads and decodes in flight per decoder (actor, or worker decoding its own rows)


def decode_actors_per_worker(cluster_cpus: float, workers: int, data_cpu_share: float) -> int:
    """Decode actors per training worker from the CPUs left to Ray Data: on
    2 CPUs with 2 workers, one each (more would not fit beside the workers'
    0.75 CPU and would wait, or hang the pass)."""
    free = cluster_cpus * data_cpu_share / max(1, workers)
    return max(1, min(MAX_DECODE_ACTORS, int(free / DECODE_ACTOR_CPUS + 1e-9)))


def shard_rows(n: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Positions (into the driver's row list) of one rank's rows for one epoch.

    Shuffled: a seeded permutation per epoch, identical on every rank, then
    rows ``rank::world``: disjoint, complete, reproducible.
    """
    order = np.random.default_rng([seed, epoch + 1]).permutation(n) if shuffle else np.arange(n)
    return order[rank::world_size]


def num_steps(n_local: int, batch_size: int) -> int:
    """Batches per epoch, the same on every rank: enough for the largest shard."""
    n_max = int(all_reduce([float(n_local)], op="max")[0])
    return max(1, math.ceil(n_max / batch_size))


def split_sizes(n: int, steps: int) -> list[int]:
    """``n`` rows in exactly ``steps`` batches, sizes differing by at most one."""
    base, extra = divmod(n, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 NCHW base squares, labels, row ids


class Source(Protocol):
    """Where a worker's images come from: ``len``, batches of (images, labels, row
    ids), and the row ids of an unshuffled pass without decoding an image."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, shuffle: bool = False, epoch: int = 0) -> Iterator[Batch]: ...

    def row_ids(self) -> np.ndarray: ...


class StreamShard:
    """One rank's rows, decoded while the model works: by ``decode_actors`` Ray
    Data decode actors, or with ``decode_actors=0`` by threads in this process.

    ``rows``: the driver's table (columns uri, label, idx) as a dict of numpy
    arrays; only this rank's rows of it are read each epoch.
    """

    def __init__(
        self,
        rows: dict[str, np.ndarray],
        rank: int,
        world_size: int,
        base_size: int,
        max_pixels: int,
        seed: int,
        decode_actors: int = 1,
        limit: int = 0,
    ) -> None:
        self.rows, self.rank, self.world = rows, rank, world_size
        self.limit = limit  # rows per pass and rank (0 = all): the benchmark's cap
        self.base_size, self.max_pixels, self.seed, self.decode_actors = base_size, max_pixels, seed, decode_actors
        self.n_total = len(rows["idx"])

    def __len__(self) -> int:
        """Rows of this rank (the same for every epoch: only which ones changes)."""
        n = len(range(self.rank, self.n_total, self.world))
        return min(n, self.limit) if self.limit else n

    def dataset(self, positions: np.ndarray) -> Any:
        import ray.data

        from dragons.decode import DecodeBatch

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # batches in our order: reproducible training
        # A worker runs several executions per epoch: Ray Data's per-execution
        # banners would drown our progress lines (dragons.runlog).
        ctx.enable_progress_bars = False
        items = [
            {"uri": str(self.rows["uri"][p]), "label": int(self.rows["label"][p]), "idx": int(self.rows["idx"][p])}
            for p in positions
        ]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / ROWS_PER_BLOCK)))
        # Decode actors, not tasks: a task's process goes idle between blocks and
        # Ray's worker pool (soft limit: one idle process per CPU) kills it, so a
        # fresh process paid ~2 s of imports for every 32 images: 70 processes
        # in one flowers5 run, half a CPU taken from training. An actor imports
        # once per pass.
        return ds.map_batches(
            DecodeBatch,
            fn_constructor_args=(self.base_size, self.max_pixels),
            fn_constructor_kwargs={"io_threads": DECODE_IO_THREADS},
            batch_size=ROWS_PER_BLOCK // 2,
            num_cpus=DECODE_ACTOR_CPUS,
            compute=ray.data.ActorPoolStrategy(size=self.decode_actors),
        )

    def _decoded(self, positions: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """Decoded chunks of these rows, in their order: from Ray Data decode
        actors, or (``decode_actors == 0``) decoded here."""
        if self.decode_actors > 0:
            yield from self.dataset(positions).iter_batches(
                batch_size=None, prefetch_batches=PREFETCH_BATCHES, batch_format="numpy"
            )
        else:
            yield from self._decode_here(positions)

    def _decode_here(self, positions: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """The same decode (``DecodeBatch``, the same values) in this process: one
        thread runs ``PREFETCH_BATCHES`` chunks ahead of the model, and each chunk's
        reads and decodes overlap on ``DecodeBatch``'s I/O threads (PIL and torch
        release the GIL). What a CPU cluster saves: a decode process per worker
        (~0.11 GB and seconds of imports each) and a copy through the object store."""
        from dragons.decode import DecodeBatch

        decode = DecodeBatch(self.base_size, self.max_pixels, io_threads=DECODE_IO_THREADS)
        chunk = ROWS_PER_BLOCK // 2

        def job(start: int) -> dict[str, np.ndarray]:
            sel = positions[start : start + chunk]
            return decode(
                {
                    "uri": np.asarray([str(u) for u in self.rows["uri"][sel]], dtype=object),
                    "label": np.asarray(self.rows["label"][sel]),
                    "idx": np.asarray(self.rows["idx"][sel]),
                }
            )

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dragons-decode") as ahead:
            queued: deque[Future[dict[str, np.ndarray]]] = deque()
            for start in range(0, len(positions), chunk):
                queued.append(ahead.submit(job, start))
                if len(queued) > PREFETCH_BATCHES:
                    yield queued.popleft().result()
            while queued:
                yield queued.popleft().result()

    def positions(self, epoch: int, shuffle: bool) -> np.ndarray:
        """This rank's rows for one pass. Capped (``limit``), an unshuffled pass
        takes a fixed seeded sample in row order: the first rows alone would be
        one class (rows are sorted by class)."""
        if self.limit and not shuffle:
            sample = shard_rows(self.n_total, self.rank, self.world, self.seed, -1, True)[: len(self)]
            return np.sort(sample)
        return shard_rows(self.n_total, self.rank, self.world, self.seed, epoch, shuffle)[: len(self)]

    def row_ids(self) -> np.ndarray:
        """Row ids of an unshuffled pass, without decoding an image."""
        return np.asarray(self.rows["idx"])[self.positions(0, False)].astype(np.int64)

    def batches(self, batch_size: int, shuffle: bool = False, epoch: int = 0) -> Iterator[Batch]:
        positions = self.positions(epoch, shuffle)
        sizes = split_sizes(len(positions), num_steps(len(positions), batch_size))
        if len(positions) == 0:
            for _ in sizes:  # an empty rank still joins every collective step
                yield (
                    torch.zeros(0, 3, self.base_size, self.base_size, dtype=torch.uint8),
                    torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long),
                )
            return
        pending: list[dict[str, np.ndarray]] = []
        have = 0
        it = self._decoded(positions)
        for size in sizes:
            while have < size:
                b = next(it)
                bad = [(str(u), str(e)) for u, e in zip(b["uri"], b["error"]) if e]
                if bad:  # the driver's scan decoded it: the object changed since
                    raise DragonsError(f"image {bad[0][0]} could not be decoded any more ({bad[0][1]}); rerun training")
                pending.append({"image": b["image"], "label": b["label"], "idx": b["idx"]})
                have += len(b["idx"])
            cat = {k: np.concatenate([p[k] for p in pending]) for k in ("image", "label", "idx")}
            rest = {k: v[size:] for k, v in cat.items()}
            pending, have = ([rest] if len(rest["idx"]) else []), len(rest["idx"])
            x = torch.from_numpy(np.ascontiguousarray(cat["image"][:size])).permute(0, 3, 1, 2)
            yield (
                x,
                torch.from_numpy(cat["label"][:size].astype(np.int64)),
                torch.from_numpy(cat["idx"][:size].astype(np.int64)),
            )
