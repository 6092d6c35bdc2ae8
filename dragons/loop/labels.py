"""Labels back in: Label Studio exports or plain ``uri,label`` files into a Delta labels table.

Inputs (:func:`read_export` tells them apart by their content, not their name):

* Label Studio **JSON**: a list of tasks; every annotation is a row (annotator =
  ``completed_by``, time = ``updated_at``, else ``created_at``); cancelled ones
  (``was_cancelled``) are skips and are counted, not kept.
* Label Studio **JSON_MIN**: flat records, one per annotation; the choice sits under
  the control's name as a bare string or ``{"choices": [...]}``. A record with no
  ``annotation_id`` (a task nobody annotated) is no label.
* **CSV or Parquet** of ``uri,label`` (optional ``annotator``, ``annotated_at``,
  ``task_id``, ``annotation_id``, ``split``). A CSV without ``uri`` is read as Label
  Studio's CSV export, whose columns are JSON_MIN's.

One choice per annotation: this is single-label classification, so a multi-choice
answer is refused, naming the task.

The table (:func:`import_labels`) keeps every annotation ever imported, one row
each, with where it came from (``source``, ``source_sha256``, ``imported_at``).
A row's ``key`` is a hash of (uri, label, annotator, annotated_at, task_id,
annotation_id), plus the file's sha256 for an undated row without an annotation id:
importing the same file again adds nothing (and commits nothing), a newer export of
the same tasks adds only the annotations that are new or were updated since, and a
new plain CSV is a new statement even where it repeats an older file's label.

The ``latest`` view (:func:`latest`): one label per URI, **the newest annotation
wins**, whoever made it: ordered by annotated_at (an undated row: its import time),
then annotation id, then import time, then the label's name. Several annotators on
one URI are not voted on; the newest answer is the label. Each annotator's own
newest label is compared all the same: ``annotators`` counts them and ``disagree``
marks the URIs where they differ, so a command can say how many URIs were contested
(:func:`disagreements`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dragons import storage
from dragons.errors import DragonsError

UTC_US = pa.timestamp("us", tz="UTC")
# What read_export gives: one row per annotation.
READ_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("label", pa.string()),
        ("annotator", pa.string()),
        ("annotated_at", UTC_US),
        ("task_id", pa.int64()),
        ("annotation_id", pa.int64()),
    ]
)
# The Delta labels table: the annotation, where it came from, and its dedupe key.
TABLE_SCHEMA = pa.schema(
    [
        *READ_SCHEMA,
        ("source", pa.string()),
        ("source_sha256", pa.string()),
        ("imported_at", UTC_US),
        ("key", pa.string()),
    ]
)
LATEST_COLUMNS = ("uri", "label", "annotator", "annotated_at", "annotators", "disagree")

# JSON_MIN keys that are Label Studio's, not the task's data nor a control's answer.
JSON_MIN_META = frozenset(
    {
        "id",
        "annotator",
        "annotation_id",
        "created_at",
        "updated_at",
        "lead_time",
        "agreement",
        "drafts",
        "predictions",
        "meta",
        "total_annotations",
        "cancelled_annotations",
        "total_predictions",
        "completed_at",
        "updated_by",
        "inner_id",
        "project",
        "file_upload",
        "storage_filename",
        "comment_count",
        "unresolved_comment_count",
        "last_comment_updated_at",
        "comment_authors",
        "is_labeled",
        "overlap",
    }
)
IMAGE_KEYS = ("image", "img", "uri", "url")  # where the image usually is in a task's data, in order
SPLITS = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid"}


@dataclass(frozen=True)
class Export:
    """A labels file as read: one row per annotation (:data:`READ_SCHEMA`), and what was left out."""

    table: pa.Table
    format: str  # json | json_min | csv | parquet
    control: str  # the Choices control read ("" for a plain uri,label file)
    cancelled: int = 0  # annotations skipped as cancelled (was_cancelled)
    unlabelled: int = 0  # tasks or records without any choice for the control
    split: pa.Array | None = None  # a plain file's split column (train | valid | null), aligned with table


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_labels` did."""

    source: str  # the file, redacted
    format: str
    control: str
    rows: int  # annotations read from the file
    added: int  # rows new to the table
    already_present: int  # rows the table had (or the file repeated)
    skipped_cancelled: int
    unlabelled: int  # tasks or records with no choice at all
    classes: list[str]  # the labels in the file, sorted
    new_classes: list[str] = field(default_factory=list)  # not among the known classes, admitted by new_class
    version: int | None = None  # the table's version after the import (unchanged when nothing was added)

    def summary(self) -> str:
        parts = [
            f"{self.rows} annotation(s) read from {self.source} ({self.format}"
            + (f", control {self.control!r})" if self.control else ")"),
            f"{self.added} added",
            f"{self.already_present} already present",
        ]
        if self.skipped_cancelled:
            parts.append(f"{self.skipped_cancelled} cancelled skipped")
        if self.unlabelled:
            parts.append(f"{self.unlabelled} without a choice")
        if self.new_classes:
            parts.append(f"new classes {self.new_classes}")
        return ", ".join(parts) + f"; table version {self.version}"


