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

Fanned out (``split`` + ``iter_unit``): the input is cut into disjoint units, each
listed by its own stream. A unit is the keys in ``(after, upto]`` of one total
order: S3's own (UTF-8 binary = Python ``str`` order of the key), a sorted local
walk's (the relative path with separators as NUL, which sorts like the path's
components), or an inventory data file's row order. Any sorted set of boundaries
gives units that together hold every key exactly once, whatever the keys' bytes;
where the boundaries fall only decides how even the streams are.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dragons import storage
from dragons.errors import DragonsError
from dragons.score.inventory import inventory_files, read_inventory_file
from dragons.score.schema import LISTING_SCHEMA

PAGE_ROWS = 1000  # S3's page size; local walks emit tables of the same size


def _table(uris: list[str], etags: list[str | None], sizes: list[int], mtimes: list[datetime]) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array(uris, pa.string()),
            pa.array(etags, pa.string()),
            pa.array(sizes, pa.int64()),
            pa.array(mtimes, pa.timestamp("us", tz="UTC")),
        ],
        schema=LISTING_SCHEMA,
    )


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
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": min(1000, page_rows)}
        )
        for page in pages:
            objs: list[dict[str, Any]] = [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            if not objs:
                continue
            found = True
            yield _table(
                [f"s3://{bucket}/{o['Key']}" for o in objs],
                [str(o.get("ETag", "")).strip('"') or None for o in objs],
                [int(o.get("Size", 0)) for o in objs],
                [o["LastModified"] for o in objs],
            )
        if not found and key:
            # The input may name one object rather than a prefix.
            head = client.head_object(Bucket=bucket, Key=key)
            found = True
            yield _table(
                [f"s3://{bucket}/{key}"],
                [str(head.get("ETag", "")).strip('"') or None],
                [int(head.get("ContentLength", 0))],
                [head["LastModified"]],
            )
    except DragonsError:
        raise
    except Exception as exc:  # noqa: BLE001 (any botocore failure becomes a message naming the input)
        raise s3_list_error(loc, bucket, exc) from None
    if not found:
        raise DragonsError(f"--input {loc.uri} does not exist or holds no objects: check the path or prefix")


def s3_list_error(loc: storage.Location, bucket: str, exc: BaseException) -> DragonsError:
    """A failed S3 LIST or HEAD as a message naming the input and what to check."""
    code = storage.s3_error_code(exc)
    if code == "NoSuchBucket":
        return DragonsError(
            f"--input {loc.uri}: bucket {bucket!r} does not exist "
            f"(endpoint {storage.s3_endpoint() or 'AWS'}): check the bucket name"
        )
    if code in storage.NOT_FOUND_CODES:
        return DragonsError(f"--input {loc.uri} does not exist: check the path or prefix")
    if code in storage.DENIED_CODES:
        return DragonsError(f"access denied: cannot list --input {loc.uri}: check the credentials' permissions on it")
    if code in storage.UNREACHABLE_CODES:
        return storage.unreachable(loc, exc)
    return DragonsError(
        f"cannot list --input {loc.uri}: {storage.redact(str(code))}; check AWS_ENDPOINT_URL and credentials"
    )


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
        logging.getLogger("dragons.score").warning(
            "file name is not valid UTF-8, its row will be an error: %s (rename it to score it)", shown
        )
        return shown


def _weak_etag(st: os.stat_result) -> str:
    return f"W/{st.st_mtime_ns:x}-{st.st_size:x}"


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, UTC)


def from_uris(uris: list[str] | pa.Array) -> pa.Table:
    """A listing table for URIs given by a --manifest (nothing known about them)."""
    n = len(uris)
    return pa.Table.from_arrays(
        [
            uris if isinstance(uris, pa.Array) else pa.array(uris, pa.string()),
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.int64()),
            pa.nulls(n, pa.timestamp("us", tz="UTC")),
        ],
        schema=LISTING_SCHEMA,
    )


# ---------------------------------------------------------------------------
# Fan-out: units, the driver's split, and one unit's listing.

