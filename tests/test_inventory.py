"""dragons.score.inventory: an AWS S3 Inventory report (AWS's exact layout, built by
helpers_inventory) read as listing pages. No Ray; the S3 cases use the session's moto."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from helpers_inventory import ALL_FIELDS, DEFAULT_MTIME, Obj, marker, write_inventory

from dragons import storage
from dragons.errors import DragonsError
from dragons.score import inventory as inv
from dragons.score.schema import LISTING_SCHEMA

SRC = "photo-archive"  # the inventoried bucket: never read, only named in rows
FORMATS = ["Parquet", "CSV"]
try:
    importlib.import_module("pyarrow.orc")
    FORMATS.append("ORC")
except ImportError:  # pyarrow built without ORC: ORC reports are then read nowhere
    pass

# A versioned bucket's report: what a listing of s3://photo-archive/photos returns
# is exactly KEPT; everything else must be dropped, each for its reason.
VERSIONED = [
    Obj("photos/a.jpg", 10, "etag-a-new", version_id="v2"),
    Obj("photos/a.jpg", 9, "etag-a-old", version_id="v1", is_latest=False),  # an older version
    marker("photos/deleted.jpg", "v3"),  # deleted: the marker is latest...
    Obj("photos/deleted.jpg", 5, "etag-d", version_id="v2", is_latest=False),  # ...its last version is not
    Obj("photos/sub/b.png", 20, '"etag-b"', version_id="v1"),  # S3's quotes are stripped, as listing does
    Obj("photos/sub/", 0, "etag-folder", version_id="v1"),  # a console "folder" object
    Obj("photos2/c.jpg", 30, "etag-c", version_id="v1"),  # beside the prefix, not under it
    Obj("other/d.jpg", 40, "etag-d2", version_id="v1"),  # outside --input
    Obj("photos/e.jpg", 50, "etag-e", version_id="null"),  # written before versioning was on
]
KEPT = {f"s3://{SRC}/photos/a.jpg", f"s3://{SRC}/photos/sub/b.png", f"s3://{SRC}/photos/e.jpg"}

# Keys that URL encoding changes (CSV) or that a URI parser would cut: all kept verbatim.
ODD_KEYS = [
    "photos/two words.jpg",
    "photos/a+b.jpg",
    "photos/100%.jpg",
    "photos/%41 literal.jpg",
    "photos/x#1?.jpg",
    "photos/drachen/Ünïcødé 龍.jpg",
    "photos/plus+ and space.jpg",
    "photos/semi;colon,comma&amp=.jpg",
    "photos/emoji 🐉.png",
    "photos/tilde~(1)'.jpg",
]


def _rows(manifest: str, input_uri: str = f"s3://{SRC}/photos", page_rows: int = 1000) -> list[dict]:
    pages = list(inv.inventory_pages(manifest, input_uri, page_rows))
    for page in pages:
        assert page.schema == LISTING_SCHEMA
        assert 0 < page.num_rows <= page_rows
    return [r for page in pages for r in page.to_pylist()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_versioned_report_keeps_what_a_listing_would(fmt: str, tmp_path: Path) -> None:
    manifest = write_inventory(tmp_path, SRC, VERSIONED, fmt, files=2)
    rows = _rows(manifest)
    assert {r["uri"] for r in rows} == KEPT
    assert len(rows) == len(KEPT)
    by_uri = {r["uri"]: r for r in rows}
    a = by_uri[f"s3://{SRC}/photos/a.jpg"]
    assert (a["etag"], a["size"], a["last_modified"]) == ("etag-a-new", 10, DEFAULT_MTIME)
    assert by_uri[f"s3://{SRC}/photos/sub/b.png"]["etag"] == "etag-b"
    # The whole bucket: only the prefix filter goes; the rest is still dropped.
    assert {r["uri"] for r in _rows(manifest, f"s3://{SRC}")} == KEPT | {
        f"s3://{SRC}/photos2/c.jpg",
        f"s3://{SRC}/other/d.jpg",
    }
    assert {r["uri"] for r in _rows(manifest, f"s3://{SRC}/photos/sub/")} == {f"s3://{SRC}/photos/sub/b.png"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_current_versions_report_without_optional_fields(fmt: str, tmp_path: Path) -> None:
    """Only Bucket and Key (the required fields): no version columns, so every row is
    current; size, ETag and last-modified are null, not an error."""
    manifest = write_inventory(
        tmp_path, SRC, ["photos/a.jpg", "photos/b.jpg", "else/c.jpg"], fmt, fields=("Bucket", "Key")
    )
    rows = _rows(manifest)
    assert rows == [
        {"uri": f"s3://{SRC}/photos/{n}", "etag": None, "size": None, "last_modified": None} for n in ("a.jpg", "b.jpg")
    ]


@pytest.mark.parametrize(("fmt", "encode_slash"), [(f, False) for f in FORMATS] + [("CSV", True)])
def test_odd_keys_are_exact(fmt: str, encode_slash: bool, tmp_path: Path) -> None:
    """CSV keys are URL-encoded (a space as '+', a '+' as %2B, '/' escaped or not);
    Parquet/ORC keys are raw. Either way the row's URI is the key verbatim."""
    objs = [Obj(k, i, f"e{i}") for i, k in enumerate(ODD_KEYS)] + [Obj("elsewhere/two words.jpg")]
    manifest = write_inventory(tmp_path, SRC, objs, fmt, encode_slash=encode_slash)
    if fmt == "CSV":  # the file really holds encoded keys
        import gzip

        f = inv.inventory_files(manifest, f"s3://{SRC}")[0]
        text = gzip.decompress(Path(f.uri).read_bytes()).decode()
        assert "two+words.jpg" in text and "a%2Bb.jpg" in text and "100%25.jpg" in text
        assert ("photos%2Fa%2Bb" in text) == encode_slash
    rows = _rows(manifest)
    assert sorted(r["uri"] for r in rows) == sorted(f"s3://{SRC}/{k}" for k in ODD_KEYS)
    assert {r["uri"]: r["size"] for r in rows} == {f"s3://{SRC}/{k}": i for i, k in enumerate(ODD_KEYS)}


