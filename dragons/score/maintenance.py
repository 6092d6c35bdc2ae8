"""``dragons table history|vacuum|optimize``: Delta's own maintenance operations.

* history: the commit log, one row per version, with each run's counts.
* optimize: compaction of the small files nightly runs leave (one commit,
  ``data_change=false``: readers and time travel are unaffected).
* vacuum: deletes files no version within the retention references, and files
  no commit ever referenced (what a killed run left), older than the retention.
  Time travel to versions older than the retention stops working.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pyarrow as pa

from dragons import storage
from dragons.errors import DragonsError
from dragons.score.engine import open_table
from dragons.score.table import run_history


@dataclass
class MaintenanceConfig:
    limit: int = 20  # history: newest N commits (0 = all)
    retention_hours: float = 168.0  # vacuum: Delta's default, one week of time travel
    dry_run: bool = False  # vacuum: list only
    target_size_mb: int = 128  # optimize: target data file size


def run(action: str, root: str, cfg: MaintenanceConfig | None = None) -> pa.Table:
    cfg = cfg or MaintenanceConfig()
    # delta-rs reports storage trouble as OSError, DeltaError, a bare Exception or
    # a Rust panic (BaseException): each becomes `error: ...` naming the table.
    with storage.delta_errors(root, "read" if action == "history" else action):
        return _run(action, root, cfg)


def _run(action: str, root: str, cfg: MaintenanceConfig) -> pa.Table:
    if action == "history":
        rows = run_history(root, cfg.limit or None)
        return (
            pa.Table.from_pylist([{k: v for k, v in r.items() if k != "predicate"} for r in rows])
            if rows
            else pa.table({})
        )
    if action == "vacuum":
        return pa.table({"file": pa.array(vacuum(root, cfg.retention_hours, cfg.dry_run), pa.string())})
    if action == "optimize":
        return pa.Table.from_pylist([optimize(root, cfg.target_size_mb)])
    raise DragonsError(f"unknown table action {action!r}: use history, vacuum or optimize")


# vacuum never deletes files younger than this: a running night writes a part's
# files seconds to minutes before the commit that names them, and Delta readers
# time-travelling a little way back still need removed files.
MIN_RETENTION_HOURS = 1.0
# optimize's tries when a night's parts keep committing beside it.
OPTIMIZE_ATTEMPTS = 5


def retention_floor(root: str) -> float:
    """The least retention vacuum accepts for this table: an hour, or twice the
    longest part interval any run in the log committed with, if longer."""
    longest = max((float(c.get("commit_interval_s") or 0) for c in run_history(root)), default=0.0)
    return max(MIN_RETENTION_HOURS, 2 * longest / 3600)


def vacuum(root: str, retention_hours: float, dry_run: bool = False) -> list[str]:
    """Delete unreferenced files older than the retention; returns their paths."""
    if retention_hours < 0:
        raise DragonsError(f"--retention-hours must be >= 0, got {retention_hours}")
    floor = retention_floor(root)
    if retention_hours < floor:
        raise DragonsError(
            f"--retention-hours {retention_hours:g} is below this table's floor of {floor:g} h: a running "
            "night's part files are that young before their commit names them, and deleting them would "
            f"break its commit. Use --retention-hours {math.ceil(floor)} or more"
        )
    dt = open_table(root)
    # full=True: also files no commit ever named (a killed run's), not only removed ones.
    # Below Delta's configured retention the caller has chosen so explicitly.
    # delta-rs takes whole hours: round up, never down (0.5 h must not delete what 0 h would).
    return list(
        dt.vacuum(
            retention_hours=math.ceil(retention_hours), dry_run=dry_run, enforce_retention_duration=False, full=True
        )
    )


def optimize(root: str, target_size_mb: int) -> dict[str, object]:
    """Compact small files into ~target-size files; returns delta-rs' metrics.

    A night committing parts beside it can win the race for the next version;
    compaction then conflicts (it removed files the table changed under it) and is
    tried again on the new version, up to ``OPTIMIZE_ATTEMPTS`` times. The night's
    appends never conflict with it: they read nothing."""
    from deltalake.exceptions import CommitFailedError

    if target_size_mb <= 0:
        raise DragonsError(f"--target-size-mb must be > 0, got {target_size_mb}")
    for attempt in range(1, OPTIMIZE_ATTEMPTS + 1):
        dt = open_table(root)
        try:
            m = dt.optimize.compact(target_size=target_size_mb * 2**20)
            break
        except CommitFailedError as exc:
            if attempt == OPTIMIZE_ATTEMPTS:
                raise DragonsError(
                    f"optimize lost the race for a commit {attempt} times to writers of {root} "
                    f"({storage.short_error(exc, 200)}); nothing changed: run it again later"
                ) from None
            time.sleep(0.5 * attempt)
    return {
        "version": dt.version(),
        "files_added": m.get("numFilesAdded"),
        "files_removed": m.get("numFilesRemoved"),
        "partitions_optimized": m.get("partitionsOptimized"),
        "total_considered": m.get("totalConsideredFiles"),
        "attempts": attempt,
    }
