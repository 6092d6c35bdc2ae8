"""An AWS S3 Inventory report as the list of objects to score (``dragons score --inventory``).

A bucket of 100M objects takes hours to list with ``list_objects_v2``; its daily
inventory report is the same list, already written. We read a report in AWS's
own layout (facts: ../shared/reference/formats.md)::

    <dest>/<prefix>/<source-bucket>/<config-id>/<YYYY-MM-DDTHH-MMZ>/manifest.json
    <dest>/<prefix>/<source-bucket>/<config-id>/data/<uuid>.{csv.gz,orc,parquet}

``inventory_files`` reads and checks ``manifest.json`` and names each data file
(an ``InventoryFile``, small and picklable: the scoring pipeline ships one to
each Ray read task); ``read_inventory_file`` streams one file's rows as
``LISTING_SCHEMA`` pages, the same pages ``listing.iter_listing`` yields, so
everything after the listing (skip sets, --incremental, blocks) is unchanged.

A row becomes ``s3://<source-bucket>/<key>`` only if it is an object a listing
of ``--input`` would return today-as-of-the-report: under the --input prefix, not
a delete marker, the latest version, not a "folder" key ending in '/'.
Filtering is Arrow compute on whole batches; no per-row Python except the CSV
key decoding of the few keys that need it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.orc as porc
import pyarrow.parquet as pq

from dragons import storage
from dragons.errors import DragonsError
from dragons.rowerrors import ErrorKind
from dragons.score.schema import LISTING_SCHEMA

FORMATS = ("CSV", "ORC", "Parquet")
# The columns we use, by their Parquet/ORC names (CSV names are normalised to these).
KEY = "key"
_WANTED = ("key", "is_latest", "is_delete_marker", "size", "last_modified_date", "e_tag")
# Rows read per Parquet batch: big enough that the per-batch compute calls cost
# little over 100M rows, small enough (~10 MB) that a read task stays lean.
READ_ROWS = 64 * 1024
CSV_BLOCK = 1 << 20  # bytes of decompressed CSV per streamed block (a few thousand rows)
READ_AHEAD_FILES = 2  # inventory_pages: files being read at once (the current one included)
QUEUE_PAGES = 4  # pages each read-ahead file may hold before its thread waits
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class InventoryFile:
    """One data file of a report: all a read task needs, no open handles (picklable)."""

    uri: str  # the data file (s3://dest-bucket/key or a local path)
    file_format: str  # "CSV" | "ORC" | "Parquet"
    columns: tuple[str, ...]  # CSV: fileSchema's field names in order (normalised); ORC/Parquet: ()
    source_bucket: str  # the inventoried bucket: rows become s3://<source_bucket>/<key>
    prefix_key: str  # keep keys under this key prefix ("" = all); derived from --input
    size: int  # from the manifest (0 if absent)
    # The manifest it came from, only so that an error about the file names the
    # --inventory the user gave (defaulted: the fields above are the interface).
    manifest: str = ""


def normalise(name: str) -> str:
    """A field name as Parquet/ORC spell it: CSV's ``LastModifiedDate`` -> ``last_modified_date``,
    ``ETag`` -> ``e_tag``, ``VersionId`` -> ``version_id``; snake_case names stay as they are."""
    name = name.strip()
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


# ----------------------------------------------------------------- the manifest


def _read_manifest(manifest_uri: str) -> dict[str, Any]:
    shown = storage.redact(manifest_uri)
    what = (
        "give the manifest.json of an S3 Inventory report "
        "(<prefix>/<source-bucket>/<config-id>/<YYYY-MM-DDTHH-MMZ>/manifest.json)"
    )
    loc = storage.parse(manifest_uri)
    if not loc.is_s3 and os.path.isdir(loc.path):
        # Checked here: storage.read_bytes fails on a local folder with an AssertionError.
        raise DragonsError(f"--inventory {shown} is a folder: {what}")
    try:
        raw = storage.read_bytes(manifest_uri)
    except storage.ObjectError as exc:
        if exc.kind is ErrorKind.NOT_FOUND:
            raise DragonsError(f"--inventory {shown} does not exist: {what}") from None
        raise DragonsError(f"--inventory {shown} cannot be read: {storage.redact(str(exc))}") from None
    except DragonsError as exc:  # no such bucket, an endpoint down (storage names which)
        raise DragonsError(f"--inventory {shown} cannot be read: {storage.redact(str(exc))}") from None
    except OSError as exc:  # e.g. a local file without read permission
        raise DragonsError(f"--inventory {shown} cannot be read ({storage.short_error(exc)}): {what}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        # Only the parser's position goes into the message, never the file's text.
        where = f"line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise DragonsError(f"--inventory {shown} is not JSON ({where}): {what}") from None
    if not isinstance(doc, dict):
        raise DragonsError(f"--inventory {shown} is JSON but not an object: {what}")
    return doc


def _field(doc: dict[str, Any], name: str, shown: str, kind: type = str) -> Any:
    value: Any = doc.get(name)
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise DragonsError(
            f"--inventory {shown}: manifest.json has no valid {name!r} field; is it an S3 Inventory "
            "manifest.json, complete and unedited? Give the report's manifest.json as AWS wrote it"
        )
    return value


def _bucket_from_arn(arn: str, shown: str) -> str:
    # destinationBucket is an ARN, "arn:aws:s3:::bucket" (other partitions: arn:aws-cn:s3:::...).
    if not arn.startswith("arn:") or ":s3:::" not in arn or not arn.rsplit(":", 1)[1]:
        raise DragonsError(
            f"--inventory {shown}: destinationBucket {arn!r} is not an S3 bucket ARN "
            "(arn:aws:s3:::bucket): give the report's manifest.json as AWS wrote it"
        )
    return arn.rsplit(":", 1)[1]


def _local_data_path(manifest_path: str, key: str, shown: str) -> str:
    """Where a data file of a local copy of the report is.

    ``files[].key`` is relative to the destination bucket's root. The manifest's
    own path ends with ``<prefix>/<source-bucket>/<config-id>/<ts>/manifest.json``
    and the key begins with ``<prefix>/<source-bucket>/<config-id>/``: the
    manifest's config folder (two levels up) is the key's leading components.
    Matching them from the longest run down finds the copy's bucket root for a
    copy of the whole bucket (``aws s3 sync s3://dest ./inv``), and also for a
    copy of the destination prefix only (``aws s3 sync s3://dest/prefix ./inv``),
    where just ``<source-bucket>/<config-id>`` line up.
    """
    parts = key.split("/")
    config_dir = os.path.dirname(os.path.dirname(manifest_path))
    here = tuple(config_dir.split(os.sep))
    lead = len(parts) - 2  # the components before data/<file>
    for start in range(max(lead, 0)):
        n = lead - start
        if n <= len(here) and here[len(here) - n :] == tuple(parts[start:lead]):
            return os.path.join(config_dir, *parts[lead:])
    raise DragonsError(
        f"--inventory {shown}: data file key {key!r} does not sit beside the manifest's folders; "
        "keep the report's layout in the local copy (aws s3 sync s3://<destination-bucket> <folder>) "
        "and give <folder>/<prefix>/<source-bucket>/<config-id>/<YYYY-MM-DDTHH-MMZ>/manifest.json"
    )


def _prefix_key(input_uri: str, source_bucket: str, shown: str) -> str:
    want = f"give --input s3://{source_bucket}[/prefix]"
    if not input_uri:
        raise DragonsError(f"--inventory {shown} lists bucket {source_bucket!r}: {want}, the part of it to score")
    loc = storage.parse(input_uri)
    if not loc.is_s3 or loc.bucket != source_bucket:
        raise DragonsError(
            f"--input {storage.redact(loc.uri)} is not in the bucket that --inventory {shown} lists "
            f"(sourceBucket {source_bucket!r}): {want}, or the inventory of --input's bucket"
        )
    key = loc.path.partition("/")[2]
    # As listing does: --input s3://b/photos means the folder photos/, not photos2/.
    return key.rstrip("/") + "/" if key else ""


def inventory_files(manifest_uri: str, input_uri: str) -> list[InventoryFile]:
    """Read and validate manifest.json; one InventoryFile per files[] entry. Raises DragonsError."""
    shown = storage.redact(manifest_uri)
    doc = _read_manifest(manifest_uri)
    source_bucket = _field(doc, "sourceBucket", shown)
    dest_bucket = _bucket_from_arn(_field(doc, "destinationBucket", shown), shown)
    fmt_raw = _field(doc, "fileFormat", shown)
    fmt = next((f for f in FORMATS if f.lower() == fmt_raw.strip().lower()), None)
    if fmt is None:
        raise DragonsError(
            f"--inventory {shown}: fileFormat {fmt_raw!r} is not one of {', '.join(FORMATS)}; "
            "give a report in one of those formats"
        )
    columns: tuple[str, ...] = ()
    if fmt == "CSV":
        # A CSV file has no header row: fileSchema is the only record of its columns.
        columns = tuple(normalise(c) for c in _field(doc, "fileSchema", shown).split(","))
        if KEY not in columns:
            raise DragonsError(
                f"--inventory {shown}: fileSchema {doc['fileSchema']!r} has no Key field; "
                "an inventory without object keys cannot be scored"
            )
    entries = _field(doc, "files", shown, list)
    prefix_key = _prefix_key(input_uri, source_bucket, shown)
    loc = storage.parse(manifest_uri)
    out = []
    for i, entry in enumerate(entries):
        key = entry.get("key") if isinstance(entry, dict) else None
        if not isinstance(key, str) or not key.strip("/"):
            raise DragonsError(
                f"--inventory {shown}: files[{i}] has no 'key': give the report's manifest.json as AWS wrote it"
            )
        uri = f"s3://{dest_bucket}/{key}" if loc.is_s3 else _local_data_path(loc.path, key, shown)
        size = entry.get("size")
        out.append(
            InventoryFile(
                uri=uri,
                file_format=fmt,
                columns=columns,
                source_bucket=source_bucket,
                prefix_key=prefix_key,
                size=size if isinstance(size, int) else 0,
                manifest=manifest_uri,
            )
        )
    return out


def report_time(manifest_uri: str) -> datetime:
    """The report's creationTimestamp (epoch milliseconds, a string) as a UTC datetime."""
    shown = storage.redact(manifest_uri)
    raw = _read_manifest(manifest_uri).get("creationTimestamp")
    try:
        return _EPOCH + timedelta(milliseconds=int(str(raw)))  # exact: no float seconds
    except (TypeError, ValueError, OverflowError, OSError):
        raise DragonsError(
            f"--inventory {shown}: creationTimestamp {raw!r} is not epoch milliseconds; "
            "give the report's manifest.json as AWS wrote it"
        ) from None


# ----------------------------------------------------------------- one data file


def _decode_csv_keys(keys: pa.ChunkedArray | pa.Array) -> pa.Array:
    """CSV inventory keys are URL-encoded (formats.md), the way S3 encodes keys in
    event notifications and ListObjects' encoding-type=url: form encoding, a space
    written '+' and a literal '+' written '%2B'. So '+' always means a space: that
    is also how AWS's own examples read them (Athena's url_decode(key), which
    decodes '+' as a space), and how tools that read inventories had to fix their
    readers (cloud-custodian #1997: "URL-encoded with space encoded as plus").

    Decoding is vectorised where it is a plain substring replacement: '+' -> ' ',
    then the escapes of the usual ASCII punctuation ('%2F' -> '/', '%2B' -> '+',
    ...). That is safe because in an encoded key every '%' begins an escape, so
    a match is always a whole escape, and no replacement brings a '%' in ('%25'
    stays for the last step). Only keys still holding a '%' (a literal '%',
    non-ASCII characters) go through Python's unquote: in one call over the
    keys joined by newlines (a raw newline never appears in an encoded key),
    else key by key. UTF-8; a malformed escape is kept verbatim: its row then
    fails to read, naming the key, rather than failing the night.
    """
    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    arr = pc.replace_substring(arr, "+", " ")
    todo = pc.fill_null(pc.match_substring(arr, "%"), False)
    if not pc.any(todo).as_py():
        return arr
    sub = arr.filter(todo)
    for escape in _COMMON_ESCAPES:
        char = chr(int(escape[1:], 16))
        sub = pc.replace_substring(pc.replace_substring(sub, escape, char), escape.lower(), char)
    left = pc.match_substring(sub, "%")
    if pc.any(left).as_py():
        part = sub.filter(left).to_pylist()
        decoded = unquote("\n".join(part)).split("\n")
        if len(decoded) != len(part):  # a key held an encoded newline (%0A): one by one then
            decoded = [unquote(k) for k in part]
        sub = pc.replace_with_mask(sub, left, pa.array(decoded, pa.string()))
    return pc.replace_with_mask(arr, todo, sub)


# The escapes decoded vectorised (upper and lower case): space and the ASCII
# punctuation that file names use. Everything else goes through unquote.
_COMMON_ESCAPES = (
    "%2F",
    "%2B",
    "%20",
    "%28",
    "%29",
    "%2C",
    "%27",
    "%21",
    "%3D",
    "%26",
    "%40",
    "%3A",
    "%3B",
    "%7E",
    "%24",
    "%5B",
    "%5D",
    "%23",
    "%3F",
)


def _is_true(col: pa.Array) -> pa.Array:
    """Booleans as written: Parquet/ORC booleans, CSV's "true"/"false"; null or empty stays null."""
    if pa.types.is_boolean(col.type):
        return col
    return pc.equal(pc.utf8_lower(_empty_to_null(col)), "true")


def _empty_to_null(col: pa.Array) -> pa.Array:
    # CSV writes a missing value as an empty field (e.g. a delete marker's Size).
    s = pc.utf8_trim_whitespace(col.cast(pa.string()))
    return pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)


def _parsed(col: pa.Array, pattern: str, to: pa.DataType) -> pa.Array:
    """CSV text -> ``to``; a value that does not look right becomes null instead of
    failing the night (a null size or date only means --incremental rescores it)."""
    s = _empty_to_null(col)
    ok = pc.fill_null(pc.match_substring_regex(s, pattern), False)
    return pc.if_else(ok, s, pa.scalar(None, pa.string())).cast(to)


_MTIME = LISTING_SCHEMA.field("last_modified").type
_ISO_RE = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:?\d{2})?$"


