"""Streaming listing of an input prefix, page by page, with what identifies each object.

Yields Arrow tables of ``uri, etag, size, last_modified`` a page at a time, so a
listing of millions of objects never becomes a Python list in the driver.

* S3: boto3's ``list_objects_v2`` paginator (1000 keys a page). Keys come back
  raw and become ``s3://bucket/key`` unchanged: no decoding or encoding, so a key
  with '#', '?', '%' or spaces keeps its exact name in the row's ``uri``. The
  etag is S3's (quotes stripped).
* Local folders: an ``os.scandir`` walk. Local files have no etag; we use a weak
  one from the modification time and size (as HTTP servers do) instead of
  hashing every file's bytes in the driver.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import Any, Iterator

import pyarrow as pa

from dragons import storage
from dragons.errors import DragonsError
from dragons.score.schema import LISTING_SCHEMA

PAGE_ROWS = 1000  # S3's page size; local walks emit tables of the same size


def _table(uris: list[str], etags: list[str | None], sizes: list[int], mtimes: list[datetime]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(uris, pa.string()), pa.array(etags, pa.string()), pa.array(sizes, pa.int64()),
         pa.array(mtimes, pa.timestamp("us", tz="UTC"))], schema=LISTING_SCHEMA)


def iter_listing(uri: str, page_rows: int = PAGE_ROWS) -> Iterator[pa.Table]:
    """Every file under ``uri`` (recursively), one Arrow table per page.

    A missing bucket or prefix is an error naming the input, not an empty listing.
    """
    loc = storage.parse(uri)
    if loc.is_s3:
        yield from _iter_s3(loc, page_rows)
    else:
        yield from _iter_local(loc.path, page_rows)


def _iter_s3(loc: storage.Location, page_rows: int) -> Iterator[pa.Table]:
    bucket, _, key = loc.path.partition("/")
    client = storage.boto3_client()
    prefix = key.rstrip("/") + "/" if key else ""
    found = False
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": min(1000, page_rows)})
        for page in pages:
            objs: list[dict[str, Any]] = [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            if not objs:
                continue
            found = True
            yield _table([f"s3://{bucket}/{o['Key']}" for o in objs], [str(o.get("ETag", "")).strip('"') or None for o in objs],
                         [int(o.get("Size", 0)) for o in objs], [o["LastModified"] for o in objs])
        if not found and key:
            # The input may name one object rather than a prefix.
            head = client.head_object(Bucket=bucket, Key=key)
            found = True
            yield _table([f"s3://{bucket}/{key}"], [str(head.get("ETag", "")).strip('"') or None],
                         [int(head.get("ContentLength", 0))], [head["LastModified"]])
    except DragonsError:
        raise
    except Exception as exc:
        code = storage.s3_error_code(exc)
        if code == "NoSuchBucket":
            raise DragonsError(f"--input {loc.uri}: bucket {bucket!r} does not exist "
                               f"(endpoint {storage.s3_endpoint() or 'AWS'}): check the bucket name") from None
        if code in storage.NOT_FOUND_CODES:
            raise DragonsError(f"--input {loc.uri} does not exist: check the path or prefix") from None
        if code in storage.DENIED_CODES:
            raise DragonsError(f"access denied: cannot list --input {loc.uri}: check the credentials' permissions on it") from None
        if code in storage.UNREACHABLE_CODES:
            raise storage.unreachable(loc, exc) from None
        raise DragonsError(f"cannot list --input {loc.uri}: {storage.redact(str(code))}; check AWS_ENDPOINT_URL and credentials") from None
    if not found:
        raise DragonsError(f"--input {loc.uri} does not exist or holds no objects: check the path or prefix")


def _iter_local(path: str, page_rows: int) -> Iterator[pa.Table]:
    if os.path.isfile(path):
        st = os.stat(path)
        yield _table([path], [_weak_etag(st)], [st.st_size], [_mtime(st)])
        return
    if not os.path.isdir(path):
        raise DragonsError(f"--input {path} does not exist: check the path")
    uris: list[str] = []
    etags: list[str | None] = []
    sizes: list[int] = []
    mtimes: list[datetime] = []
    stack = [path]
    any_file = False
    while stack:
        top = stack.pop()
        try:
            entries = sorted(os.scandir(top), key=lambda e: e.name)
        except OSError as exc:
            raise DragonsError(f"cannot list {top}: {exc.strerror or exc}") from None
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif e.is_file():
                st = e.stat()
                uris.append(_name(e.path))
                etags.append(_weak_etag(st))
                sizes.append(st.st_size)
                mtimes.append(_mtime(st))
                any_file = True
                if len(uris) >= page_rows:
                    yield _table(uris, etags, sizes, mtimes)
                    uris, etags, sizes, mtimes = [], [], [], []
    if uris:
        yield _table(uris, etags, sizes, mtimes)
    elif not any_file:
        raise DragonsError(f"--input {path} holds no files: check the path")


def _name(path: str) -> str:
    """A local path as a URI string. A name that is not valid UTF-8 cannot be one:
    it is kept with the bad bytes written as \\xNN (its row then fails to read:
    an error row naming it, never a crashed listing) and logged."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        logging.getLogger("dragons.score").warning("file name is not valid UTF-8, its row will be an error: %s "
                                                   "(rename it to score it)", shown)
        return shown


def _weak_etag(st: os.stat_result) -> str:
    return f"W/{st.st_mtime_ns:x}-{st.st_size:x}"


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, timezone.utc)


def from_uris(uris: list[str] | pa.Array) -> pa.Table:
    """A listing table for URIs given by a --manifest (nothing known about them)."""
    n = len(uris)
    return pa.Table.from_arrays([uris if isinstance(uris, pa.Array) else pa.array(uris, pa.string()), pa.nulls(n, pa.string()), pa.nulls(n, pa.int64()),
                                 pa.nulls(n, pa.timestamp("us", tz="UTC"))], schema=LISTING_SCHEMA)