def test_csv_key_decoding_rules() -> None:
    keys = pa.array(
        [
            "a+b",
            "a%2Bb",
            "a%20b",
            "a%2Fb%2fc",
            "100%25",
            "%252F",
            "%E9%BE%8D",
            "plain/key.jpg",
            None,
            "bad%zz",
            "%28x%29%2c%3d",
        ]
    )
    assert inv._decode_csv_keys(keys).to_pylist() == [
        "a b",
        "a+b",
        "a b",
        "a/b/c",
        "100%",
        "%2F",
        "龍",
        "plain/key.jpg",
        None,
        "bad%zz",
        "(x),=",
    ]
    # An encoded newline: the one-call decode cannot split it back, key by key does.
    assert inv._decode_csv_keys(pa.array(["new%0Aline+1", "%C3%BC"])).to_pylist() == ["new\nline 1", "ü"]


def test_csv_values_in_quotes_and_sizes(tmp_path: Path) -> None:
    """Sizes, booleans and dates come as text in CSV; odd values become nulls, not a failed night."""
    manifest = write_inventory(tmp_path, SRC, [Obj("photos/a.jpg", 7, "e")], "CSV")
    f = inv.inventory_files(manifest, f"s3://{SRC}")[0]
    import gzip

    Path(f.uri).write_bytes(
        gzip.compress(
            b'"photo-archive","photos/a.jpg","v1","TRUE","False","12","2026-12-04T23:05:07.000Z","x","STANDARD"\n'
            b'"photo-archive","photos/b.jpg","v1","true","false","n/a","yesterday","","STANDARD"\n'
            b'"photo-archive","photos/c.jpg","v1","","","","","","STANDARD"\n'
        )
    )
    (page,) = inv.read_inventory_file(f, 10)
    rows = page.to_pylist()
    assert rows == [
        {
            "uri": f"s3://{SRC}/photos/a.jpg",
            "etag": "x",
            "size": 12,
            "last_modified": datetime(2026, 12, 4, 23, 5, 7, tzinfo=UTC),
        },
        {"uri": f"s3://{SRC}/photos/b.jpg", "etag": None, "size": None, "last_modified": None},
        {"uri": f"s3://{SRC}/photos/c.jpg", "etag": None, "size": None, "last_modified": None},
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_pages_are_bounded_and_in_manifest_order(fmt: str, tmp_path: Path) -> None:
    objs = [Obj(f"photos/{i:03d}.jpg", i) for i in range(47)] + [Obj(f"other/{i}.jpg") for i in range(9)]
    manifest = write_inventory(tmp_path, SRC, objs, fmt, files=3)
    files = inv.inventory_files(manifest, f"s3://{SRC}/photos")
    assert len(files) == 3 and all(f.size > 0 and f.file_format == fmt for f in files)
    expected: list[str] = []
    for f in files:
        pages = list(inv.read_inventory_file(f, 4))
        sizes = [p.num_rows for p in pages]
        assert len(pages) >= 4 and all(s == 4 for s in sizes[:-1]) and 0 < sizes[-1] <= 4  # only the last is short
        expected += [u for p in pages for u in p.column("uri").to_pylist()]
    rows = _rows(manifest, page_rows=4)
    assert [r["uri"] for r in rows] == expected  # file after file, as the manifest lists them
    assert sorted(expected) == [f"s3://{SRC}/photos/{i:03d}.jpg" for i in range(47)]


def test_early_stop_ends_the_read_ahead(tmp_path: Path) -> None:
    manifest = write_inventory(tmp_path, SRC, [Obj(f"photos/{i}.jpg") for i in range(60)], files=5)
    before = threading.active_count()
    pages = inv.inventory_pages(manifest, f"s3://{SRC}", 2)
    assert next(pages).num_rows == 2
    pages.close()
    assert threading.active_count() == before


def test_picklable_for_ray_tasks(tmp_path: Path) -> None:
    manifest = write_inventory(tmp_path, SRC, VERSIONED, "CSV")
    f = inv.inventory_files(manifest, f"s3://{SRC}/photos")[0]
    assert pickle.loads(pickle.dumps(f)) == f
    assert (
        f.prefix_key == "photos/"
        and f.source_bucket == SRC
        and f.columns
        == (
            "bucket",
            "key",
            "version_id",
            "is_latest",
            "is_delete_marker",
            "size",
            "last_modified_date",
            "e_tag",
            "storage_class",
        )
    )


def test_report_time(tmp_path: Path) -> None:
    created = datetime(2026, 12, 6, 2, 17, 31, 250000, tzinfo=UTC)
    manifest = write_inventory(tmp_path, SRC, ["photos/a.jpg"], created=created)
    assert inv.report_time(manifest) == created
    bad = write_inventory(tmp_path / "bad", SRC, ["photos/a.jpg"], manifest_extra={"creationTimestamp": "yesterday"})
    with pytest.raises(DragonsError, match="creationTimestamp 'yesterday' is not epoch milliseconds"):
        inv.report_time(bad)


# ----------------------------------------------------------------- where the data files are


@pytest.mark.parametrize("prefix", ["", "inventory", "reports/daily/inv"])
def test_local_copy_of_the_whole_bucket(prefix: str, tmp_path: Path) -> None:
    """A copy of the destination bucket (aws s3 sync s3://dest <folder>): the key resolves
    against the folder standing for the bucket's root, found from the manifest's own path."""
    root = tmp_path / "copy of dest"
    manifest = write_inventory(root, SRC, VERSIONED, prefix=prefix, config_id="cfg-1")
    files = inv.inventory_files(manifest, f"s3://{SRC}/photos")
    assert [os.path.dirname(f.uri) for f in files] == [str(root / prefix / SRC / "cfg-1" / "data")]
    assert {r["uri"] for r in _rows(manifest)} == KEPT
    # file:// works the same
    assert {r["uri"] for r in _rows(f"file://{manifest}")} == KEPT


def test_local_copy_of_the_destination_prefix_only(tmp_path: Path) -> None:
    """aws s3 sync s3://dest/reports/daily <folder>: only <source-bucket>/<config-id> line up."""
    manifest = write_inventory(tmp_path / "whole", SRC, VERSIONED, prefix="reports/daily", config_id="cfg")
    shutil.copytree(tmp_path / "whole" / "reports" / "daily", tmp_path / "mine")
    moved = str(tmp_path / "mine" / Path(manifest).relative_to(tmp_path / "whole" / "reports" / "daily"))
    assert {r["uri"] for r in _rows(moved)} == KEPT
    assert all(f.uri.startswith(str(tmp_path / "mine")) for f in inv.inventory_files(moved, f"s3://{SRC}"))


def test_local_copy_out_of_layout_is_an_error(tmp_path: Path) -> None:
    manifest = Path(write_inventory(tmp_path / "whole", SRC, VERSIONED, config_id="cfg"))
    flat = tmp_path / "flat" / "manifest.json"
    flat.parent.mkdir()
    shutil.copy(manifest, flat)
    with pytest.raises(
        DragonsError,
        match=r"--inventory .*flat/manifest.json: data file key .* keep the report's "
        "layout",
    ):
        inv.inventory_files(str(flat), f"s3://{SRC}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_report_on_s3(fmt: str, bucket: str) -> None:
    """On S3 the data file is s3://<destinationBucket from its ARN>/<key>."""
    prefix = f"inv-{uuid.uuid4().hex[:8]}"
    manifest = write_inventory(f"s3://{bucket}", SRC, VERSIONED, fmt, prefix=prefix, files=2)
    assert manifest.startswith(f"s3://{bucket}/{prefix}/{SRC}/daily-scoring/2026-12-05T01-00Z/")
    files = inv.inventory_files(manifest, f"s3://{SRC}/photos")
    assert all(f.uri.startswith(f"s3://{bucket}/{prefix}/{SRC}/daily-scoring/data/") for f in files)
    assert {r["uri"] for r in _rows(manifest)} == KEPT
    assert {r["uri"] for r in _rows(manifest, page_rows=1)} == KEPT


def test_missing_data_file_on_s3(bucket: str) -> None:
    manifest = write_inventory(f"s3://{bucket}", SRC, VERSIONED, prefix=f"inv-{uuid.uuid4().hex[:8]}", files=2)
    files = inv.inventory_files(manifest, f"s3://{SRC}")
    storage.delete(files[1].uri)
    pages = inv.inventory_pages(manifest, f"s3://{SRC}", 1000)
    first = next(pages)  # the first file is still read...
    assert first.num_rows > 0
    with pytest.raises(DragonsError) as err:  # ...then the second's absence stops the read, naming it
        list(pages)
    msg = str(err.value)
    assert msg.startswith(f"--inventory {manifest}: data file {files[1].uri} does not exist")
    assert "complete report" in msg and "dragons-local-secret" not in msg


def test_destination_bucket_gone(bucket: str) -> None:
    manifest = write_inventory(
        f"s3://{bucket}", SRC, ["photos/a.jpg"], prefix=f"inv-{uuid.uuid4().hex[:8]}", manifest_extra={}
    )
    doc = json.loads(storage.read_bytes(manifest))
    doc["destinationBucket"] = "arn:aws:s3:::no-such-dest-bucket"
    storage.write_bytes(manifest, json.dumps(doc).encode())
    with pytest.raises(
        DragonsError,
        match=r"--inventory .* data file s3://no-such-dest-bucket/.* "
        r"bucket 'no-such-dest-bucket' does not exist",
    ):
        _rows(manifest)


# ----------------------------------------------------------------- errors


def test_input_must_be_in_the_source_bucket(tmp_path: Path) -> None:
    manifest = write_inventory(tmp_path, SRC, VERSIONED)
    for bad in ("s3://another-bucket/photos", str(tmp_path / "photos")):
        with pytest.raises(DragonsError) as err:
            inv.inventory_files(manifest, bad)
        msg = str(err.value)
        assert f"--input {storage.parse(bad).uri}" in msg and f"--inventory {manifest}" in msg
        assert f"sourceBucket '{SRC}'" in msg and f"give --input s3://{SRC}[/prefix]" in msg
    with pytest.raises(DragonsError, match=rf"--inventory .* lists bucket '{SRC}': give --input s3://{SRC}"):
        inv.inventory_files(manifest, "")


def test_missing_or_unreadable_manifest(tmp_path: Path, bucket: str) -> None:
    for missing in (str(tmp_path / "nope" / "manifest.json"), f"s3://{bucket}/nope/manifest.json"):
        with pytest.raises(DragonsError, match=rf"^--inventory {missing} does not exist: give the manifest.json"):
            inv.inventory_files(missing, f"s3://{SRC}")
    with pytest.raises(DragonsError, match=r"--inventory .* is a folder: give the manifest.json"):
        inv.inventory_files(str(tmp_path), f"s3://{SRC}")
    with pytest.raises(
        DragonsError,
        match=r"^--inventory s3://no-such-bucket/m/manifest.json cannot be read: "
        "bucket 'no-such-bucket' does not exist",
    ):
        inv.inventory_files("s3://no-such-bucket/m/manifest.json", f"s3://{SRC}")
    not_json = tmp_path / "manifest.json"
    not_json.write_text("<html>AccessDenied</html>")
    with pytest.raises(DragonsError, match=r"--inventory .*manifest.json is not JSON \(line 1 column 1\): give"):
        inv.inventory_files(str(not_json), f"s3://{SRC}")
    not_json.write_text("[1, 2]")
    with pytest.raises(DragonsError, match="is JSON but not an object"):
        inv.inventory_files(str(not_json), f"s3://{SRC}")


@pytest.mark.parametrize("field", ["sourceBucket", "destinationBucket", "fileFormat", "files"])
def test_manifest_missing_fields(field: str, tmp_path: Path) -> None:
    manifest = write_inventory(tmp_path, SRC, VERSIONED, manifest_extra={field: None})
    with pytest.raises(DragonsError, match=rf"^--inventory {manifest}: manifest.json has no valid '{field}' field"):
        inv.inventory_files(manifest, f"s3://{SRC}")


def test_manifest_bad_values(tmp_path: Path) -> None:
    def check(extra: dict, pattern: str, fmt: str = "Parquet") -> None:
        manifest = write_inventory(tmp_path / uuid.uuid4().hex, SRC, VERSIONED, fmt, manifest_extra=extra)
        with pytest.raises(DragonsError, match=rf"^--inventory {manifest}: {pattern}"):
            inv.inventory_files(manifest, f"s3://{SRC}")

    check({"fileFormat": "JSON"}, "fileFormat 'JSON' is not one of CSV, ORC, Parquet")
    check({"fileSchema": None}, "manifest.json has no valid 'fileSchema' field", "CSV")
    check({"fileSchema": "Bucket, Size, ETag"}, "fileSchema 'Bucket, Size, ETag' has no Key field", "CSV")
    check({"destinationBucket": "inventory-dest"}, r"destinationBucket 'inventory-dest' is not an S3 bucket ARN")
    check({"files": [{"size": 3}]}, r"files\[0\] has no 'key'")
    check({"sourceBucket": ""}, "manifest.json has no valid 'sourceBucket' field")
    # A format's name in another case is still that format.
    manifest = write_inventory(tmp_path / "lower", SRC, VERSIONED, "CSV", manifest_extra={"fileFormat": "csv"})
    assert {r["uri"] for r in _rows(manifest)} == KEPT


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_and_unreadable_data_files(fmt: str, tmp_path: Path) -> None:
    manifest = write_inventory(tmp_path, SRC, VERSIONED, fmt, files=2)
    files = inv.inventory_files(manifest, f"s3://{SRC}")
    os.remove(files[0].uri)
    with pytest.raises(
        DragonsError,
        match=rf"^--inventory {manifest}: data file {files[0].uri} does not exist: "
        "the report is incomplete",
    ):
        list(inv.read_inventory_file(files[0], 100))
    Path(files[1].uri).write_bytes(b"not an inventory file at all" * 10)
    with pytest.raises(
        DragonsError,
        match=rf"^--inventory {manifest}: data file {files[1].uri} is not a readable "
        f"{fmt} inventory file .*give a report as AWS wrote it",
    ):
        list(inv.read_inventory_file(files[1], 100))


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "CSV"])
def test_data_file_without_key_column(fmt: str, tmp_path: Path) -> None:
    manifest = write_inventory(tmp_path, SRC, VERSIONED, fmt, fields=("Bucket", "Size", "ETag"))
    with pytest.raises(
        DragonsError,
        match=rf"^--inventory {manifest}: data file .* has no 'key' column "
        r"\(columns: \['bucket', 'size', 'e_tag'\]\)",
    ):
        _rows(manifest)


def test_no_secret_in_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    folder = tmp_path / "s3cr3t-value-xyz"
    manifest = write_inventory(folder, SRC, VERSIONED, files=1)
    os.remove(inv.inventory_files(manifest, f"s3://{SRC}")[0].uri)
    for call in (
        lambda: inv.inventory_files(str(folder / "x" / "manifest.json"), f"s3://{SRC}"),
        lambda: inv.inventory_files(manifest, "s3://other"),
        lambda: _rows(manifest),
    ):
        with pytest.raises(DragonsError) as err:
            call()
        assert "s3cr3t-value-xyz" not in str(err.value) and "***" in str(err.value)


def test_all_fields_listed() -> None:
    # The helper writes every field the reader uses, in AWS's names.
    assert {inv.normalise(f) for f in ALL_FIELDS} >= set(inv._WANTED)
    assert [inv.normalise(n) for n in ("ETag", "LastModifiedDate", "IsDeleteMarker", "VersionId", "e_tag", " Key")] == [
        "e_tag",
        "last_modified_date",
        "is_delete_marker",
        "version_id",
        "e_tag",
        "key",
    ]