def _sizes(col: pa.Array | None, n: int) -> pa.Array:
    if col is None:
        return pa.nulls(n, pa.int64())
    return col.cast(pa.int64()) if pa.types.is_integer(col.type) else _parsed(col, r"^\d{1,19}$", pa.int64())


def _timestamps(col: pa.Array | None, n: int) -> pa.Array:
    if col is None:
        return pa.nulls(n, _MTIME)
    if pa.types.is_timestamp(col.type):
        # Parquet's TIMESTAMP(MILLIS, UTC) or ORC's timestamp (read without a zone: its
        # values are UTC). ns -> us drops sub-microseconds, which S3 never has.
        return col.cast(_MTIME, safe=False)
    if pa.types.is_integer(col.type):  # epoch milliseconds, as some writers store it
        return col.cast(pa.int64()).cast(pa.timestamp("ms", tz="UTC")).cast(_MTIME)
    return _parsed(col, _ISO_RE, _MTIME)  # CSV: ISO 8601, e.g. 2026-12-05T01:02:03.000Z


def _etags(col: pa.Array | None, n: int) -> pa.Array:
    if col is None:
        return pa.nulls(n, pa.string())
    # listing.py strips S3's quotes from ETags: the same object must compare equal
    # (--incremental) whether a night listed it or read it from a report.
    return pc.utf8_trim(_empty_to_null(col), '"')


