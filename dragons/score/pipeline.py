"""Bulk scoring: a Ray Data pipeline from an S3 prefix to a Delta Lake table.

    streaming listing (pages; --incremental drops unchanged objects)
    -> Scorer actors: read + decode + infer on a CPU cluster; on a GPU cluster
       CPU tasks read + decode and each actor holds one GPU
    -> the driver spools rows locally -> ONE Delta commit (rows + counts in its
       metadata) makes the run visible.

Every listed object yields exactly one row: an object that cannot be scored
gets ``error`` and null probabilities, never a crashed job.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from dragons import artifact, storage
from dragons.score import listing, table
from dragons.data import DecodeBatch
from dragons.columns import check_classes, prob_column
from dragons.errors import DragonsError
from dragons.score.config import DECODE_CHOICES, ScoreConfig
from dragons.raycluster import DATA_CPU_SHARE, VERBOSE_ENV, cluster, decode_beside_model, driver_stderr_to_log, ensure_ray, ray_output

log = logging.getLogger("dragons.score")
# Lines an operator may want but a person watching a run need not read: always in
# the run's log; on the terminal only with --verbose.
DETAIL = {"detail": True}


# Listing columns carried through decode and scoring into the row.
PASSTHROUGH = ("etag", "size", "last_modified")


class Scorer:
    """Ray Data actor: loads the artifact once, maps batches to probabilities.

    With ``decode`` (CPU clusters) a batch arrives as URIs and the actor reads and
    decodes it itself, the next chunk on threads while the model runs on this one
    (PIL and torch both release the GIL). Without it (GPU clusters) CPU tasks
    decode upstream and the batch arrives as base squares.
    """

    def __init__(self, model_uri: str, tta: int, threads: int, decode: DecodeBatch | None = None,
                 chunk: int = 8) -> None:
        from dragons.predictor import Predictor

        self.art = artifact.load(model_uri)
        self.predictor = Predictor.from_artifact(self.art, tta=tta, threads=threads)
        self.classes = self.art.classes
        self.decode, self.chunk = decode, chunk
        if decode is not None:
            from concurrent.futures import ThreadPoolExecutor

            # One thread runs the next chunk's decode (itself fanning out on the
            # decoder's reader threads), so the model never waits on a cold chunk.
            self.prefetch = ThreadPoolExecutor(max_workers=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.decode is None:
            return self._rows(batch, self._probs(batch))
        # Decode chunk k+1 on the decoder's threads while the model scores chunk k.
        n = len(batch["uri"])
        chunks = [{k: v[i : i + self.chunk] for k, v in batch.items()} for i in range(0, n, self.chunk)]
        pool = self.prefetch
        pending = pool.submit(self.decode, chunks[0]) if chunks else None
        parts, probs = [], []
        for i in range(len(chunks)):
            decoded = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(self.decode, chunks[i + 1]) if i + 1 < len(chunks) else None
            probs.append(self._probs(decoded))
            del decoded["image"]  # 300 KB an image: only the probabilities go on
            parts.append(decoded)
        if not parts:
            return self._rows({**batch, "error": np.array([], dtype=object)}, np.zeros((0, len(self.classes))))
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self._rows(merged, np.concatenate(probs))

    def _probs(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        errors = batch["error"]
        ok = np.array([e == "" for e in errors], dtype=bool)
        probs = np.full((len(errors), len(self.classes)), np.nan, dtype=np.float64)
        if ok.any():
            probs[ok] = self.predictor.numpy(batch["image"] if ok.all() else batch["image"][ok])
        return probs

    def _rows(self, batch: dict[str, np.ndarray], probs: np.ndarray) -> dict[str, np.ndarray]:
        errors = batch["error"]
        ok = np.array([e == "" for e in errors], dtype=bool)
        top = np.where(ok, np.nan_to_num(probs, nan=-1).argmax(1), -1)
        out: dict[str, np.ndarray] = {
            "uri": batch["uri"],
            "label": np.array([self.classes[t] if t >= 0 else None for t in top], dtype=object),
            "score": np.where(ok, np.nan_to_num(probs, nan=0).max(1), np.nan),
            "error": np.array([e if e else None for e in errors], dtype=object),
        }
        for j, c in enumerate(self.classes):
            out[prob_column(c)] = probs[:, j]
        for col in PASSTHROUGH:  # what the listing knew about the object, for --incremental
            if col in batch:
                out[col] = batch[col]
        return out


def _listing_pages(cfg: ScoreConfig) -> Iterator[pa.Table]:
    """The objects to score, one Arrow page at a time (never one Python list)."""
    if cfg.manifest:
        import io

        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        raw = storage.read_bytes(cfg.manifest)
        try:
            t = pq.read_table(io.BytesIO(raw)) if cfg.manifest.endswith(".parquet") else pcsv.read_csv(io.BytesIO(raw))
        except Exception as exc:
            raise DragonsError(f"--manifest {cfg.manifest} is not a readable Parquet/CSV file: {str(exc)[:200]}") from None
        if "uri" not in t.column_names:
            raise DragonsError(f"--manifest {cfg.manifest} has no 'uri' column (columns: {t.column_names})")
        uris = [str(u) for u in t.column("uri").to_pylist() if u]
        if len(uris) < t.num_rows:  # nothing to name a row by: say so rather than drop them silently
            log.warning("--manifest %s: %d of %d rows have an empty or null uri and are left out",
                        storage.redact(cfg.manifest), t.num_rows - len(uris), t.num_rows)
        for i in range(0, len(uris), listing.PAGE_ROWS):
            yield listing.from_uris(uris[i : i + listing.PAGE_ROWS])
        return
    if not cfg.input:
        raise DragonsError("give --input (a prefix to score) or --manifest (a file of URIs)")
    yield from listing.iter_listing(cfg.input)


def size_actors(requested: int, cpus: float, gpus: int) -> tuple[int, float, int, int]:
    """(actors, CPUs per actor, GPUs per actor, torch threads) from the cluster's resources."""
    if gpus > 0:
        n = requested or gpus
        return n, 1.0, 1, 4
    n = requested or max(1, int(cpus))
    cpu = round(cpus * (1 - DATA_CPU_SHARE) / n, 3)
    return n, cpu, 0, max(1, int(round(cpus / n)))


