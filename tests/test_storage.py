from __future__ import annotations

from pathlib import Path

import pytest

from dragons import storage
from dragons.errors import DragonsError


def test_parse_forms(tmp_path: Path) -> None:
    assert storage.parse("s3://b/x/y/").path == "b/x/y"
    assert storage.parse("s3://b").path == "b"
    assert storage.parse(f"file://{tmp_path}").path == str(tmp_path)
    assert storage.parse(str(tmp_path)).scheme == "file"
    assert storage.join("s3://b/x", "m.json") == "s3://b/x/m.json"
    with pytest.raises(DragonsError, match="unsupported URI scheme 'gs'"):
        storage.parse("gs://b/x")
    with pytest.raises(DragonsError, match="no bucket"):
        storage.parse("s3:///x")


@pytest.mark.parametrize("kind", ["local", "file", "s3"])
def test_roundtrip_and_listing(kind: str, tmp_path: Path, bucket: str) -> None:
    root = {"local": str(tmp_path / "r"), "file": f"file://{tmp_path}/r", "s3": f"s3://{bucket}/roundtrip"}[kind]
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"\x00\x01")
    storage.write_bytes(storage.join(root, "b", "y.bin"), b"hello")
    files = storage.list_files(root)
    assert [f.uri.rsplit("/", 2)[-2:] for f in files] == [["a", "x.bin"], ["b", "y.bin"]]
    assert [f.size for f in files] == [2, 5]
    assert storage.read_bytes(files[1].uri) == b"hello"
    assert storage.list_dirs(root) == ["a", "b"]
    storage.delete(storage.join(root, "a"))
    assert [f.uri.rsplit("/", 1)[-1] for f in storage.list_files(root)] == ["y.bin"]


def test_missing_bucket_and_prefix_are_clear(bucket: str) -> None:
    with pytest.raises(DragonsError, match="bucket 'no-such-bucket' does not exist"):
        storage.list_files("s3://no-such-bucket/x")
    with pytest.raises(DragonsError, match="bucket 'no-such-bucket' does not exist"):
        storage.read_bytes("s3://no-such-bucket/x.jpg")
    with pytest.raises(DragonsError, match="does not exist"):
        storage.list_files(f"s3://{bucket}/nothing-here")


def test_secrets_are_redacted(s3: object) -> None:
    import os

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in storage.redact(f"failed with key {secret}")
