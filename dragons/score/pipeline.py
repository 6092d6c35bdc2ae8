"""Bulk scoring: a Ray Data pipeline from an S3 prefix to a Delta Lake table.

    listing, page by page (a read task: scoring starts on the first page;
      objects this run already holds, and with --incremental unchanged ones, are skipped)
    -> Scorer actors: read + decode + infer on a CPU cluster; on a GPU cluster
       CPU tasks read + decode and each actor holds one GPU
    -> the driver spools rows locally and commits them in parts (one Delta
       commit every --commit-every rows or --commit-interval seconds); the
       run's last commit records its counts and marks it complete.

Every listed object yields exactly one row: an object that cannot be scored
gets ``error`` and null probabilities, never a crashed job. A run killed at
any moment keeps its committed parts; running the same run id again continues it.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from dragons import artifact, storage
from dragons.score import listing, table
from dragons.score.source import (LISTING_CPU, LISTING_MEMORY, LISTING_YIELD_ROWS, STREAM_BLOCK_BYTES, Counts,
                                   CountsActor, listing_pages, listing_source, todo_blocks)
from dragons.decode import DecodeBatch
from dragons.columns import check_classes, prediction_columns
from dragons.errors import DragonsError
from dragons.score.config import ScoreConfig
from dragons.score.schema import PASSTHROUGH
from dragons.capacity import CPUS_PER_GPU, Grant, GpuRequest, Span, decode_beside_model, parse_span
from dragons.raycluster import DATA_CPU_SHARE, Pool, cluster, driver_stderr_to_log, embedded, ensure_ray, size_actors
from dragons.runlog import Progress, run_log

log = logging.getLogger("dragons.score")
# Lines an operator may want but a person watching a run need not read: always in
# the run's log; on the terminal only with --verbose.
DETAIL = {"detail": True}


# Rows per block once the input is longer than a page (and the most for shorter
# ones): a block is one actor call; a decoded block (300 KB an image) stays small.
STREAM_BLOCK_ROWS = 256


class Scorer:
    """Ray Data actor: loads the artifact once, maps batches to probabilities.

    With ``decode`` (CPU clusters) a batch arrives as URIs and the actor reads and
    decodes it itself, the next chunk on threads while the model runs on this one
    (PIL and torch both release the GIL). Without it (GPU clusters) CPU tasks
    decode upstream and the batch arrives as base squares.
    """

    def __init__(self, model_uri: str, tta: int, threads: int, decode: DecodeBatch | None = None,
                 chunk: int = 8, pinned: tuple[str, list[str]] | None = None) -> None:
        from dragons.predictor import Predictor

        self.art = artifact.load(model_uri)
        if pinned is not None:
            check_pinned(model_uri, self.art.version, self.art.classes, *pinned)
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
        out = {"uri": batch["uri"], **prediction_columns(self.classes, probs, batch["error"])}
        for col in PASSTHROUGH:  # what the listing knew about the object, for --incremental
            if col in batch:
                out[col] = batch[col]
        return out


class ModelChanged(DragonsError):
    """The artifact an actor loaded is not the one the run started with."""


def check_pinned(uri: str, version: str, classes: list[str], want_version: str, want_classes: list[str]) -> None:
    """Every actor (and every restarted one) scores with the run's model, or the run stops."""
    if version != want_version or list(classes) != list(want_classes):
        raise ModelChanged(f"the model at {storage.redact(uri)} changed during the run: this run scores with version "
                           f"{want_version} (classes {want_classes}) but a scoring actor loaded version {version} "
                           f"(classes {list(classes)}); none of its rows is committed. Run the same command again "
                           "(with --replace to rescore the whole run with the new model)")


def _progress_note(errors: int, counts: Counts | None) -> str:
    note = f"{errors} errors"
    if counts is not None and not counts.done:
        note += f", listing goes on: {counts.listed} listed, {counts.to_score} to score so far"
    return note


def score(cfg: ScoreConfig) -> dict[str, Any]:
    """Run the pipeline and commit the run in parts; returns the run's last commit's metadata."""
    cfg.validate()
    started = datetime.now(timezone.utc)
    # The default id: a UTC timestamp and a random suffix, so two runs started in
    # the same second into one table never share an id (and continue each other).
    run_id = cfg.run_id or f"{started.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
    table.check_run_id(run_id)
    meta = artifact.read_meta(cfg.model)  # a wrong --model fails before any Ray work
    classes = list(meta["classes"])
    check_classes(classes)
    if not cfg.dry_run:
        table.check_output(cfg.output)  # a missing/read-only output fails before any image is read
        _check_spool_dir(cfg.spool_dir)
        if cfg.report:
            storage.check_writable(cfg.report, "--report")
    with run_log(cfg.log_file or os.path.join("logs", f"score-{run_id}.log")):
        if cfg.dry_run:
            return _dry_run(cfg, run_id, meta)
        return _run(cfg, run_id, started, meta, classes)


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


