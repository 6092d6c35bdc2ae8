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


ODD_KEYS = [
    "odd/photo#1.jpg",
    "odd/what?x=1.jpg",
    "odd/a b.jpg",
    "odd/100%.jpg",
    "odd/c+d.jpg",
    "odd/drăgon-龍.jpg",
    "odd/deep/er/and/deeper/x.jpg",
]


def test_parse_keeps_raw_keys() -> None:
    for key in ODD_KEYS:
        loc = storage.parse(f"s3://b/{key}")
        assert loc.path == f"b/{key}" and loc.uri == f"s3://b/{key}"
    assert storage.parse("/tmp/a#b?c").path == "/tmp/a#b?c"
    assert storage.parse("file:///tmp/a#b").path == "/tmp/a#b"


def test_odd_keys_round_trip_on_s3(bucket: str) -> None:
    root = f"s3://{bucket}/oddkeys"
    for i, key in enumerate(ODD_KEYS):
        storage.write_bytes(f"{root}/{key}", f"object {i}".encode())
    # a decoy: what urlparse would have read for 'photo#1.jpg'
    storage.write_bytes(f"{root}/odd/photo", b"decoy")
    listed = {e.uri: e for e in storage.list_files(root)}
    for i, key in enumerate(ODD_KEYS):
        uri = f"{root}/{key}"
        assert uri in listed, (uri, sorted(listed))
        assert storage.read_bytes(uri) == f"object {i}".encode()
        assert listed[uri].size == len(f"object {i}")
        assert storage.size_of(uri) == len(f"object {i}")
        bucket_name, _, k = storage.parse(uri).path.partition("/")
        assert storage.get_object(storage.boto3_client(), storage.parse(uri)) == f"object {i}".encode()
    assert storage.exists(f"{root}/odd/photo#1.jpg")
    storage.delete(f"{root}/odd/photo#1.jpg")
    assert not storage.exists(f"{root}/odd/photo#1.jpg") and storage.exists(f"{root}/odd/photo")


def test_every_call_on_a_missing_bucket_is_a_dragons_error(bucket: str) -> None:
    for call in (
        lambda: storage.exists("s3://no-such-bucket/x"),
        lambda: storage.delete("s3://no-such-bucket/x"),
        lambda: storage.list_dirs("s3://no-such-bucket/x"),
        lambda: storage.write_bytes("s3://no-such-bucket/x", b"1"),
    ):
        with pytest.raises(DragonsError, match="bucket 'no-such-bucket' does not exist"):
            call()