class _Progress:
    """Rows scored and rate, to the terminal and the run's log file."""

    def __init__(self, total: int, every_s: float) -> None:
        self.total, self.every_s = total, every_s
        self.t0 = self.last = time.perf_counter()
        self.rows = self.errors = 0

    def update(self, rows: int, errors: int, force: bool = False) -> None:
        self.rows += rows
        self.errors += errors
        now = time.perf_counter()
        if force or now - self.last >= self.every_s:
            self.last = now
            rate = self.rows / max(now - self.t0, 1e-9)
            eta = (self.total - self.rows) / rate if rate > 0 else float("inf")
            log.info("scored %d/%d rows (%.1f%%), %d errors, %.1f images/s, eta %s", self.rows, self.total,
                     100.0 * self.rows / max(self.total, 1), self.errors, rate, "-" if math.isinf(eta) else f"{eta:.0f}s")


def _setup_logging(path: str) -> logging.Handler:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        if os.environ.get(VERBOSE_ENV, "") != "1":
            console.addFilter(lambda record: not getattr(record, "detail", False))
        log.addHandler(console)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def score(cfg: ScoreConfig) -> dict[str, Any]:
    """Run the pipeline and commit the run; returns the run's commit metadata."""
    if not cfg.output:
        raise DragonsError("--output is required: the table root (path or s3://bucket/prefix)")
    if cfg.decode not in DECODE_CHOICES:
        raise DragonsError(f"--decode {cfg.decode!r} is not one of: {', '.join(DECODE_CHOICES)}")
    if not 0.0 <= cfg.max_error_rate <= 1.0:
        raise DragonsError(f"--max-error-rate must be between 0 and 1, got {cfg.max_error_rate}")
    if cfg.incremental and cfg.manifest:
        raise DragonsError("--incremental needs --input (a listing gives each object's etag and size); "
                           "a --manifest names URIs only")
    started = datetime.now(timezone.utc)
    # The default id: a UTC timestamp and a random suffix, so two runs started in
    # the same second into one table never share an id (and replace each other).
    run_id = cfg.run_id or f"{started.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
    table.check_run_id(run_id)
    meta = artifact.read_meta(cfg.model)  # a wrong --model fails before any Ray work
    classes = list(meta["classes"])
    check_classes(classes)
    if not cfg.dry_run:
        table.check_output(cfg.output)  # a missing/read-only output fails before any image is read
        _check_spool_dir(cfg.spool_dir)
    handler = _setup_logging(cfg.log_file or os.path.join("logs", f"score-{run_id}.log"))
    ray_output.addHandler(handler)  # Ray's own worker lines: in the run's log, not on the terminal
    try:
        return _run(cfg, run_id, started, meta, classes)
    finally:
        ray_output.removeHandler(handler)
        log.removeHandler(handler)
        handler.close()


