"""Bulk scoring: a Ray Data pipeline from an S3 prefix to a Delta Lake table, in three steps.

    plan(cfg, ...)       -> ScorePlan  (Ray-free: actor pool, decode topology, block sizes, the source)
    build_dataset(plan)  -> Dataset    listing read tasks (scoring starts on the first page; objects
                                       this run already holds, and with --incremental unchanged ones,
                                       are skipped) -> Scorer actors (read + decode + infer on a CPU
                                       cluster; on a GPU cluster CPU tasks decode, each actor one GPU)
    commit_stream(ds, writer) -> Streamed  the driver spools rows locally and commits them in parts
                                       (every --commit-every rows or --commit-interval seconds, on a
                                       committer thread, off the loop); the run's last commit records
                                       its counts and marks it complete.

Every listed object yields exactly one row: an object that cannot be scored
gets ``error`` and null probabilities, never a crashed job. A run killed at
any moment keeps its committed parts; running the same run id again continues it.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from dragons import artifact, storage
from dragons.capacity import CPUS_PER_GPU, GpuRequest, Grant, decode_beside_model, parse_span
from dragons.columns import check_classes
from dragons.decode import DecodeBatch
from dragons.errors import DragonsError
from dragons.loop import versions
from dragons.raycluster import (
    DATA_CPU_SHARE,
    Pool,
    cluster,
    data_tasks,
    driver_stderr_to_log,
    embedded,
    ensure_ray,
    model_device,
    size_actors,
)
from dragons.runlog import Progress, run_log
from dragons.score import listing, table
from dragons.score.config import ScoreConfig
from dragons.score.scorer import ModelChanged, Scorer
from dragons.score.source import (
    BLOCK_ROWS,
    Counts,
    SharedSkips,
    block_bytes,
    counts_now,
    final_counts,
    listing_dataset,
    listing_pages,
    load_run_skips,
    new_counts,
    share_skips,
    todo_blocks,
)
from dragons.telemetry import ScoreMetrics

log = logging.getLogger("dragons.score")
# Lines an operator may want but a person watching a run need not read: always in
# the run's log; on the terminal only with --verbose.
DETAIL = {"detail": True}

# Rows per scoring-actor call on CPU actors: there a row is a read and a decode
# (tens of ms), so Ray Data's per-block cost is noise, and small calls keep the
# actors evenly loaded to the run's last image. GPU actors take BLOCK_ROWS a call.
CPU_CALL_ROWS = 256
# Rows per decode-task call feeding GPU actors: ~12 MB of base squares, small
# enough for the object store, large enough that its per-block cost stays small.
DECODE_ROWS = 64


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
    # ROOT@alias is resolved once, here: a promotion during the run changes nothing in it.
    model = versions.resolve(cfg.model)
    meta = artifact.read_meta(model.dir)  # a wrong --model fails before any Ray work
    check_classes(list(meta["classes"]))
    if not cfg.dry_run:
        table.check_output(cfg.output)  # a missing/read-only output fails before any image is read
        _check_spool_dir(cfg.spool_dir)
        if cfg.report:
            storage.check_writable(cfg.report, "--report")
    with run_log(cfg.log_file or os.path.join("logs", f"score-{run_id}.log")):
        if model.alias is not None and not cfg.replace:
            model, meta = _bound_version(cfg, run_id, model, meta)
        # From here on the model is that one version's folder: the actors load it, never the alias.
        ref, cfg = model.ref, replace(cfg, model=model.dir)
        if cfg.dry_run:
            return _dry_run(cfg, run_id, meta)
        return _run(cfg, run_id, started, meta, list(meta["classes"]), ref)


def _bound_version(
    cfg: ScoreConfig, run_id: str, model: versions.Resolved, meta: dict[str, Any]
) -> tuple[versions.Resolved, dict[str, Any]]:
    """A run continued with ``ROOT@alias`` after the alias moved keeps the version it is
    bound to, when that registry holds it: one run, one model. Otherwise (another registry,
    a version it lacks) the model stays as resolved and the run's binding check refuses it."""
    bound = table.bound_model_version(cfg.output, run_id)
    if bound is None or bound == model.version:
        return model, meta
    assert model.registry is not None
    try:
        pinned = versions.resolve(f"{model.registry}@{bound}")
    except DragonsError:
        return model, meta
    if pinned.version != bound:
        return model, meta
    log.info(
        "run %s is bound to version %s; @%s is now %s; continuing with %s",
        run_id,
        bound,
        model.alias,
        model.version,
        bound,
    )
    return versions.Resolved(pinned.dir, bound, model.registry, model.name, model.alias), artifact.read_meta(pinned.dir)