# Units per stream: more units than streams evens out units of unequal size
# (assigned round-robin), at one extra LIST call per unit.
UNITS_PER_STREAM = 4
# The split's LIST calls: concurrent, and bounded whatever the key space looks like.
SPLIT_THREADS = 16
MAX_PROBES = 256
# Character classes a key's next character is guessed from (see _spine).
_CLASSES = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class Unit:
    """A disjoint piece of the input: keys (S3), walk positions (local) or rows
    (inventory) in ``(after, upto]``; ``None`` is open. ``single``: the input names
    one object. ``file``: the inventory data file (an ``InventoryFile``)."""

    kind: str  # "s3" | "local" | "inventory"
    root: str  # s3: bucket; local: folder; inventory: the --input it is filtered to
    prefix: str = ""
    after: str | None = None
    upto: str | None = None
    single: bool = False
    file: Any = None


def ranges(kind: str, root: str, prefix: str, bounds: list[str]) -> list[Unit]:
    """Units between sorted, distinct ``bounds``: (None, b0], (b0, b1], ..., (bn, None]."""
    edges: list[str | None] = [None, *sorted(set(bounds)), None]
    return [Unit(kind, root, prefix, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _coarsen(bounds: list[str], want: int) -> list[str]:
    """At most ``want - 1`` of the sorted bounds, evenly spaced (each unit costs a LIST call)."""
    b = sorted(set(bounds))
    if len(b) < want:
        return b
    picks = np.unique(np.linspace(0, len(b) - 1, want - 1).round().astype(int))
    return [b[i] for i in picks]


def split(uri: str, streams: int) -> list[Unit]:
    """The input cut into disjoint units that together hold every object once
    (a few LIST calls or directory reads, in this process)."""
    loc = storage.parse(uri)
    want = max(1, streams) * UNITS_PER_STREAM
    if loc.is_s3:
        bucket, _, key = loc.path.partition("/")
        return _split_s3(loc, bucket, key.rstrip("/") + "/" if key else "", key, want)
    return _split_local(loc.path, want)


def _split_s3(loc: storage.Location, bucket: str, prefix: str, key: str, want: int) -> list[Unit]:
    """S3: boundaries at common prefixes (Delimiter='/', one level deeper while
    there are fewer than wanted), and for a flat prefix at guessed key ranges.

    aws-samples/s3-fast-list cuts the key space at boundary keys from "ks hints",
    a key-count distribution from an earlier listing or an S3 Inventory, and lists
    each [start, end) with StartAfter and an end compare (UTF-8 binary order). A
    run has no such hints when it starts, so the split samples the key space
    instead: folders where there are folders; otherwise the siblings to the right
    of the first page's last key at each character after the prefix (``_spine``:
    "img_00999" gives "img_01".."img_09", "img_1".."img_9", ...), probed in
    parallel so that empty ranges are dropped. Coverage never depends on these
    guesses (any sorted bounds do); only how even the streams are does."""
    client = storage.boto3_client(max_pool_connections=SPLIT_THREADS)
    try:
        first = client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=1000)
        folders = [p["Prefix"] for p in first.get("CommonPrefixes", [])]
        keys = [o["Key"] for o in first.get("Contents", [])]
        if not folders and not keys:
            if key:  # the input may name one object rather than a prefix
                client.head_object(Bucket=bucket, Key=key)
                return [Unit("s3", bucket, key, single=True)]
            raise DragonsError(f"--input {loc.uri} does not exist or holds no objects: check the path or prefix")
        if not first.get("IsTruncated") and not folders:
            return [Unit("s3", bucket, prefix)]  # one LIST call holds it all
        bounds = list(folders)
        if len(folders) < want and not first.get("IsTruncated"):
            with ThreadPoolExecutor(SPLIT_THREADS) as pool:
                for sub in pool.map(
                    lambda p: client.list_objects_v2(Bucket=bucket, Prefix=p, Delimiter="/", MaxKeys=1000),
                    folders[:MAX_PROBES],
                ):
                    bounds += [p["Prefix"] for p in sub.get("CommonPrefixes", [])]
        if first.get("IsTruncated"):
            bounds += _probed_spine(client, bucket, prefix, sorted(keys + folders))
    except DragonsError:
        raise
    except Exception as exc:  # noqa: BLE001 (any botocore failure becomes a message naming the input)
        raise s3_list_error(loc, bucket, exc) from None
    return ranges("s3", bucket, prefix, _coarsen(bounds, want))


def _spine(prefix: str, seen: list[str]) -> list[str]:
    """Guessed boundaries: a few of the keys seen, and right of the last one, at each position from the
    prefix to one past the seen keys' common prefix, the last key's characters
    there, followed by every later character of the same class (digits, lower,
    upper case; other characters: the ones seen at that position)."""
    last = seen[-1]
    common = os.path.commonprefix(seen)
    out: list[str] = []
    for i in range(len(prefix), min(len(last), len(common) + 1)):
        ch = last[i]
        cls = next((c for c in _CLASSES if ch in c), "".join(sorted({k[i] for k in seen if len(k) > i})))
        out += [last[:i] + c for c in cls if c > ch]
    # The seen keys themselves split the part already known (the first LIST page).
    known = seen[:: max(1, len(seen) // UNITS_PER_STREAM)]
    return [*known, last, *out[: MAX_PROBES - len(known) - 1]]


def _probed_spine(client: Any, bucket: str, prefix: str, seen: list[str]) -> list[str]:
    """The spine's boundaries that start a non-empty range (one MaxKeys=1 LIST each, in parallel)."""
    cands = sorted(set(_spine(prefix, seen)))

    def first_after(b: str) -> str | None:
        got = client.list_objects_v2(Bucket=bucket, Prefix=prefix, StartAfter=b, MaxKeys=1).get("Contents", [])
        return str(got[0]["Key"]) if got else None

    with ThreadPoolExecutor(SPLIT_THREADS) as pool:
        firsts = list(pool.map(first_after, cands))
    # Range (cands[i], cands[i+1]] is empty when the first key after cands[i] lies beyond it.
    return [
        b for i, (b, f) in enumerate(zip(cands, firsts)) if f is not None and (i + 1 == len(cands) or f <= cands[i + 1])
    ]


def _local_pos(rel: str) -> str:
    """A walk position: the relative path with separators as NUL, which sorts like its components."""
    return rel.replace(os.sep, "\0")


def _split_local(path: str, want: int) -> list[Unit]:
    """Local folders: boundaries at the entries of the first folder level that has
    several (a single subfolder is descended into), then evenly spaced."""
    if os.path.isfile(path):
        return [Unit("local", path, single=True)]
    if not os.path.isdir(path):
        raise DragonsError(f"--input {path} does not exist: check the path")
    rel = ""
    for _ in range(8):  # a chain of single subfolders: look below it
        try:
            names = sorted(os.listdir(os.path.join(path, rel)))
        except OSError as exc:
            raise DragonsError(f"cannot list {os.path.join(path, rel)}: {exc.strerror or exc}") from None
        if len(names) != 1 or not os.path.isdir(os.path.join(path, rel, names[0])):
            break
        rel = os.path.join(rel, names[0])
    # A subfolder d's files sort after d's own position: bound at d puts them in the next unit.
    return ranges("local", path, "", _coarsen([_local_pos(os.path.join(rel, n)) for n in names], want))


def iter_unit(unit: Unit, page_rows: int = PAGE_ROWS) -> Iterator[tuple[pa.Table, pa.Array]]:
    """One unit's objects in its order, a table at a time, with each row's position
    (sorted, comparable with the unit's bounds); never beyond ``upto``."""
    if unit.kind == "s3":
        yield from _unit_s3(unit, page_rows)
    elif unit.kind == "local":
        yield from _unit_local(unit, page_rows)
    else:
        yield from _unit_inventory(unit, page_rows)


def _unit_s3(unit: Unit, page_rows: int) -> Iterator[tuple[pa.Table, pa.Array]]:
    loc = storage.parse(f"s3://{unit.root}/{unit.prefix}")
    client = storage.boto3_client()
    try:
        if unit.single:
            head = client.head_object(Bucket=unit.root, Key=unit.prefix)
            yield (
                _table(
                    [f"s3://{unit.root}/{unit.prefix}"],
                    [str(head.get("ETag", "")).strip('"') or None],
                    [int(head.get("ContentLength", 0))],
                    [head["LastModified"]],
                ),
                pa.array([unit.prefix]),
            )
            return
        args: dict[str, Any] = {
            "Bucket": unit.root,
            "Prefix": unit.prefix,
            "PaginationConfig": {"PageSize": min(1000, page_rows)},
        }
        if unit.after is not None:
            args["StartAfter"] = unit.after
        for page in client.get_paginator("list_objects_v2").paginate(**args):
            objs: list[dict[str, Any]] = page.get("Contents", [])
            keys = pa.array([o["Key"] for o in objs], pa.string())
            keep = pc.invert(pc.ends_with(keys, "/"))
            if unit.upto is not None:
                keep = pc.and_(keep, pc.less_equal(keys, unit.upto))
            t = _table(
                [f"s3://{unit.root}/{o['Key']}" for o in objs],
                [str(o.get("ETag", "")).strip('"') or None for o in objs],
                [int(o.get("Size", 0)) for o in objs],
                [o["LastModified"] for o in objs],
            )
            yield t.filter(keep), keys.filter(keep)
            if unit.upto is not None and objs and objs[-1]["Key"] > unit.upto:
                return  # the rest lies in later units
    except DragonsError:
        raise
    except Exception as exc:  # noqa: BLE001 (any botocore failure becomes a message naming the input)
        raise s3_list_error(loc, unit.root, exc) from None


def _walk(top: str, rel: str, after: str | None, upto: str | None) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Files under ``top/rel`` in position order, skipping whole folders outside (after, upto]."""
    try:
        entries = sorted(os.scandir(os.path.join(top, rel)), key=lambda e: e.name)
    except OSError as exc:
        raise DragonsError(f"cannot list {os.path.join(top, rel)}: {exc.strerror or exc}") from None
    for e in entries:
        pos = _local_pos(os.path.join(rel, e.name))
        if e.is_dir(follow_symlinks=False):
            # Its files' positions lie in (pos + NUL, pos + "\x01").
            if (after is None or after < pos + "\x01") and (upto is None or upto > pos + "\0"):
                yield from _walk(top, os.path.join(rel, e.name), after, upto)
        elif e.is_file() and (after is None or pos > after) and (upto is None or pos <= upto):
            yield pos, e


def _unit_local(unit: Unit, page_rows: int) -> Iterator[tuple[pa.Table, pa.Array]]:
    if unit.single:
        st = os.stat(unit.root)
        yield _table([unit.root], [_weak_etag(st)], [st.st_size], [_mtime(st)]), pa.array([""])
        return
    rows: list[tuple[str, os.DirEntry[str]]] = []
    for item in _walk(unit.root, "", unit.after, unit.upto):
        rows.append(item)
        if len(rows) >= page_rows:
            yield _local_table(rows)
            rows = []
    if rows:
        yield _local_table(rows)


def _local_table(rows: list[tuple[str, os.DirEntry[str]]]) -> tuple[pa.Table, pa.Array]:
    stats = [e.stat() for _, e in rows]
    return (
        _table(
            [_name(e.path) for _, e in rows],
            [_weak_etag(st) for st in stats],
            [st.st_size for st in stats],
            [_mtime(st) for st in stats],
        ),
        pa.array([p for p, _ in rows], pa.string()),
    )


# Inventory rows are positioned by their row number in the data file (files never change).
_ROW_DIGITS = 12


def _unit_inventory(unit: Unit, page_rows: int) -> Iterator[tuple[pa.Table, pa.Array]]:
    start = 0
    after = -1 if unit.after is None else int(unit.after)
    for t in read_inventory_file(unit.file, page_rows):
        n = t.num_rows
        rows = np.arange(start, start + n)
        start += n
        keep = rows > after
        if keep.any():
            pos = pc.utf8_lpad(pa.array(rows[keep]).cast(pa.string()), _ROW_DIGITS, "0")
            yield t.filter(pa.array(keep)), pos


def inventory_units(manifest: str, input_uri: str) -> list[Unit]:
    """One unit per inventory data file."""
    return [Unit("inventory", input_uri, file=f) for f in inventory_files(manifest, input_uri)]