def _check_spool_dir(path: str) -> None:
    """--spool-dir must be a writable folder before any image is read (it is first written after scoring starts)."""
    if not path:
        return
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise DragonsError(f"--spool-dir {path} is not a writable folder ({exc.strerror or exc}); "
                           "create it, or leave --spool-dir out to use the temp dir") from None


@dataclass
class _Listed:
    """The listing after --incremental's filter: Arrow pages in Ray's object store."""

    refs: list[Any]
    listed: int = 0
    skipped: int = 0
    to_score: int = 0


def _list(cfg: ScoreConfig, model_version: str, run_id: str) -> _Listed:
    """Stream the listing page by page; keep only what needs scoring.

    Pages go to Ray's object store (which spills to disk) as they arrive, so the
    driver holds object references, not rows. A dry run prints the URIs instead.
    """
    import sys

    known = None
    if cfg.incremental:
        from dragons.score.incremental import known_objects

        known = known_objects(cfg.output, model_version, run_id)
        log.info("--incremental: the table holds %d objects scored by model version %s", len(known), model_version,
                 extra=DETAIL)
    out = _Listed(refs=[])
    if not cfg.dry_run:
        import ray

    for page in _listing_pages(cfg):
        out.listed += page.num_rows
        todo = known.unseen(page) if known is not None else page
        out.skipped += page.num_rows - todo.num_rows
        out.to_score += todo.num_rows
        if not todo.num_rows:
            continue
        if cfg.dry_run:
            sys.stdout.write("".join(f"{u}\n" for u in todo.column("uri").to_pylist()))
        else:
            out.refs.append(ray.put(todo))
    if known is not None:
        known.close()
    return out


def _reblock(refs: list[Any], rows: int) -> list[Any]:
    """Listing pages -> blocks of ``rows`` rows, one page in the driver at a time.

    (Ray Data's streaming repartition would do this in a task that waits for a
    whole CPU the scoring actors hold on a small cluster.) ``take`` copies, so a
    block does not carry its page's buffers into the object store.
    """
    import ray

    out = []
    while refs:
        page = ray.get(refs.pop(0))
        for start in range(0, page.num_rows, rows):
            out.append(ray.put(page.take(pa.array(range(start, min(start + rows, page.num_rows))))))
        del page
    return out