def _page(batch: pa.RecordBatch | pa.Table, f: InventoryFile) -> pa.Table:
    """One batch of raw inventory rows -> the listing rows it holds (maybe none)."""
    cols: dict[str, Any] = {normalise(n): c for n, c in zip(batch.schema.names, batch.columns)}
    if isinstance(batch, pa.Table):
        cols = {n: c.combine_chunks() for n, c in cols.items()}
    key = _decode_csv_keys(cols[KEY]) if f.file_format == "CSV" else cols[KEY]
    keep = pc.and_(pc.is_valid(key), pc.invert(pc.fill_null(pc.ends_with(key, "/"), True)))
    if f.prefix_key:
        keep = pc.and_(keep, pc.fill_null(pc.starts_with(key, f.prefix_key), False))
    # A report of all versions has a row per version and per delete marker; what a
    # listing returns is each key's latest version that is not a delete marker.
    # A current-versions-only report has no such columns: every row is current.
    if "is_latest" in cols:
        keep = pc.and_(keep, pc.fill_null(_is_true(cols["is_latest"]), True))
    if "is_delete_marker" in cols:
        keep = pc.and_(keep, pc.invert(pc.fill_null(_is_true(cols["is_delete_marker"]), False)))
    key = key.filter(keep)
    n = len(key)
    got = {name: cols[name].filter(keep) for name in ("e_tag", "size", "last_modified_date") if name in cols}
    return pa.Table.from_arrays(
        [
            pc.binary_join_element_wise(f"s3://{f.source_bucket}/", key, ""),
            _etags(got.get("e_tag"), n),
            _sizes(got.get("size"), n),
            _timestamps(got.get("last_modified_date"), n),
        ],
        schema=LISTING_SCHEMA,
    )


