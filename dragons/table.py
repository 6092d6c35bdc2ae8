"""The scores table: schema, committed writes, and reading committed rows.

Layout under the table root::

    dt=YYYY-MM-DD/run_id=ID/part-<attempt>-00000.parquet
    dt=YYYY-MM-DD/run_id=ID/_manifest.json      <- written last: the commit

Readers only read files named by a manifest, so a run killed midway (parts but
no manifest) is invisible, and re-running a run id writes new parts under a new
attempt, swaps the manifest in one write, then deletes the old parts: no
duplicate rows at any moment. Ray's ``write_parquet`` appends by default, which
is why the driver writes the parts itself.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dragons import storage
from dragons.errors import DragonsError

MANIFEST = "_manifest.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def prob_column(cls: str) -> str:
    """``p_<class>`` with anything but letters, digits and _ replaced: a plain SQL name."""
    return "p_" + re.sub(r"[^0-9A-Za-z_]", "_", cls)


def check_run_id(run_id: str) -> None:
    if not _RUN_ID.match(run_id):
        raise DragonsError(f"--run-id {run_id!r} is not valid: use letters, digits, '_', '.', '-' (at most 128)")


def schema(classes: list[str]) -> pa.Schema:
    cols = [pa.field("uri", pa.string(), nullable=False), pa.field("label", pa.string()), pa.field("score", pa.float64())]
    cols += [pa.field(prob_column(c), pa.float64()) for c in classes]
    cols += [pa.field("model_version", pa.string()), pa.field("run_id", pa.string()),
             pa.field("scored_at", pa.timestamp("us", tz="UTC")), pa.field("error", pa.string())]
    return pa.schema(cols)


class RunWriter:
    """Buffers scored batches, writes Parquet parts, commits with a manifest."""

    def __init__(self, root: str, run_id: str, started: datetime, classes: list[str], rows_per_file: int,
                 model_version: str = "") -> None:
        self.root = storage.parse(root).uri.rstrip("/")
        self.run_id = run_id
        self.dt = started.strftime("%Y-%m-%d")
        self.started = started
        self.classes = classes
        self.schema = schema(classes)
        self.rows_per_file = rows_per_file
        self.model_version = model_version
        self.attempt = uuid.uuid4().hex[:8]
        self.run_dir = storage.join(self.root, f"dt={self.dt}", f"run_id={run_id}")
        self.files: list[str] = []
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.rows = self.errors = 0
        self.fs, _ = storage.filesystem(self.root)

    def add(self, batch: pa.Table | pa.RecordBatch, model_version: str | None = None) -> None:
        t = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        n = t.num_rows
        now = pa.scalar(datetime.now(timezone.utc), type=pa.timestamp("us", tz="UTC"))
        extra = {
            "model_version": pa.array([model_version or self.model_version] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "scored_at": pa.array([now.as_py()] * n, pa.timestamp("us", tz="UTC")),
        }
        cols = []
        for field in self.schema:
            if field.name in extra:
                cols.append(extra[field.name])
            elif field.name in t.column_names:
                cols.append(pc.cast(t.column(field.name), field.type))
            else:
                cols.append(pa.nulls(n, field.type))
        # NaN probabilities (rows with an error) become SQL NULLs.
        out = pa.Table.from_arrays(cols, schema=self.schema)
        for name in ["score"] + [prob_column(c) for c in self.classes]:
            col = out.column(name)
            out = out.set_column(out.schema.get_field_index(name), name, pc.if_else(pc.is_nan(col), pa.scalar(None, pa.float64()), col))
        self.buffer.append(out)
        self.buffered += n
        self.rows += n
        self.errors += n - out.column("error").null_count
        if self.buffered >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        name = f"part-{self.attempt}-{len(self.files):05d}.parquet"
        data = pa.concat_tables(self.buffer)
        sink = io.BytesIO()
        pq.write_table(data, sink, compression="zstd")
        storage.write_bytes(storage.join(self.run_dir, name), sink.getvalue())
        self.files.append(name)
        self.buffer, self.buffered = [], 0

    def commit(self, info: dict[str, Any]) -> dict[str, Any]:
        if "model_version" in info and not self.model_version:
            self.model_version = str(info["model_version"])
        self._flush()
        manifest = {
            "run_id": self.run_id, "dt": self.dt, "attempt": self.attempt, "files": self.files,
            "rows": self.rows, "scored": self.rows - self.errors, "errors": self.errors,
            "classes": self.classes, "columns": self.schema.names,
            "started_at": self.started.isoformat(), "committed_at": datetime.now(timezone.utc).isoformat(),
            **info,
        }
        storage.write_bytes(storage.join(self.run_dir, MANIFEST), json.dumps(manifest, indent=2).encode())
        self._cleanup()
        manifest["path"] = self.run_dir
        return manifest

    def _cleanup(self) -> None:
        """Delete what the new manifest replaced: old attempts' parts, and the same
        run id committed under another date."""
        keep = set(self.files) | {MANIFEST}
        for entry in storage.list_files(self.run_dir):
            if entry.uri.rsplit("/", 1)[-1] not in keep:
                storage.delete(entry.uri)
        for dt_dir in storage.list_dirs(self.root):
            if dt_dir.startswith("dt=") and dt_dir != f"dt={self.dt}":
                other = storage.join(self.root, dt_dir, f"run_id={self.run_id}")
                if storage.exists(other):
                    storage.delete(other)


def committed_manifests(root: str) -> list[dict[str, Any]]:
    """Manifests of committed runs; if a run id appears twice (a re-run on another
    day interrupted before its clean-up), the newest commit wins."""
    root_uri = storage.parse(root).uri.rstrip("/")
    if not storage.exists(root_uri):
        raise DragonsError(f"no table at {root_uri}: nothing has been scored there (check --table)")
    runs: dict[str, dict[str, Any]] = {}
    for entry in storage.list_files(root_uri):
        if entry.uri.endswith("/" + MANIFEST):
            m = json.loads(storage.read_bytes(entry.uri))
            m["dir"] = entry.uri[: -len(MANIFEST) - 1]
            if m["run_id"] not in runs or m["committed_at"] > runs[m["run_id"]]["committed_at"]:
                runs[m["run_id"]] = m
    return sorted(runs.values(), key=lambda m: m["committed_at"])


def read_committed(root: str) -> pa.Table:
    """Every committed row, with ``dt`` added; runs with other classes get null columns."""
    tables = []
    for m in committed_manifests(root):
        fs, _ = storage.filesystem(m["dir"])
        for name in m["files"]:
            t = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(m["dir"], name), fs)))
            tables.append(t.append_column("dt", pa.array([m["dt"]] * t.num_rows, pa.string())))
    if not tables:
        return schema([]).append(pa.field("dt", pa.string())).empty_table()
    return pa.concat_tables(tables, promote_options="default")