def _check_spool_dir(path: str) -> None:
    """--spool-dir must be a writable folder before any image is read (it is first written after scoring starts)."""
    if not path:
        return

    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise DragonsError(
            f"--spool-dir {path} is not a writable folder ({exc.strerror or exc}); "
            "create it, or leave --spool-dir out to use the temp dir"
        ) from None


def _table_version(root: str) -> int | None:
    from deltalake import DeltaTable

    uri = table.table_uri(root)
    with storage.delta_errors(uri, "read"):
        if not DeltaTable.is_deltatable(uri, storage_options=storage.delta_options(uri)):
            return None
    return int(table.open_table(root).version())


def _dry_run(cfg: ScoreConfig, run_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    """List and filter in this process; print what would be scored; write nothing, start no Ray."""
    counts = Counts()
    for block in todo_blocks(
        cfg, _table_version(cfg.output), meta["version"], run_id, listing.PAGE_ROWS, report=lambda _, *c: counts.add(*c)
    ):
        sys.stdout.write("".join(f"{u}\n" for u in block.column("uri").to_pylist()))
    log.info(
        "dry run %s: listed %d, kept %d (this run holds them), skipped %d (unchanged), would score %d from %s",
        run_id,
        counts.listed,
        counts.kept,
        counts.skipped,
        counts.to_score,
        storage.redact(cfg.inventory or cfg.manifest or cfg.input),
    )
    return {
        "listed": counts.listed,
        "kept": counts.kept,
        "skipped": counts.skipped,
        "scored": 0,
        "errors": 0,
        "rows": 0,
        "would_score": counts.to_score,
        "run_id": run_id,
        "path": table.table_uri(cfg.output),
        "dry_run": True,
    }


def _one_page(cfg: ScoreConfig) -> bool:
    """Whether the whole input fits in one listing page (read before anything is
    written: a wrong --input, --manifest or --inventory fails here, naming it)."""
    pages = listing_pages(cfg)
    try:
        return next(pages, None) is None or next(pages, None) is None
    finally:
        getattr(pages, "close", lambda: None)()  # a generator: close its listing now


@dataclass(frozen=True)
class Listed:
    """A small input (one listing page), listed in the driver: its count sizes the actor pool."""

    blocks: tuple[pa.Table, ...]
    counts: Counts


def list_here(cfg: ScoreConfig, version: int | None, model_version: str, run_id: str, skips: Any) -> Listed:
    counts = Counts()
    blocks = tuple(
        todo_blocks(
            cfg, version, model_version, run_id, listing.PAGE_ROWS, report=lambda _, *c: counts.add(*c), skips=skips
        )
    )
    counts.done, counts.done_at = True, time.time()
    return Listed(blocks, counts)


@dataclass(frozen=True)
class ScorePlan:
    """Everything the dataset is built from, decided before any Ray call."""

    cfg: ScoreConfig
    run_id: str
    model_version: str
    classes: tuple[str, ...]
    base_size: int
    version: int | None  # the table version the skip sets are read at; None: nothing to skip
    pool: Pool
    fused: bool  # the scoring actors decode (CPU clusters) or CPU tasks decode upstream (GPU actors)
    call_rows: int  # rows per scoring-actor call
    listed: Listed | None  # a small input listed here; None: listing read tasks stream it

    @property
    def to_score(self) -> int | None:
        return None if self.listed is None else self.listed.counts.to_score


def plan(
    cfg: ScoreConfig,
    run_id: str,
    meta: dict[str, Any],
    version: int | None,
    listed: Listed | None,
    cpus: float,
    grant: Grant,
) -> ScorePlan:
    """Size the actor pool for the cluster (``cpus``) and the GPUs granted, choose
    where decoding runs and how many rows each actor call takes. Pure: no Ray."""
    pool = size_actors(parse_span(cfg.actors, "--actors"), cpus, grant.gpus)
    if grant.gpus and model_device(True, grant.cuda) == "cpu":  # a GPU resource without CUDA: the node's CPU
        pool = Pool(pool.lo, pool.hi, pool.cpu, pool.gpu, max(1, int(CPUS_PER_GPU)))
    call_rows = BLOCK_ROWS if pool.gpu else CPU_CALL_ROWS
    if cfg.block_rows:
        call_rows = cfg.block_rows
    if listed is not None:
        # A handful of images: blocks small enough for every actor to get some, and no idle actors to start.
        n = listed.counts.to_score
        call_rows = min(call_rows, max(cfg.batch_size, math.ceil(n / (8 * pool.hi))))
        pool = pool.at_most(math.ceil(n / call_rows))
    return ScorePlan(
        cfg=cfg,
        run_id=run_id,
        model_version=meta["version"],
        classes=tuple(meta["classes"]),
        base_size=artifact.base_size_of(meta),
        version=version,
        pool=pool,
        fused=decode_beside_model(cfg.decode, pool.gpu > 0),
        call_rows=call_rows,
        listed=listed,
    )


def build_dataset(p: ScorePlan, counts_actor: Any = None, shared: SharedSkips | None = None) -> Any:
    """The run's Ray Data dataset: its objects -> (decode tasks ->) Scorer actors -> rows.
    A streamed listing reports to ``counts_actor`` and maps the driver's skip sets (``shared``)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    cfg = p.cfg
    if p.listed is not None:
        blocks = [b.slice(i, p.call_rows) for b in p.listed.blocks for i in range(0, b.num_rows, p.call_rows)]
        ds: ray.data.Dataset = ray.data.from_arrow(blocks)
    else:
        # Pages of about one actor call: small ones where actors decode, so that every actor has work.
        ds = listing_dataset(cfg, p.version, p.model_version, p.run_id, counts_actor, shared, block_bytes(p.call_rows))
    pool = p.pool
    log.info(
        "%s scoring actor(s) with %g CPU%s each; decoding %s",
        pool.hi if pool.lo == pool.hi else f"{pool.lo} to {pool.hi}",
        pool.cpu,
        " and 1 GPU" if pool.gpu else "",
        "in the scoring actors" if p.fused else "in CPU tasks",
        extra=None if pool.gpu else DETAIL,
    )
    compute = ActorPoolStrategy(min_size=pool.lo, max_size=pool.hi)
    decoder = DecodeBatch(p.base_size, cfg.max_pixels, max_bytes=cfg.max_bytes)
    pinned = (p.model_version, list(p.classes))
    # A listing block is BLOCK_ROWS rows: taken whole, or cut into calls of call_rows.
    call = None if p.call_rows >= BLOCK_ROWS else p.call_rows
    if p.fused:  # the actors decode: Arrow blocks of URIs in, rows out
        return ds.map_batches(
            Scorer,
            fn_constructor_args=(cfg.model, cfg.tta, pool.threads, decoder, cfg.batch_size, pinned),
            batch_size=call,
            batch_format="pyarrow",
            compute=compute,
            num_cpus=pool.cpu,
            num_gpus=pool.gpu,
        )
    # Few decode tasks (raycluster.data_tasks), each overlapping its S3 GETs on threads.
    ds = ds.map_batches(
        decoder, batch_size=max(cfg.batch_size, DECODE_ROWS), num_cpus=DATA_CPU_SHARE, compute=data_tasks()
    )
    return ds.map_batches(
        Scorer,
        fn_constructor_args=(cfg.model, cfg.tta, pool.threads, None, 8, pinned),
        batch_size=cfg.batch_size,
        compute=compute,
        num_cpus=pool.cpu,
        num_gpus=pool.gpu,
    )


@dataclass(frozen=True)
class Streamed:
    """What ``commit_stream`` passed into the writer."""

    added: int
    errors: int
    counts: Counts


def commit_stream(
    ds: Any, writer: table.RunWriter, p: ScorePlan, counts_actor: Any = None, metrics: ScoreMetrics | None = None
) -> Streamed:
    """Iterate the dataset's blocks into ``writer`` (parts commit on its thread); progress
    lines (and the run's metrics) every --progress seconds. The listing's counts come from
    ``p`` or the counts actor."""
    cfg = p.cfg
    progress = Progress("scored", p.to_score, every_s=cfg.progress_s)
    added = errors = 0
    t0 = time.monotonic()

    def listing_so_far() -> Counts | None:
        if p.listed is not None:
            return p.listed.counts
        if not progress.due():
            return None
        counts = counts_now(counts_actor)
        if metrics is not None:
            metrics.progress(counts.listed, added / max(time.monotonic() - t0, 1e-6))
        return counts

    try:
        with driver_stderr_to_log():
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                writer.add(batch)
                if metrics is not None:
                    metrics.scored(batch)
                added += batch.num_rows
                errors += batch.num_rows - batch.column("error").null_count
                counts = listing_so_far()
                progress.update(
                    batch.num_rows,
                    total=counts.to_score if counts is not None and counts.done else None,
                    note=_progress_note(errors, counts),
                )
    except DragonsError:
        raise
    except Exception as exc:
        raise _pipeline_error(p.run_id, exc) from None
    final = p.listed.counts if p.listed is not None else final_counts(counts_actor)
    progress.finish(total=final.to_score, note=_progress_note(errors, final))
    if metrics is not None:
        metrics.progress(final.listed, added / max(time.monotonic() - t0, 1e-6))
    return Streamed(added, errors, final)


def _run(
    cfg: ScoreConfig, run_id: str, started: datetime, meta: dict[str, Any], classes: list[str], model_ref: str = ""
) -> dict[str, Any]:
    source = cfg.inventory or cfg.manifest or cfg.input
    info = storage.redact_obj(
        {  # one redaction for everything the commits store
            # model: the folder scored with (ROOT/versions/<v> for a registry); model_ref: as given (ROOT@prod).
            "model": cfg.model,
            **({"model_ref": model_ref} if model_ref and model_ref != cfg.model else {}),
            "input": source,
            "incremental": cfg.incremental,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("log_file", "spool_dir")},
        }
    )
    writer = table.RunWriter(
        cfg.output,
        run_id,
        started,
        classes,
        model_version=meta["version"],
        date=cfg.date,
        replace=cfg.replace,
        commit_every=cfg.commit_every,
        commit_interval_s=cfg.commit_interval_s,
        spool_dir=cfg.spool_dir,
        info=info,
        background=True,
        binding=binding(cfg, meta),
        target_file_size=cfg.file_size_mb * 2**20 if cfg.file_size_mb else None,
        on_commit=lambda part, rows: on_part(part, rows),
    )
    metrics: ScoreMetrics | None = None  # made once Ray is up (its metrics need it)

    def on_part(part: int, rows: int) -> None:
        log.info("run %s: part %d committed (the run holds %d rows)", run_id, part, rows)
        if metrics is not None:
            metrics.committed()

    one_page = _one_page(cfg)
    state = writer.begin()  # the table exists from here on; --replace has removed the run's rows
    if state.rows:
        log.info(
            "run %s: continuing, the table holds %d of its rows (%d commits); those are kept",
            run_id,
            state.rows,
            state.part,
        )
    ensure_ray(cfg.no_progress_timeout_s)
    metrics = ScoreMetrics(run_id)
    # The table version the run's skip sets are read at; None when there is nothing
    # to skip (a new run, no --incremental): the listing tasks then never open the table.
    version = int(writer.table_version) if cfg.incremental or state.rows else None
    t0 = time.time()
    # The skip sets, built once here (bounded by --skip-memory-limit, files the listing streams map).
    skips = load_run_skips(cfg, version, meta["version"], run_id)
    try:
        return _run_listed(cfg, run_id, meta, writer, version, skips, one_page, t0, source, metrics)
    finally:
        skips.close()


def _run_listed(
    cfg: ScoreConfig,
    run_id: str,
    meta: dict[str, Any],
    writer: table.RunWriter,
    version: int | None,
    skips: Any,
    one_page: bool,
    t0: float,
    source: str,
    metrics: ScoreMetrics,
) -> dict[str, Any]:
    metrics.state("running")
    listed = list_here(cfg, version, meta["version"], run_id, skips) if one_page else None
    log.info(
        "run %s (dt %s): scoring %s with model %s (version %s)%s",
        run_id,
        writer.dt,
        storage.redact(source),
        storage.redact(cfg.model),
        meta["version"],
        ""
        if listed is None
        else f": listed {listed.counts.listed}, kept {listed.counts.kept}, "
        f"skipped {listed.counts.skipped} unchanged, scoring {listed.counts.to_score}",
    )
    try:
        streamed = _score_into(cfg, run_id, meta, version, listed, writer, share_skips(skips), metrics)
        counts = streamed.counts
        if streamed.added != counts.to_score:
            raise DragonsError(
                f"run {run_id}: {counts.to_score} objects to score but {streamed.added} rows came back; "
                "the committed parts are kept: run the same command again to score the rest"
            )
        manifest = writer.finish(
            {"listed": counts.listed, "skipped": counts.skipped, "kept": counts.kept, "new_rows": streamed.added}
        )
    except BaseException as exc:
        metrics.state("failed")
        writer.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        writer.discard()
    metrics.state("complete")
    rate = manifest["errors"] / max(manifest["rows"], 1)
    log.info(
        "run %s complete at table version %d (its commit %d): listed %d, kept %d, skipped %d, scored %d new; "
        "the run holds %d rows, %d errors (%.2f%%) -> %s",
        run_id,
        manifest["version"],
        manifest["dragons_part"],
        manifest["listed"],
        manifest["kept"],
        manifest["skipped"],
        streamed.added,
        manifest["rows"],
        manifest["errors"],
        100 * rate,
        manifest["path"],
    )
    # When things happened, seconds from the pipeline's start (for benchmarks; not committed).
    manifest["timings"] = {
        "listing_done_s": round(counts.done_at - t0, 3) if counts.done_at else None,
        "first_part_s": round(writer.first_part_at - t0, 3) if writer.first_part_at else None,
        "total_s": round(time.time() - t0, 3),
    }
    return manifest


def binding(cfg: ScoreConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What a run id is bound to: the model (its content version and classes), the input,
    and the options that change a row; a run continued with anything else is refused."""
    return {
        "model_version": meta["version"],
        "classes": list(meta["classes"]),
        "input": storage.redact(cfg.inventory or cfg.manifest or cfg.input),
        "max_bytes": cfg.max_bytes,
        "max_pixels": cfg.max_pixels,
        "tta": cfg.tta,
    }


def _score_into(
    cfg: ScoreConfig,
    run_id: str,
    meta: dict[str, Any],
    version: int | None,
    listed: Listed | None,
    writer: table.RunWriter,
    shared: SharedSkips | None,
    metrics: ScoreMetrics | None = None,
) -> Streamed:
    """Ask for GPUs (those the cluster has, or its autoscaler adds: waited for, bounded,
    and the request withdrawn when scoring ends), then plan, build and stream."""
    if listed is not None and listed.counts.to_score == 0:
        return Streamed(0, 0, listed.counts)
    want = parse_span(cfg.actors, "--actors")
    with GpuRequest(
        "scoring actor", cfg.use_gpu, want, cfg.gpu_wait_s, max(cfg.progress_s, 10.0), say=log.info, local=embedded()
    ) as grant:
        p = plan(cfg, run_id, meta, version, listed, cluster().cpus, grant)
        counts_actor = new_counts() if listed is None else None
        return commit_stream(build_dataset(p, counts_actor, shared), writer, p, counts_actor, metrics)


def _pipeline_error(run_id: str, exc: BaseException) -> DragonsError:
    """A Ray error as a clean message; a changed model says so plainly."""
    text = str(exc)
    # Our own error, raised in an actor or the listing task, is the last line of Ray's traceback text.
    for marker in (f"{ModelChanged.__name__}: ", f"{DragonsError.__name__}: "):
        lines = [ln for ln in text.splitlines() if marker in ln]
        if lines:
            return DragonsError(f"run {run_id}: " + lines[-1].split(marker, 1)[1].strip())
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return DragonsError(
        f"run {run_id}: scoring failed: {storage.shorten(first, 300)}; the committed parts are kept: "
        "run the same command again to continue (see the run's log for Ray's own lines)"
    )