def _fail(f: InventoryFile, what: str) -> DragonsError:
    which = f"--inventory {storage.redact(f.manifest)}: data file" if f.manifest else "--inventory data file"
    return DragonsError(f"{which} {storage.redact(f.uri)} {what}")


def _batches(f: InventoryFile, page_rows: int) -> Iterator[pa.RecordBatch | pa.Table]:
    """The file's raw rows, batch by batch, only the columns we use."""
    fs, path = storage.filesystem(f.uri)
    if f.file_format == "CSV":
        wanted = [c for c in f.columns if c in _WANTED]
        # Every column as a string first: sizes, booleans and dates are parsed by
        # _page, so an unexpected value is a null rather than a failed night.
        reader = pcsv.open_csv(
            fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None),
            read_options=pcsv.ReadOptions(column_names=list(f.columns), block_size=CSV_BLOCK),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in f.columns}, include_columns=wanted
            ),
        )
        yield from reader
        return
    if f.file_format == "Parquet":
        pfile = pq.ParquetFile(fs.open_input_file(path))
        present = [n for n in pfile.schema_arrow.names if normalise(n) in _WANTED]
        if KEY not in map(normalise, present):
            raise _fail(f, f"has no 'key' column (columns: {pfile.schema_arrow.names}): is it an S3 Inventory file?")
        yield from pfile.iter_batches(batch_size=max(page_rows, READ_ROWS), columns=present)
        return

    ofile = porc.ORCFile(fs.open_input_file(path))
    present = [n for n in ofile.schema.names if normalise(n) in _WANTED]
    if KEY not in map(normalise, present):
        raise _fail(f, f"has no 'key' column (columns: {ofile.schema.names}): is it an S3 Inventory file?")
    for i in range(ofile.nstripes):  # a stripe is ORC's unit of reading (tens of MB at most)
        yield ofile.read_stripe(i, columns=present)


