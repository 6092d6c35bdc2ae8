"""``dragons score``'s settings: one dataclass, one default each (the CLI's flags
are generated from it, with these comments as their help)."""

from __future__ import annotations

from dataclasses import dataclass

from dragons.decode import DEFAULT_MAX_BYTES
from dragons.images import DEFAULT_MAX_PIXELS

# Where images are decoded; the first is the default.
DECODE_CHOICES = ["auto", "actors", "tasks"]


@dataclass
class ScoreConfig:
    model: str = ""  # model artifact: path or s3:// (model.json + model.pt)
    input: str = ""  # prefix to score: every object under it gets a row
    output: str = ""  # Delta table root (path or s3://); one run = one commit, partitioned by dt
    manifest: str = ""  # optional Parquet/CSV file with a `uri` column, instead of listing --input
    run_id: str = ""  # "" = a UTC timestamp with a random suffix; re-using an id replaces that run
    batch_size: int = 8  # images per model call; on CPU batch 8 measured fastest (benchmarks/bench_score.py)
    actors: int = 0  # scoring actors; 0 = one per GPU, else as many as the CPUs fit
    tta: int = 0  # test-time augmentation views (0 = off)
    decode: str = DECODE_CHOICES[0]  # auto = in the scoring actors on CPU clusters, in CPU tasks where actors have GPUs
    max_error_rate: float = 1.0  # exit non-zero when errors / objects scored this run exceeds this
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard: larger images become error rows `too_large`
    max_bytes: int = DEFAULT_MAX_BYTES  # objects over this many bytes become error rows `too_large`, unread
    incremental: bool = False  # score only objects new or changed (etag/size) since this model version's rows
    dry_run: bool = False  # list (and filter) only: print what would be scored, write nothing
    file_size_mb: int = 0  # target Delta data file size; 0 = delta-rs' default (about 100 MB)
    spool_dir: str = ""  # local folder for the run's row spool before its commit; "" = the temp dir
    progress_s: float = 5.0  # seconds between progress lines
    log_file: str = ""  # "" = ./logs/score-<run_id>.log
    no_progress_timeout_s: float = 600.0  # a stalled pipeline fails with a message after this