def _table_version(root: str) -> int | None:
    from deltalake import DeltaTable

    uri = table.table_uri(root)
    with storage.delta_errors(uri, "read"):
        if not DeltaTable.is_deltatable(uri, storage_options=table.storage_options(uri)):
            return None
    return int(table.open_table(root).version())


def _dry_run(cfg: ScoreConfig, run_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    """List and filter in this process; print what would be scored; write nothing, start no Ray."""
    import sys

    counts = Counts()
    for block in todo_blocks(cfg, _table_version(cfg.output), meta["version"], run_id, listing.PAGE_ROWS,
                             report=lambda _, *c: counts.add(*c)):
        sys.stdout.write("".join(f"{u}\n" for u in block.column("uri").to_pylist()))
    log.info("dry run %s: listed %d, kept %d (this run holds them), skipped %d (unchanged), would score %d from %s",
             run_id, counts.listed, counts.kept, counts.skipped, counts.to_score, storage.redact(cfg.manifest or cfg.input))
    return {"listed": counts.listed, "kept": counts.kept, "skipped": counts.skipped, "scored": 0, "errors": 0, "rows": 0,
            "would_score": counts.to_score, "run_id": run_id, "path": table.table_uri(cfg.output), "dry_run": True}


@dataclass
class _Plan:
    """Where the objects to score come from: all of them, listed in the driver
    (a listing of one page: the count is known and sizes the actor pool), or a
    streaming read task (anything longer)."""

    blocks: list[pa.Table] | None  # small inputs: the blocks themselves
    counts: Counts | None  # small inputs: the listing's counts
    counts_actor: Any = None  # streaming: the read task reports here


def _one_page(cfg: ScoreConfig) -> bool:
    """Whether the whole input fits in one listing page (read before anything is
    written: a wrong --input or --manifest fails here, naming it)."""
    pages = listing_pages(cfg)
    try:
        return next(pages, None) is None or next(pages, None) is None
    finally:
        pages.close()


def _plan(cfg: ScoreConfig, one_page: bool, version: int | None, model_version: str, run_id: str) -> _Plan:
    """A small input is listed here (its count sizes the actor pool); a longer one streams from a read task."""
    if not one_page:
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Beside the driver: a lost worker node must not take the run's counts with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = ray.remote(num_cpus=0)(CountsActor).options(scheduling_strategy=here).remote()
        return _Plan(blocks=None, counts=None, counts_actor=actor)
    counts = Counts()
    blocks = list(todo_blocks(cfg, version, model_version, run_id, listing.PAGE_ROWS, report=lambda _, *c: counts.add(*c)))
    counts.done, counts.done_at = True, time.time()
    return _Plan(blocks=blocks, counts=counts)


def _run(cfg: ScoreConfig, run_id: str, started: datetime, meta: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    source = cfg.manifest or cfg.input
    info = storage.redact_obj({  # one redaction for everything the commits store
        "model": cfg.model, "input": source, "incremental": cfg.incremental,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("log_file", "spool_dir")},
    })
    writer = table.RunWriter(cfg.output, run_id, started, classes, model_version=meta["version"], date=cfg.date,
                             replace=cfg.replace, commit_every=cfg.commit_every, commit_interval_s=cfg.commit_interval_s,
                             spool_dir=cfg.spool_dir, info=info,
                             target_file_size=cfg.file_size_mb * 2**20 if cfg.file_size_mb else None)
    one_page = _one_page(cfg)
    state = writer.begin()  # the table exists from here on; --replace has removed the run's rows
    if state.rows:
        log.info("run %s: continuing, the table holds %d of its rows (%d commits); those are kept", run_id, state.rows,
                 state.part)
    ensure_ray(cfg.no_progress_timeout_s)
    # The table version the run's skip sets are read at; None when there is nothing
    # to skip (a new run, no --incremental): the listing task then never opens the table.
    version = int(writer.table_version) if cfg.incremental or state.rows else None
    t0 = time.time()
    plan = _plan(cfg, one_page, version, meta["version"], run_id)
    log.info("run %s (dt %s): scoring %s with model %s (version %s)%s", run_id, writer.dt, storage.redact(source),
             storage.redact(cfg.model), meta["version"],
             "" if plan.counts is None else f": listed {plan.counts.listed}, kept {plan.counts.kept}, "
                                            f"skipped {plan.counts.skipped} unchanged, scoring {plan.counts.to_score}")
    added = 0
    try:
        added = _score_into(cfg, run_id, meta, plan, version, writer)
        counts = plan.counts if plan.counts is not None else _final_counts(plan.counts_actor)
        if added != counts.to_score:
            raise DragonsError(f"run {run_id}: {counts.to_score} objects to score but {added} rows came back; the "
                               f"committed parts are kept: run the same command again to score the rest")
        manifest = writer.finish({"listed": counts.listed, "skipped": counts.skipped, "kept": counts.kept,
                                  "new_rows": added})
    except BaseException as exc:
        writer.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        writer.discard()
    rate = manifest["errors"] / max(manifest["rows"], 1)
    log.info("run %s complete at table version %d (its commit %d): listed %d, kept %d, skipped %d, scored %d new; "
             "the run holds %d rows, %d errors (%.2f%%) -> %s", run_id, manifest["version"], manifest["dragons_part"],
             manifest["listed"], manifest["kept"], manifest["skipped"], added, manifest["rows"], manifest["errors"],
             100 * rate, manifest["path"])
    report_error = _write_report(cfg, run_id) if cfg.report else None
    if rate > cfg.max_error_rate:
        raise DragonsError(f"run {run_id}: error rate {rate:.2%} exceeds --max-error-rate {cfg.max_error_rate:.2%} "
                           f"({manifest['errors']} of {manifest['rows']}); the rows are committed, see the error column")
    if report_error:
        raise report_error
    # When things happened, seconds from the pipeline's start (for benchmarks; not committed).
    manifest["timings"] = {"listing_done_s": round(counts.done_at - t0, 3) if counts.done_at else None,
                           "first_part_s": round(writer.first_part_at - t0, 3) if writer.first_part_at else None,
                           "total_s": round(time.time() - t0, 3)}
    return manifest


def _write_report(cfg: ScoreConfig, run_id: str) -> DragonsError | None:
    """The run's morning report (dragons report) into ``cfg.report``; an error to raise
    once the run is complete (its rows are committed whatever happens here)."""
    from dragons.score.runreport import write_run_report

    try:
        summary = write_run_report(cfg.output, cfg.report, run_id=run_id)
    except Exception as exc:  # noqa: BLE001 (any failure: the table is complete, say how to redo the report)
        return DragonsError(f"run {run_id} is complete but its report could not be written to "
                            f"{storage.redact(cfg.report)}: {storage.redact(str(exc))[:300]}; write it with "
                            f"dragons report --table {storage.redact(cfg.output)} --run-id {run_id} --out DIR")
    drift = (summary.get("drift") or {}).get("js_distance")
    log.info("run %s: report %s (previous run %s, drift %s)", run_id, storage.join(cfg.report, "index.html"),
             summary.get("previous_run_id") or "none", "-" if drift is None else f"{drift:.3f}")
    return None


def _final_counts(actor: Any) -> Counts:
    import ray

    try:
        counts: Counts = ray.get(actor.counts.remote())
    except ray.exceptions.RayError as exc:
        raise DragonsError(f"the listing's counts were lost ({type(exc).__name__}); the committed parts are kept: "
                           "run the same command again to continue") from None
    if not counts.done:
        raise DragonsError("the listing ended before its last page (its read task failed); the committed parts are "
                           "kept: run the same command again to continue")
    return counts


def _score_into(cfg: ScoreConfig, run_id: str, meta: dict[str, Any], plan: _Plan, version: int | None,
                writer: table.RunWriter) -> int:
    """Stream the plan's objects through the scoring actors into ``writer``; returns rows added."""
    if plan.counts is not None and plan.counts.to_score == 0:
        return 0
    # GPUs: those the cluster has, or asks its autoscaler for (and waits, bounded);
    # the request is withdrawn when scoring ends, so idle nodes go back.
    want = parse_span(cfg.actors, "--actors")
    with GpuRequest("scoring actor", cfg.use_gpu, want, cfg.gpu_wait_s, max(cfg.progress_s, 10.0), say=log.info,
                    local=embedded()) as grant:
        return _stream(cfg, run_id, meta, plan, version, writer, want, grant)


def _stream(cfg: ScoreConfig, run_id: str, meta: dict[str, Any], plan: _Plan, version: int | None,
            writer: table.RunWriter, want: Span, grant: Grant) -> int:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    res = cluster()
    pool = size_actors(want, res.cpus, grant.gpus)
    if grant.gpus and not grant.cuda:  # a GPU resource without CUDA: the model runs on the node's CPU
        pool = Pool(pool.lo, pool.hi, pool.cpu, pool.gpu, max(1, int(CPUS_PER_GPU)))
    if plan.counts is not None:
        # Small blocks stream: results (and progress) arrive block by block, and a
        # decoded block (300 KB an image) stays small.
        n = plan.counts.to_score
        rows_per_block = min(STREAM_BLOCK_ROWS, max(cfg.batch_size, math.ceil(n / (8 * pool.hi))))
        pool = pool.at_most(math.ceil(n / rows_per_block))  # a handful of images: no idle actors to start
        blocks = [b.slice(i, rows_per_block) for b in plan.blocks or [] for i in range(0, b.num_rows, rows_per_block)]
        ds = ray.data.from_arrow(blocks)
    else:
        # The read task lists beside the driver: losing a worker node never restarts the listing.
        node = ray.get_runtime_context().get_node_id()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ds = ray.data.read_datasource(
            listing_source(cfg, version, meta["version"], run_id, LISTING_YIELD_ROWS, plan.counts_actor),
            override_num_blocks=1, num_cpus=LISTING_CPU, memory=LISTING_MEMORY,
            # No retry: a listing replayed after objects changed under the prefix could shift
            # its blocks (one object twice, another never). A failed listing fails the run;
            # running it again resumes from what its parts hold.
            ray_remote_args={"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True), "max_retries": 0})
        # A read task merges what it yields into blocks of this many bytes before
        # any leaves it (128 MiB by default: ~850k listed objects, the GPUs idle
        # meanwhile). Small blocks leave it every LISTING_YIELD_ROWS * a few rows.
        ds.context.target_max_block_size = STREAM_BLOCK_BYTES
    # On CPUs the scoring actors decode too (every 300 KB base square would
    # otherwise cross the object store); GPU actors get CPU decode tasks upstream.
    fused = decode_beside_model(cfg.decode, pool.gpu > 0)
    log.info("%s scoring actor(s) with %g CPU%s each; decoding %s",
             pool.hi if pool.lo == pool.hi else f"{pool.lo} to {pool.hi}", pool.cpu, " and 1 GPU" if pool.gpu else "",
             "in the scoring actors" if fused else "in CPU tasks", extra=None if pool.gpu else DETAIL)
    compute = ActorPoolStrategy(min_size=pool.lo, max_size=pool.hi)
    decoder = DecodeBatch(artifact.base_size_of(meta), cfg.max_pixels, max_bytes=cfg.max_bytes)
    pinned = (meta["version"], list(meta["classes"]))
    if fused:
        ds = ds.map_batches(
            Scorer, fn_constructor_args=(cfg.model, cfg.tta, pool.threads, decoder, cfg.batch_size, pinned),
            batch_size=None, compute=compute, num_cpus=pool.cpu, num_gpus=pool.gpu,  # --decode model on GPUs
        )
    else:
        # Few decode tasks, each overlapping its S3 GETs on threads: every extra
        # task process costs seconds of imports on a small machine.
        ds = ds.map_batches(decoder, batch_size=cfg.batch_size, num_cpus=DATA_CPU_SHARE,
                            compute=TaskPoolStrategy(size=max(2, int(res.cpus))))
        ds = ds.map_batches(
            Scorer, fn_constructor_args=(cfg.model, cfg.tta, pool.threads, None, 8, pinned), batch_size=cfg.batch_size,
            compute=compute, num_cpus=pool.cpu, num_gpus=pool.gpu,
        )
    progress = Progress("scored", plan.counts.to_score if plan.counts is not None else None, every_s=cfg.progress_s)
    added = errors = 0

    def listing_so_far() -> Counts | None:
        if plan.counts is not None:
            return plan.counts
        return ray.get(plan.counts_actor.counts.remote()) if progress.due() else None

    try:
        with driver_stderr_to_log():
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                if writer.add(batch):
                    log.info("run %s: part %d committed (the run holds %d rows)", run_id, writer.part, writer.rows)
                added += batch.num_rows
                errors += batch.num_rows - batch.column("error").null_count
                counts = listing_so_far()
                progress.update(batch.num_rows, total=counts.to_score if counts is not None and counts.done else None,
                                note=_progress_note(errors, counts))
    except DragonsError:
        raise
    except Exception as exc:
        raise _pipeline_error(run_id, exc) from None
    final = plan.counts if plan.counts is not None else _final_counts(plan.counts_actor)
    progress.finish(total=final.to_score, note=_progress_note(errors, final))
    return added


def _pipeline_error(run_id: str, exc: BaseException) -> DragonsError:
    """A Ray error as a clean message; a changed model says so plainly."""
    text = str(exc)
    # Our own error, raised in an actor or the listing task, is the last line of Ray's traceback text.
    for marker in (f"{ModelChanged.__name__}: ", f"{DragonsError.__name__}: "):
        lines = [ln for ln in text.splitlines() if marker in ln]
        if lines:
            return DragonsError(f"run {run_id}: " + lines[-1].split(marker, 1)[1].strip())
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return DragonsError(f"run {run_id}: scoring failed: {storage.redact(first)[:300]}; the committed parts are kept: "
                        "run the same command again to continue (see the run's log for Ray's own lines)")