# ---------------------------------------------------------------- reading exports


def read_export(path_or_uri: str, control: str | None = None) -> Export:
    """Read a Label Studio JSON / JSON_MIN export, or a CSV / Parquet of ``uri,label``.

    ``control``: the Choices control whose answers are the labels; by default the
    only one in the file (several: an error asking for one)."""
    return _parse(storage.read_bytes(path_or_uri), storage.redact(path_or_uri), control)


def _parse(data: bytes, name: str, control: str | None) -> Export:
    if data[:4] == b"PAR1":
        return _plain(pq.read_table(pa.BufferReader(data)).to_pylist(), name, "parquet", control)
    text = data.decode("utf-8-sig", errors="replace")
    if text.lstrip()[:1] in ("[", "{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DragonsError(
                f"{name} is not valid JSON ({exc}): export it from Label Studio as JSON or JSON_MIN"
            ) from None
        tasks = [doc] if isinstance(doc, dict) else doc
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise DragonsError(f"{name}: expected a list of Label Studio tasks or records (a JSON or JSON_MIN export)")
        if any(isinstance(t.get("data"), dict) for t in tasks):
            return _json(tasks, name, control)
        return _json_min(tasks, name, control, "json_min")
    return _plain(list(csv.DictReader(io.StringIO(text))), name, "csv", control)


def _json(tasks: list[dict[str, Any]], name: str, control: str | None) -> Export:
    def anns(task: dict[str, Any]) -> list[dict[str, Any]]:
        return task.get("annotations") or task.get("completions") or []  # completions: Label Studio < 1.0

    found = {
        str(r.get("from_name"))
        for t in tasks
        for a in anns(t)
        for r in a.get("result") or []
        if r.get("type") == "choices" or "choices" in (r.get("value") or {})
    }
    ctl = _control(found, control, name)
    rows: list[dict[str, Any]] = []
    cancelled = unlabelled = 0
    for task in tasks:
        tid = task.get("id")
        where = f"{name}: task {tid}"
        labelled = False
        for ann in anns(task):
            if ann.get("was_cancelled"):
                cancelled += 1
                continue
            choices = [
                c
                for r in ann.get("result") or []
                if r.get("from_name") == ctl
                for c in (r.get("value") or {}).get("choices") or []
            ]
            if not choices:
                continue
            labelled = True
            who = ann.get("completed_by")
            rows.append(
                {
                    "uri": _image_of(task.get("data") or {}, where),
                    "label": _one(choices, where),
                    "annotator": _annotator(who.get("id", who.get("email")) if isinstance(who, dict) else who),
                    "annotated_at": _when(ann.get("updated_at") or ann.get("created_at"), where),
                    "task_id": _int(tid, where),
                    "annotation_id": _int(ann.get("id"), where),
                }
            )
        unlabelled += not labelled
    return Export(_table(rows), "json", ctl, cancelled, unlabelled)


