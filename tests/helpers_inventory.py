"""Build an AWS S3 Inventory report in AWS's exact layout, locally or on S3, for tests.

Layout and fields as ../shared/reference/formats.md states them::

    <root>/<prefix>/<source-bucket>/<config-id>/<YYYY-MM-DDTHH-MMZ>/manifest.json
    <root>/<prefix>/<source-bucket>/<config-id>/<YYYY-MM-DDTHH-MMZ>/manifest.checksum
    <root>/<prefix>/<source-bucket>/<config-id>/hive/dt=<YYYY-MM-DD-HH-MM>/symlink.txt
    <root>/<prefix>/<source-bucket>/<config-id>/data/<uuid>.{csv.gz,orc,parquet}

``root`` is the destination bucket's root: ``s3://<bucket>`` or a local folder
standing for it (what ``aws s3 sync s3://<bucket> <folder>`` makes).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote_plus

import pyarrow as pa

# AWS's CSV field names (fileSchema) and their Parquet/ORC names.
ALL_FIELDS = (
    "Bucket",
    "Key",
    "VersionId",
    "IsLatest",
    "IsDeleteMarker",
    "Size",
    "LastModifiedDate",
    "ETag",
    "StorageClass",
)
COLUMN = {
    "Bucket": "bucket",
    "Key": "key",
    "VersionId": "version_id",
    "IsLatest": "is_latest",
    "IsDeleteMarker": "is_delete_marker",
    "Size": "size",
    "LastModifiedDate": "last_modified_date",
    "ETag": "e_tag",
    "StorageClass": "storage_class",
}
_PARQUET_TYPE = {
    "bucket": "required binary bucket (STRING)",
    "key": "required binary key (STRING)",
    "version_id": "optional binary version_id (STRING)",
    "is_latest": "optional boolean is_latest",
    "is_delete_marker": "optional boolean is_delete_marker",
    "size": "optional int64 size",
    "last_modified_date": "optional int64 last_modified_date (TIMESTAMP(MILLIS,true))",
    "e_tag": "optional binary e_tag (STRING)",
    "storage_class": "optional binary storage_class (STRING)",
}
_ORC_TYPE = {
    "bucket": "string",
    "key": "string",
    "version_id": "string",
    "is_latest": "boolean",
    "is_delete_marker": "boolean",
    "size": "bigint",
    "last_modified_date": "timestamp",
    "e_tag": "string",
    "storage_class": "string",
}
DEFAULT_MTIME = datetime(2026, 12, 4, 23, 5, 7, 123000, tzinfo=UTC)
DEFAULT_CREATED = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)
EXT = {"CSV": "csv.gz", "ORC": "orc", "Parquet": "parquet"}


@dataclass(frozen=True)
class Obj:
    """One inventory row: an object version (or a delete marker) of the source bucket."""

    key: str
    size: int | None = 100
    etag: str | None = "0123456789abcdef0123456789abcdef"
    last_modified: datetime | None = DEFAULT_MTIME
    version_id: str | None = None
    is_latest: bool = True
    is_delete_marker: bool = False


def marker(key: str, version_id: str = "vDel") -> Obj:
    """A delete marker: the key's latest "version"; it has no size or ETag."""
    return Obj(key, size=None, etag=None, version_id=version_id, is_delete_marker=True)


def _obj(o: Obj | tuple | str) -> Obj:
    if isinstance(o, Obj):
        return o
    if isinstance(o, str):
        return Obj(o)
    return Obj(*o)  # (key, size, etag[, last_modified, version_id, is_latest, is_delete_marker])


def _value(o: Obj, column: str, source_bucket: str) -> object:
    return {
        "bucket": source_bucket,
        "key": o.key,
        "version_id": o.version_id,
        "is_latest": o.is_latest,
        "is_delete_marker": o.is_delete_marker,
        "size": o.size,
        "last_modified_date": o.last_modified,
        "e_tag": o.etag,
        "storage_class": None if o.is_delete_marker else "STANDARD",
    }[column]