def _run(cfg: ScoreConfig, run_id: str, started: datetime, meta: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    import psutil

    source = cfg.manifest or cfg.input
    if not cfg.dry_run:
        ensure_ray(cfg.no_progress_timeout_s)
    todo = _list(cfg, meta["version"], run_id)
    counts = {"listed": todo.listed, "skipped": todo.skipped}
    log.info("listing done: %d objects, driver RSS %.0f MB", todo.listed, psutil.Process().memory_info().rss / 2**20,
             extra=DETAIL)
    if cfg.dry_run:
        log.info("dry run %s: listed %d, skipped %d (unchanged), would score %d from %s", run_id, todo.listed,
                 todo.skipped, todo.to_score, source)
        return {**counts, "scored": 0, "errors": 0, "rows": 0, "would_score": todo.to_score, "run_id": run_id,
                "path": table.table_uri(cfg.output), "dry_run": True}
    log.info("run %s: listed %d, skipped %d unchanged, scoring %d objects from %s with model %s (version %s)", run_id,
             todo.listed, todo.skipped, todo.to_score, storage.redact(source), storage.redact(cfg.model), meta["version"])
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    writer = table.RunWriter(cfg.output, run_id, started, classes, model_version=meta["version"], spool_dir=cfg.spool_dir,
                             target_file_size=cfg.file_size_mb * 2**20 if cfg.file_size_mb else None)
    progress = _Progress(todo.to_score, cfg.progress_s)
    n = todo.to_score
    try:
        if n:
            res = cluster()
            actors, actor_cpu, actor_gpu, threads = size_actors(cfg.actors, res.cpus, res.gpus)
            # Small blocks stream: results (and progress) arrive block by block, and a
            # decoded block (300 KB an image) stays small. Big inputs get up to 256 rows.
            rows_per_block = min(256, max(cfg.batch_size, math.ceil(n / (8 * actors))))
            if math.ceil(n / rows_per_block) < actors:  # a handful of images: no idle actors to start
                actors, actor_cpu, actor_gpu, threads = size_actors(math.ceil(n / rows_per_block), res.cpus, res.gpus)
            # On CPUs the scoring actors decode too (every 300 KB base square would
            # otherwise cross the object store); GPU actors get CPU decode tasks upstream.
            fused = decode_beside_model(cfg.decode, "actors", actor_gpu > 0)
            log.info("%d scoring actor(s) with %g CPU%s each; decoding %s", actors, actor_cpu,
                     " and 1 GPU" if actor_gpu else "", "in the scoring actors" if fused else "in CPU tasks", extra=DETAIL)
            decoder = DecodeBatch(artifact.base_size_of(meta), cfg.max_pixels, max_bytes=cfg.max_bytes)
            ds = ray.data.from_arrow_refs(_reblock(todo.refs, rows_per_block))
            if fused:
                ds = ds.map_batches(
                    Scorer, fn_constructor_args=(cfg.model, cfg.tta, threads, decoder, cfg.batch_size), batch_size=None,
                    compute=ActorPoolStrategy(size=actors), num_cpus=actor_cpu, num_gpus=actor_gpu,  # --decode actors on GPUs
                )
            else:
                # Few decode tasks, each overlapping its S3 GETs on threads: every extra
                # task process costs seconds of imports on a small machine.
                ds = ds.map_batches(decoder, batch_size=cfg.batch_size, num_cpus=DATA_CPU_SHARE,
                                    compute=TaskPoolStrategy(size=max(2, int(res.cpus))))
                ds = ds.map_batches(
                    Scorer, fn_constructor_args=(cfg.model, cfg.tta, threads), batch_size=cfg.batch_size,
                    compute=ActorPoolStrategy(size=actors), num_cpus=actor_cpu, num_gpus=actor_gpu,
                )
            with driver_stderr_to_log():
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                    writer.add(batch)
                    progress.update(batch.num_rows, batch.num_rows - batch.column("error").null_count)
        progress.update(0, 0, force=True)
        todo.refs.clear()
        if writer.rows != n:
            raise DragonsError(f"run {run_id}: {n} objects to score but {writer.rows} rows came back; nothing committed")
        manifest = writer.commit(storage.redact_obj({  # one redaction for everything the commit stores
            **counts, "model": cfg.model, "model_version": meta["version"], "input": source,
            "incremental": cfg.incremental,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("log_file", "spool_dir")},
        }))
    finally:
        writer.discard()
    rate = manifest["errors"] / max(n, 1)
    log.info("run %s committed as table version %d: listed %d, skipped %d, scored %d, errors %d (%.2f%%) -> %s", run_id,
             manifest["version"], manifest["listed"], manifest["skipped"], manifest["scored"], manifest["errors"], 100 * rate,
             manifest["path"])
    if rate > cfg.max_error_rate:
        raise DragonsError(f"run {run_id}: error rate {rate:.2%} exceeds --max-error-rate {cfg.max_error_rate:.2%} "
                           f"({manifest['errors']} of {n}); the rows are committed, see the error column")
    return manifest