def read_inventory_file(f: InventoryFile, page_rows: int) -> Iterator[pa.Table]:
    """The file's rows as LISTING_SCHEMA tables of at most page_rows, read batch by
    batch (never the whole file). Keys outside f.prefix_key, delete markers,
    non-latest versions and 'folder' keys ending in '/' are dropped; CSV keys are
    URL-decoded."""
    if page_rows < 1:
        raise ValueError(f"page_rows must be >= 1, got {page_rows}")
    pending: list[pa.Table] = []
    pending_rows = 0
    try:
        for batch in _batches(f, page_rows):
            page = _page(batch, f)
            if not page.num_rows:
                continue
            pending.append(page)
            pending_rows += page.num_rows
            if pending_rows >= page_rows:
                # Full pages out, the remainder waits for the next batch: pages are
                # page_rows long except the file's last.
                table = pa.concat_tables(pending)
                full = (pending_rows // page_rows) * page_rows
                for start in range(0, full, page_rows):
                    yield table.slice(start, page_rows)
                pending = [table.slice(full)] if full < pending_rows else []
                pending_rows -= full
    except DragonsError:
        raise
    except (OSError, pa.ArrowException, EOFError) as exc:
        try:
            missing = not storage.exists(f.uri)  # (a missing bucket raises: the clearer message)
        except DragonsError as why:  # no such bucket, an endpoint down: say so, naming the report
            raise _fail(f, f"cannot be read: {why}") from None
        if missing:
            raise _fail(
                f,
                "does not exist: the report is incomplete or was deleted; give a complete report "
                "(an earlier or later manifest.json)",
            ) from None
        raise _fail(
            f,
            f"is not a readable {f.file_format} inventory file ({storage.short_error(exc)}): "
            "give a report as AWS wrote it",
        ) from None
    if pending_rows:
        yield pa.concat_tables(pending)


# ----------------------------------------------------------------- the whole report


_DONE = object()


class _ReadAhead(threading.Thread):
    """Reads one file's pages into a small queue, so the next file's first pages
    (a fresh S3 connection, a Parquet footer) are ready when the current one ends."""

    def __init__(self, f: InventoryFile, page_rows: int, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="dragons-inventory-read")
        self.f, self.page_rows, self.stop = f, page_rows, stop
        self.pages: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_PAGES)

    def run(self) -> None:
        try:
            for page in read_inventory_file(self.f, self.page_rows):
                if not self._put(page):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, raised there in manifest order)
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.pages.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def inventory_pages(manifest_uri: str, input_uri: str, page_rows: int) -> Iterator[pa.Table]:
    """All files' pages in manifest order, one file after another, with the next
    file already being read on a thread (at most READ_AHEAD_FILES files and
    QUEUE_PAGES pages each in memory). A failed file raises in its place."""
    files = deque(inventory_files(manifest_uri, input_uri))
    stop = threading.Event()
    running: deque[_ReadAhead] = deque()
    try:
        while files or running:
            while files and len(running) < READ_AHEAD_FILES:
                reader = _ReadAhead(files.popleft(), page_rows, stop)
                reader.start()
                running.append(reader)
            current = running[0]
            while True:
                item = current.pages.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            running.popleft()
    finally:
        stop.set()  # a consumer that stopped early (or an error) ends the read-ahead threads
        for reader in running:
            reader.join(timeout=5)