def _csv_cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{v.microsecond // 1000:03d}Z"
    return str(v)


def data_file(
    objs: Sequence[Obj], fmt: str, source_bucket: str, fields: Sequence[str], encode_slash: bool = False
) -> bytes:
    """One data file's bytes in ``fmt`` with the columns of ``fields`` (AWS's CSV names)."""
    columns = [COLUMN[f] for f in fields]
    if fmt == "CSV":
        text = io.StringIO()
        writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for o in objs:
            row = [_csv_cell(_value(o, c, source_bucket)) for c in columns]
            # The key is URL-encoded, a space as '+' (form encoding, as S3 does);
            # whether '/' is escaped too, the reader must not care.
            row[columns.index("key")] = quote_plus(o.key, safe="" if encode_slash else "/")
            writer.writerow(row)
        return gzip.compress(text.getvalue().encode("utf-8"))
    types = {
        "bucket": pa.string(),
        "key": pa.string(),
        "version_id": pa.string(),
        "is_latest": pa.bool_(),
        "is_delete_marker": pa.bool_(),
        "size": pa.int64(),
        "e_tag": pa.string(),
        "storage_class": pa.string(),
        # Parquet: TIMESTAMP(MILLIS, UTC); ORC: a plain timestamp (UTC values).
        "last_modified_date": pa.timestamp("ms", tz="UTC") if fmt == "Parquet" else pa.timestamp("ms"),
    }
    arrays = []
    for c in columns:
        values = [_value(o, c, source_bucket) for o in objs]
        if c == "last_modified_date" and fmt == "ORC":
            values = [v.astimezone(UTC).replace(tzinfo=None) if isinstance(v, datetime) else v for v in values]
        arrays.append(pa.array(values, types[c]))
    table = pa.Table.from_arrays(arrays, names=columns)
    buf = io.BytesIO()
    if fmt == "Parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, buf)
    else:
        import pyarrow.orc as porc

        porc.write_table(table, buf)
    return buf.getvalue()


def file_schema(fmt: str, fields: Sequence[str]) -> str:
    columns = [COLUMN[f] for f in fields]
    if fmt == "CSV":
        return ", ".join(fields)
    if fmt == "ORC":
        return "struct<" + ",".join(f"{c}:{_ORC_TYPE[c]}" for c in columns) + ">"
    return "message s3.inventory { " + " ".join(_PARQUET_TYPE[c] + ";" for c in columns) + " }"


def _put(root: str, key: str, data: bytes) -> None:
    if root.startswith("s3://"):
        from dragons import storage

        # One plain PUT: pyarrow's output stream would gzip a '.gz' name a second time.
        storage.boto3_client().put_object(Bucket=root[5:].split("/", 1)[0], Key=key, Body=data)
        return
    path = Path(root, *key.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_inventory(
    root: str | Path,
    source_bucket: str,
    objects: Sequence[Obj | tuple | str],
    fmt: str = "Parquet",
    *,
    prefix: str = "inventory",
    config_id: str = "daily-scoring",
    created: datetime = DEFAULT_CREATED,
    files: int = 1,
    fields: Sequence[str] = ALL_FIELDS,
    dest_bucket: str = "inventory-dest",
    encode_slash: bool = False,
    manifest_extra: dict | None = None,
) -> str:
    """Write one report of ``objects`` (Obj, (key, size, etag, ...) tuples or bare keys) split
    over ``files`` data files; returns the manifest's URI (``s3://...`` or a local path).

    ``root`` = ``s3://bucket``: the destination bucket is that bucket (``dest_bucket`` is
    ignored); a local folder: it stands for ``dest_bucket``'s root. ``prefix`` may be ""
    or have several components. ``manifest_extra`` overrides or (value None) removes fields.
    """
    objs = [_obj(o) for o in objects]
    chunks = [objs[i::files] if files > 1 else objs for i in range(files)]
    return write_report(
        root,
        source_bucket,
        (data_file(c, fmt, source_bucket, fields, encode_slash) for c in chunks),
        fmt,
        prefix=prefix,
        config_id=config_id,
        created=created,
        fields=fields,
        dest_bucket=dest_bucket,
        manifest_extra=manifest_extra,
    )


def write_report(
    root: str | Path,
    source_bucket: str,
    data_files: Iterable[bytes],
    fmt: str = "Parquet",
    *,
    prefix: str = "inventory",
    config_id: str = "daily-scoring",
    created: datetime = DEFAULT_CREATED,
    fields: Sequence[str] = ALL_FIELDS,
    dest_bucket: str = "inventory-dest",
    manifest_extra: dict | None = None,
) -> str:
    """The report's layout around data files already encoded (``data_file``'s output, or
    a benchmark's own millions of rows): the files under ``data/``, ``manifest.json``,
    ``manifest.checksum`` and the Hive symlink; returns the manifest's URI."""
    root = str(root)
    if root.startswith("s3://"):
        dest_bucket = root[5:].split("/", 1)[0]
        root = f"s3://{dest_bucket}"
    base = "/".join(p for p in (prefix.strip("/"), source_bucket, config_id) if p)
    stamp = created.astimezone(UTC)
    folder = f"{base}/{stamp:%Y-%m-%dT%H-%MZ}"
    entries = []
    for data in data_files:
        key = f"{base}/data/{uuid.uuid4()}.{EXT[fmt]}"
        _put(root, key, data)
        entries.append({"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()})
    manifest: dict = {
        "sourceBucket": source_bucket,
        "destinationBucket": f"arn:aws:s3:::{dest_bucket}",
        "version": "2016-11-30",
        "creationTimestamp": str(int(stamp.timestamp() * 1000)),
        "fileFormat": fmt,
        "fileSchema": file_schema(fmt, fields),
        "files": entries,
    }
    for k, v in (manifest_extra or {}).items():
        if v is None:
            manifest.pop(k, None)
        else:
            manifest[k] = v
    body = json.dumps(manifest, indent=2).encode("utf-8")
    _put(root, f"{folder}/manifest.json", body)
    _put(root, f"{folder}/manifest.checksum", hashlib.md5(body).hexdigest().encode("ascii"))
    symlink = "".join(f"s3://{dest_bucket}/{e['key']}\n" for e in entries)
    _put(root, f"{base}/hive/dt={stamp:%Y-%m-%d-%H-%M}/symlink.txt", symlink.encode("utf-8"))
    if root.startswith("s3://"):
        return f"{root}/{folder}/manifest.json"
    return os.path.join(root, *folder.split("/"), "manifest.json")
