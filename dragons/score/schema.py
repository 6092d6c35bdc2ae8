"""The scores table's layout, in one place: its columns, the listing's columns that
ride along, the ``latest`` row rule and the columns of the ``runs`` and
``commits`` views.

Everything that writes a row (the scoring actors, the run writer) and
everything that reads one (queries, a run's skip sets, reports) takes its
names from here.
"""

from __future__ import annotations

import pyarrow as pa

from dragons.columns import NOVELTY, prob_column
from dragons.rowerrors import ERROR_KIND

# The partition column: a run's logical date (YYYY-MM-DD).
PARTITION = "dt"

# What the listing knows about each object; carried through decode and scoring
# into the row, so --incremental can skip objects whose etag and size are unchanged.
LISTING_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("last_modified", pa.timestamp("us", tz="UTC")),
    ]
)
PASSTHROUGH = tuple(f.name for f in LISTING_SCHEMA if f.name != "uri")


def schema(classes: list[str]) -> pa.Schema:
    """A scores table's columns: ``label`` is the predicted class (``None`` on an
    error row), ``score`` its probability, one ``p_<class>`` per class, ``novelty``,
    and on an error row ``error`` (``kind: message``) and ``error_kind``."""
    cols = [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("score", pa.float64()),
    ]
    cols += [pa.field(prob_column(c), pa.float64()) for c in classes]
    # Novelty (dragons.novelty): NULL on error rows and for models without statistics. Tables
    # written before it gain the column on their next append (schema_mode="merge"); older rows read NULL.
    cols += [pa.field(NOVELTY, pa.float64())]
    cols += [
        pa.field("model_version", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("scored_at", pa.timestamp("us", tz="UTC")),
        pa.field("error", pa.string()),
        # The error's kind alone (dragons.rowerrors.ErrorKind), for SQL. Tables written before it gain
        # the column on their next append (schema_mode="merge"), as with novelty; older rows read NULL.
        pa.field(ERROR_KIND, pa.string()),
        *[LISTING_SCHEMA.field(name) for name in PASSTHROUGH],
        pa.field(PARTITION, pa.string()),
    ]
    return pa.schema(cols)


def newest_row(per: str) -> str:
    """The SQL clause keeping each ``per`` group's newest row: the last scored, and of
    two runs scoring at the same instant the larger run id."""
    return f"QUALIFY row_number() OVER (PARTITION BY {per} ORDER BY scored_at DESC, run_id DESC) = 1"


# The `latest` view: the newest row per object and model version.
LATEST_SQL = f"CREATE VIEW latest AS SELECT * FROM scores {newest_row('uri, model_version')}"

# The `commits` view: one row per table version, from the Delta log.
COMMIT_COLUMNS = {
    "version": pa.int64(),
    "committed_at": pa.string(),
    "operation": pa.string(),
    "run_id": pa.string(),
    "status": pa.string(),
    "part": pa.int64(),
    "part_rows": pa.int64(),
    "listed": pa.int64(),
    "skipped": pa.int64(),
    "kept": pa.int64(),
    "scored": pa.int64(),
    "errors": pa.int64(),
    "rows": pa.int64(),
    "model_version": pa.string(),
    "model": pa.string(),
    "input": pa.string(),
    "incremental": pa.bool_(),
    "dt": pa.string(),
    "failure": pa.string(),
    "files_added": pa.int64(),
    "files_removed": pa.int64(),
}
# The `runs` view: one row per run id (table.runs_summary).
RUN_COLUMNS = {
    "run_id": pa.string(),
    "status": pa.string(),
    "parts": pa.int64(),
    "dt": pa.string(),
    "started_at": pa.string(),
    "committed_at": pa.string(),
    "listed": pa.int64(),
    "skipped": pa.int64(),
    "kept": pa.int64(),
    "scored": pa.int64(),
    "errors": pa.int64(),
    "rows": pa.int64(),
    "model_version": pa.string(),
    "model": pa.string(),
    "input": pa.string(),
    "incremental": pa.bool_(),
    "failure": pa.string(),
    "first_version": pa.int64(),
    "last_version": pa.int64(),
}

# `dragons query` without SQL, and the demo: the runs, oldest first.
SUMMARY_COLUMNS = (
    "run_id",
    "status",
    "parts",
    "dt",
    "committed_at",
    "listed",
    "kept",
    "skipped",
    "scored",
    "errors",
    "rows",
    "model_version",
    "input",
)
SUMMARY_SQL = f"SELECT {', '.join(SUMMARY_COLUMNS)} FROM runs ORDER BY first_version"
