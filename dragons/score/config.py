"""``dragons score``'s settings: one dataclass, one default each (the CLI's flags
are generated from it, with these comments as their help)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from dragons.capacity import DECODE_CHOICES, GPU_WAIT_S, USE_GPU_CHOICES, check_flags, parse_span
from dragons.decode import DEFAULT_MAX_BYTES
from dragons.errors import DragonsError
from dragons.images import DEFAULT_MAX_PIXELS


@dataclass
class ScoreConfig:
    model: str = ""  # model artifact: path or s3:// (model.json + model.pt)
    input: str = ""  # prefix to score: every object under it gets a row
    output: str = ""  # Delta table root (path or s3://), partitioned by dt; a run is committed in parts
    manifest: str = ""  # optional Parquet/CSV file with a `uri` column, instead of listing --input
    inventory: str = ""  # an AWS S3 Inventory report's manifest.json (s3:// or a local path), instead of listing --input; keys outside --input are left out
    list_concurrency: int = 4  # parallel listing streams (S3 key ranges, local subfolders, inventory files)
    skip_memory_limit: str = (
        "256MB"  # DuckDB memory for the resume and --incremental skip sets; beyond it they spill to disk
    )
    run_id: str = ""  # "" = a UTC timestamp with a random suffix; running an id again continues that run
    replace: bool = False  # rescore the run id from scratch: its first commit deletes the run's earlier rows
    date: str = ""  # the run's logical date (its rows' dt, YYYY-MM-DD); "" = kept from the run's first start
    block_rows: int = 0  # rows per scoring-actor call; 0 = 4,096 where actors hold GPUs (Ray Data's cost is per call), 256 on CPUs (a row is a decode: small calls keep the actors evenly loaded)
    batch_size: int = 8  # images per model call; on CPU batch 8 measured fastest (benchmarks/bench_score.py)
    actors: str = "0"  # scoring actors: N, or MIN:MAX (a pool that grows as GPU nodes arrive); 0 = one per GPU, else as many as the CPUs fit
    use_gpu: str = USE_GPU_CHOICES[
        0
    ]  # auto = GPUs the cluster has or its autoscaler adds (waiting --gpu-wait), else CPUs; yes = fail without GPUs; no = CPUs only
    gpu_wait_s: float = (
        GPU_WAIT_S  # seconds to wait for the first GPU nodes of an autoscaling cluster before giving up on them
    )
    tta: int = 0  # test-time augmentation views (0 = off)
    decode: str = DECODE_CHOICES[
        0
    ]  # auto = in the scoring actors on CPU clusters, in separate CPU tasks where actors have GPUs; model | separate force one
    max_error_rate: float = 1.0  # exit non-zero when errors / objects scored this run exceeds this
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard: larger images become error rows `too_large`
    max_bytes: int = DEFAULT_MAX_BYTES  # objects over this many bytes become error rows `too_large`, unread
    incremental: bool = False  # score only objects new or changed (etag/size) since this model version's rows, or whose last row is a transient error
    retry_errors: bool = (
        False  # with --incremental, also score again every object whose last row is an error of any kind
    )
    dry_run: bool = False  # list (and filter) only: print what would be scored, write nothing
    # A part every few minutes of work: a killed night loses at most that; the row
    # cap bounds the local spool (about 60 bytes a row) on fast GPU clusters.
    commit_every: int = 100_000  # rows per part (one Delta commit); 0 = no row limit
    commit_interval_s: float = 300.0  # seconds per part; 0 = no time limit (both 0: one commit at the end)
    file_size_mb: int = 0  # target Delta data file size; 0 = delta-rs' default (about 100 MB)
    spool_dir: str = ""  # local folder for the spool of the part not yet committed; "" = the temp dir
    report: str = ""  # folder (path or s3://) for the run's report once it is complete (dragons report: index.html, summary.json); "" = none
    progress_s: float = 5.0  # seconds between progress lines
    log_file: str = ""  # "" = ./logs/score-<run_id>.log
    no_progress_timeout_s: float = 600.0  # a stalled pipeline fails with a message after this

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the flag, before any work."""
        if not self.output:
            raise DragonsError("--output is required: the table root (path or s3://bucket/prefix)")
        check_flags(self.use_gpu, self.gpu_wait_s, self.decode)
        parse_span(self.actors, "--actors")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise DragonsError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")
        if self.manifest and self.inventory:
            raise DragonsError("give --manifest or --inventory, not both")
        if self.block_rows < 0:
            raise DragonsError(f"--block-rows must be >= 0 (0 = chosen for the actors), got {self.block_rows}")
        if self.list_concurrency < 1:
            raise DragonsError(f"--list-concurrency must be >= 1, got {self.list_concurrency}")
        if self.incremental and self.manifest:
            raise DragonsError(
                "--incremental needs --input (a listing gives each object's etag and size); "
                "a --manifest names URIs only"
            )
        if self.retry_errors and not self.incremental:
            raise DragonsError("--retry-errors goes with --incremental (without it every object is scored anyway)")
        if self.commit_every < 0 or self.commit_interval_s < 0:
            raise DragonsError("--commit-every and --commit-interval must be >= 0 (0 = no limit of that kind)")
        if self.date:
            try:
                ok = date.fromisoformat(self.date).isoformat() == self.date  # not 2026-W48-1 or 20261129
            except ValueError:
                ok = False
            if not ok:
                raise DragonsError(f"--date {self.date!r} is not a date: give YYYY-MM-DD (e.g. 2026-11-29)")