def test_unreachable_endpoint_is_a_dragons_error_in_seconds(s3: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from dragons.local.s3server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for call in (
        lambda: storage.exists("s3://b/x"),
        lambda: storage.delete("s3://b/x"),
        lambda: storage.list_dirs("s3://b/x"),
        lambda: storage.list_files("s3://b/x"),
        lambda: storage.read_bytes("s3://b/x"),
        lambda: storage.write_bytes("s3://b/x", b"1"),
    ):
        t0 = time.monotonic()
        with pytest.raises(DragonsError, match="cannot reach S3"):
            call()
        # pyarrow's own retries of a refused connection take ~2-5 s; read_bytes
        # once retried them four more times (11-15 s).
        assert time.monotonic() - t0 < 8


def test_pickled_s3_filesystem_holds_no_secret(s3: object) -> None:
    import os
    import pickle

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    fs = storage.s3_filesystem()
    blob = pickle.dumps(fs)
    assert secret.encode() not in blob
    assert os.environ["AWS_ACCESS_KEY_ID"].encode() not in blob
    # ...and the unpickled copy still authenticates (from the environment).
    pickle.loads(blob).get_file_info("dragons-test")


def test_a_listed_key_that_begins_with_a_slash_is_read_as_itself(s3: object) -> None:
    """s3://b//x.jpg (key '/x.jpg') is another object than s3://b/x.jpg: scoring
    must read each row's own bytes, not its neighbour's (parse strips slashes)."""
    from dragons.decode import read_one
    from dragons.score.listing import iter_listing

    client = storage.boto3_client()
    client.create_bucket(Bucket="dragons-slash")
    client.put_object(Bucket="dragons-slash", Key="x.jpg", Body=b"plain key")
    client.put_object(Bucket="dragons-slash", Key="/x.jpg", Body=b"key with a leading slash")
    uris = sorted(u for t in iter_listing("s3://dragons-slash") for u in t.column("uri").to_pylist())
    assert uris == ["s3://dragons-slash//x.jpg", "s3://dragons-slash/x.jpg"]
    assert [read_one(u) for u in uris] == [b"key with a leading slash", b"plain key"]
    assert storage.object_location("s3://dragons-slash//x.jpg").path == "dragons-slash//x.jpg"
    assert storage.object_location("s3://dragons-slash/a/x.jpg") == storage.parse("s3://dragons-slash/a/x.jpg")
    assert (
        storage.parse("s3://dragons-slash//x.jpg").path == "dragons-slash/x.jpg"
    )  # a typed prefix keeps its old meaning


def test_a_local_folder_read_as_an_object_is_a_read_error(tmp_path: Path) -> None:
    """A local read that fails (here: a folder) is the object's read error, not an internal AssertionError."""
    from dragons.storage import ObjectError, read_bytes

    with pytest.raises(ObjectError, match="is a directory") as exc:
        read_bytes(str(tmp_path))
    assert exc.value.kind == "read_error"


def test_a_secret_at_every_cut_position_is_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every place that shortens a message redacts first: a secret straddling the cut
    (the old order left 'secret=wJalrXUtnFEMI/') never shows, whatever the offset."""
    from dragons.decode import row_error
    from dragons.score.pipeline import _pipeline_error

    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)

    def leaks(text: str) -> bool:  # any 6 characters of the secret in a row
        return any(secret[i : i + 6] in text for i in range(len(secret) - 5))

    for limit in (200, 300):
        for at in range(limit - len(secret) - 2, limit + 2):
            msg = "x" * at + f"secret={secret} tail"
            shown = [
                storage.shorten(msg, limit),
                storage.short_error(RuntimeError(msg), limit),
                storage._one_line(RuntimeError(msg), limit),
                row_error(ValueError(msg)),
                str(_pipeline_error("r", RuntimeError(msg))),
            ]
            assert not any(leaks(s) for s in shown), (limit, at, [s[-60:] for s in shown if leaks(s)])


def test_a_run_failure_reason_is_redacted_then_cut_in_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import datetime, timezone

    import pyarrow as pa

    from dragons.score.query import run_sql
    from dragons.score.table import RunWriter

    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    table = str(tmp_path / "t")
    w = RunWriter(table, "r", datetime.now(timezone.utc), ["a", "b"], model_version="v", commit_every=1)
    w.add(
        pa.table(
            {
                "uri": ["s3://x/1.jpg"],
                "label": ["a"],
                "score": [0.9],
                "p_a": [0.9],
                "p_b": [0.1],
                "error": pa.nulls(1, pa.string()),
            }
        )
    )
    w.fail("x" * (500 - 20) + f"secret={secret}")
    failure = run_sql(table, "SELECT failure FROM runs").to_pylist()[0]["failure"]
    assert failure.startswith("xxx") and secret[:6] not in failure


def test_download_dir_refuses_keys_that_leave_the_folder(bucket: str, tmp_path: Path) -> None:
    """An S3 key with '..' parts would be written outside the folder: refused, nothing written."""
    client = storage.boto3_client()
    client.put_object(Bucket=bucket, Key="dl-escape/model.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="dl-escape/a/../../../escaped.txt", Body=b"x")
    dest = tmp_path / "inner" / "model"
    with pytest.raises(DragonsError, match="would be written outside"):
        storage.download_dir(f"s3://{bucket}/dl-escape", dest)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "inner" / "escaped.txt").exists()
    assert not dest.exists() or not any(dest.rglob("*"))
    client.delete_object(Bucket=bucket, Key="dl-escape/a/../../../escaped.txt")
    storage.download_dir(f"s3://{bucket}/dl-escape", dest)
    assert (dest / "model.json").read_bytes() == b"{}"