def _json_min(records: list[dict[str, Any]], name: str, control: str | None, fmt: str) -> Export:
    keys = sorted({k for r in records for k in r} - JSON_MIN_META)
    image = next((k for k in IMAGE_KEYS if k in keys), "")
    if control is None:
        # The answer's column: a {"choices": [...]} anywhere, else the one text column besides the image.
        picked = sorted({k for r in records for k, v in r.items() if isinstance(v, dict) and "choices" in v})
        if not picked:
            picked = [k for k in keys if k != image and all(isinstance(r.get(k), (str, type(None))) for r in records)]
        if len(picked) != 1 and records:
            raise DragonsError(
                f"{name}: cannot tell which column holds the choice among {picked or keys}: "
                "give the control's name with --control"
            )
        control = picked[0] if picked else ""
    elif records and control not in keys:
        raise DragonsError(f"{name}: no column {control!r} (--control); the columns are {keys}")
    if not image:
        others = [k for k in keys if k != control]
        if len(others) != 1 and records:
            raise DragonsError(
                f"{name}: cannot tell which column holds the image URI among {others}: "
                f"name it one of {', '.join(IMAGE_KEYS)}"
            )
        image = others[0] if others else ""
    rows: list[dict[str, Any]] = []
    unlabelled = 0
    for i, rec in enumerate(records):
        where = f"{name}: task {rec.get('id', f'in record {i + 1}')}"
        value = rec.get(control)
        if isinstance(value, str) and value.startswith("{"):  # Label Studio's CSV writes several choices as JSON
            value = _json_value(value, where)
        choices = _choices(value)
        # No annotation id: a task exported without any annotation; its columns are the task's data only.
        if not choices or rec.get("annotation_id") in (None, ""):
            unlabelled += 1
            continue
        rows.append(
            {
                "uri": _uri(rec.get(image), where),
                "label": _one(choices, where),
                "annotator": _annotator(rec.get("annotator")),
                "annotated_at": _when(rec.get("updated_at") or rec.get("created_at"), where),
                "task_id": _int(rec.get("id"), where),
                "annotation_id": _int(rec.get("annotation_id"), where),
            }
        )
    return Export(_table(rows), fmt, control, 0, unlabelled)


def _plain(records: list[dict[str, Any]], name: str, fmt: str, control: str | None) -> Export:
    cols = {k for r in records[:1] for k in r}
    if records and "uri" not in cols and fmt == "csv":
        return _json_min(records, name, control, "csv_min")  # Label Studio's CSV export
    if records and not {"uri", "label"} <= cols:
        raise DragonsError(
            f"{name}: expected the columns uri,label (optional: annotator, annotated_at, split); found {sorted(cols)}"
        )
    rows: list[dict[str, Any]] = []
    splits: list[str | None] = []
    for i, rec in enumerate(records):
        where = f"{name}: row {i + 1}"
        label = str(rec.get("label") or "").strip()
        if not label:
            raise DragonsError(f"{where} has no label: give every uri a label, or leave the row out")
        raw_split = str(rec.get("split") or "").strip().lower()
        if raw_split and raw_split not in SPLITS:
            raise DragonsError(
                f"{where}: split {rec.get('split')!r} is not one of train, valid (or empty: "
                "a stable hash of the uri decides)"
            )
        splits.append(SPLITS.get(raw_split))
        rows.append(
            {
                "uri": _uri(rec.get("uri"), where),
                "label": label,
                "annotator": _annotator(rec.get("annotator")),
                "annotated_at": _when(rec.get("annotated_at"), where),
                "task_id": _int(rec.get("task_id"), where),
                "annotation_id": _int(rec.get("annotation_id"), where),
            }
        )
    return Export(_table(rows), fmt, "", split=pa.array(splits, pa.string()))


def _choices(value: Any) -> list[Any]:
    """A JSON_MIN answer as a list: a bare string is one choice, ``{"choices": [...]}`` or a list several."""
    if isinstance(value, dict):
        return list(value.get("choices") or [])
    if isinstance(value, list):
        return value
    return [] if value in (None, "") else [value]


def _control(found: set[str], control: str | None, name: str) -> str:
    if control is not None:
        if found and control not in found:
            raise DragonsError(
                f"{name}: no Choices control named {control!r} (--control); the file has {sorted(found)}"
            )
        return control
    if len(found) > 1:
        raise DragonsError(f"{name} answers several Choices controls {sorted(found)}: pick one with --control")
    return next(iter(found), "")


def _one(choices: list[Any], where: str) -> str:
    distinct = sorted({str(c) for c in choices})
    if len(distinct) != 1:
        raise DragonsError(
            f"{where} has several choices {distinct}: dragons trains single-label classification; "
            "make the Choices control single-choice and fix the task in Label Studio"
        )
    return distinct[0]


def _image_of(data: dict[str, Any], where: str) -> str:
    key = next((k for k in IMAGE_KEYS if k in data), None)
    if key is None:
        texts = [k for k, v in data.items() if isinstance(v, str)]
        if len(texts) != 1:
            raise DragonsError(
                f"{where}: cannot tell which of its data keys {sorted(data)} holds the image URI: "
                f"name it one of {', '.join(IMAGE_KEYS)}"
            )
        key = texts[0]
    return _uri(data[key], where)


def _uri(value: Any, where: str) -> str:
    uri = str(value or "").strip()
    if not uri:
        raise DragonsError(f"{where} has no image URI")
    try:
        storage.parse(uri)  # an http:// or Label Studio-served URI cannot be trained on: say so at import
    except DragonsError as exc:
        raise DragonsError(f"{where}: {exc}") from None
    return uri


def _annotator(value: Any) -> str:
    return "" if value is None else str(value)


def _int(value: Any, where: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DragonsError(f"{where}: id {value!r} is not a whole number") from None


def _when(value: Any, where: str) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        t = value
    else:
        try:
            t = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise DragonsError(
                f"{where}: cannot read the time {value!r}: write it as ISO 8601, e.g. 2024-01-15T10:30:45Z"
            ) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _json_value(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DragonsError(f"{where}: the choice {text[:80]!r} is neither a label nor JSON") from None


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


# ---------------------------------------------------------------- the Delta labels table


def import_labels(
    labels_uri: str,
    source: str,
    known_classes: list[str] | None = None,
    new_class: bool = False,
    control: str | None = None,
) -> ImportResult:
    """Add the annotations of ``source`` (:func:`read_export`) to the Delta table at ``labels_uri``.

    Only rows the table lacks are appended, in one commit; none at all when nothing
    is new. ``known_classes``: the classes a label must be among (with those already
    in the table); an unknown one is refused unless ``new_class``."""
    from deltalake import write_deltalake
    from deltalake.transaction import CommitProperties

    data = storage.read_bytes(source)
    name = storage.redact(storage.parse(source).uri)  # what the table's source column keeps: absolute, redacted
    export = _parse(data, name, control)
    uri = storage.parse(labels_uri).uri.rstrip("/")
    opts = storage.delta_options(uri)
    existing = _open(uri, must_exist=False)
    have_keys: set[str] = set()
    have_classes: set[str] = set()
    if existing is not None:
        with storage.delta_errors(uri):
            old = existing.to_pyarrow_table(columns=["key", "label"])
        have_keys = set(old.column("key").to_pylist())
        have_classes = set(old.column("label").to_pylist())
    classes = sorted(set(export.table.column("label").to_pylist()))
    new_classes: list[str] = []
    if known_classes is not None:
        known = set(known_classes) | have_classes
        new_classes = [c for c in classes if c not in known]
        if new_classes and not new_class:
            raise DragonsError(
                f"{name} has labels that are not known classes: {new_classes}; the known classes are "
                f"{sorted(known)}; fix the labels, or pass --new-class to admit them"
            )
    sha = hashlib.sha256(data).hexdigest()
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for r in export.table.to_pylist():
        key = _key(r, sha)
        if key in have_keys:
            continue
        have_keys.add(key)  # a row the file repeats is added once
        rows.append({**r, "source": name, "source_sha256": sha, "imported_at": now, "key": key})
    version = None if existing is None else int(existing.version())
    if rows:
        meta = {"dragons": "labels import", "source": name, "source_sha256": sha, "rows": str(len(rows))}
        with storage.delta_errors(uri, "write"):
            write_deltalake(
                uri,
                pa.Table.from_pylist(rows, schema=TABLE_SCHEMA),
                mode="append",
                storage_options=opts,
                commit_properties=CommitProperties(custom_metadata=meta),
            )
            version = int(_open(uri).version())
    n = export.table.num_rows
    return ImportResult(
        name,
        export.format,
        export.control,
        n,
        len(rows),
        n - len(rows),
        export.cancelled,
        export.unlabelled,
        classes,
        new_classes,
        version,
    )


def _key(row: dict[str, Any], sha: str) -> str:
    """The row's identity: the same annotation from any export of it is one row. An undated
    row without an annotation id (a plain CSV's) is only the same within the same file."""
    when = row["annotated_at"].isoformat() if row["annotated_at"] is not None else None
    anchor = sha if when is None and row["annotation_id"] is None else None
    parts = [row["uri"], row["label"], row["annotator"], when, row["task_id"], row["annotation_id"], anchor]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _open(uri: str, must_exist: bool = True) -> Any:
    """The labels table at ``uri`` (a DeltaTable), None where there is none (unless ``must_exist``)."""
    from deltalake import DeltaTable

    opts = storage.delta_options(uri)
    with storage.delta_errors(uri, "open"):
        if not DeltaTable.is_deltatable(uri, storage_options=opts):
            if must_exist:
                raise DragonsError(
                    f"no labels table at {storage.redact(uri)}: import a Label Studio export into it "
                    "first (dragons labels import)"
                )
            return None
        dt = DeltaTable(uri, storage_options=opts)
    names = set(dt.schema().to_arrow().names)
    if not set(TABLE_SCHEMA.names) <= names:
        raise DragonsError(
            f"{storage.redact(uri)} is a Delta table but not a labels table (it has no "
            f"{sorted(set(TABLE_SCHEMA.names) - names)}): give another labels table URI"
        )
    return dt


def is_labels_table(uri: str) -> bool:
    """Whether ``uri`` is a Delta table (else it is read as a labels file): it has a ``_delta_log``."""
    return storage.exists(storage.join(uri, "_delta_log"))


def latest(labels_uri: str) -> pa.Table:
    """One label per URI: the newest annotation wins (see the module's docstring).

    Columns: uri, label, annotator, annotated_at, annotators (how many annotators
    labelled the URI), disagree (their own newest labels differ); sorted by uri."""
    uri = storage.parse(labels_uri).uri.rstrip("/")
    dt = _open(uri)
    with storage.delta_errors(uri):
        rows = dt.to_pyarrow_table(
            columns=["uri", "label", "annotator", "annotated_at", "annotation_id", "imported_at"]
        )
    return latest_of(rows).drop_columns(["split"])


def latest_of(rows: pa.Table) -> pa.Table:
    """:func:`latest`'s rule over rows in memory (an optional ``split`` column follows the winning row)."""
    import duckdb  # heavy import, only where a view is computed

    if "split" not in rows.column_names:
        rows = rows.append_column("split", pa.nulls(rows.num_rows, pa.string()))
    if "imported_at" not in rows.column_names:
        rows = rows.append_column("imported_at", pa.array([datetime.now(UTC)] * rows.num_rows, UTC_US))
    order = (
        "coalesce(annotated_at, imported_at) DESC, annotation_id DESC NULLS LAST, imported_at DESC, label, annotator"
    )
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("labels", rows)
        out = con.execute(f"""
            WITH ranked AS (
                SELECT uri, label, annotator, annotated_at, split,
                       row_number() OVER (PARTITION BY uri ORDER BY {order}) AS rn,
                       row_number() OVER (PARTITION BY uri, annotator ORDER BY {order}) AS rn_annotator
                FROM labels),
            votes AS (
                SELECT uri, count(*) AS annotators, count(DISTINCT label) > 1 AS disagree
                FROM ranked WHERE rn_annotator = 1 GROUP BY uri)
            SELECT r.uri, r.label, r.annotator, r.annotated_at, v.annotators, v.disagree, r.split
            FROM ranked r JOIN votes v USING (uri) WHERE r.rn = 1 ORDER BY r.uri""").fetch_arrow_table()
    finally:
        con.close()
    schema = pa.schema(
        [
            ("uri", pa.string()),
            ("label", pa.string()),
            ("annotator", pa.string()),
            ("annotated_at", UTC_US),
            ("annotators", pa.int64()),
            ("disagree", pa.bool_()),
            ("split", pa.string()),
        ]
    )
    return out.cast(schema)


def disagreements(view: pa.Table) -> int:
    """How many URIs of a :func:`latest` view had annotators disagreeing."""
    return int(sum(view.column("disagree").to_pylist()))


def training_labels(uri: str) -> pa.Table:
    """Labels to train on, columns uri, label, split (null: the trainer's hash split decides):
    the ``latest`` view of a labels table, or any file :func:`read_export` reads, reduced
    to one label per URI by the same rule."""
    if is_labels_table(uri):
        view = latest(uri)
        return pa.table(
            {"uri": view.column("uri"), "label": view.column("label"), "split": pa.nulls(view.num_rows, pa.string())}
        )
    export = read_export(uri)
    rows = export.table
    if export.split is not None:
        rows = rows.append_column("split", export.split)
    view = latest_of(rows)
    return view.select(["uri", "label", "split"])
