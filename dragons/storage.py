"""One way to reach data: local paths, ``file://`` and ``s3://bucket/prefix``.

Everything that reads or writes goes through pyarrow's filesystems, configured
only by the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), so a local moto endpoint and real
AWS go through the same code path. pyarrow does not read ``AWS_ENDPOINT_URL`` in
every version, so we map it ourselves.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dragons.errors import DragonsError

_SCHEMES = ("s3", "file", "")


@dataclass(frozen=True)
class Location:
    """A parsed URI: the filesystem it lives on and the path inside it."""

    uri: str  # normalised: s3://bucket/key or an absolute local path
    scheme: str  # "s3" or "file"
    path: str  # what pyarrow wants: "bucket/key" for S3, "/abs/path" locally

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0] if self.is_s3 else ""


def parse(uri: str) -> Location:
    """Parse a local path, ``file://`` URI or ``s3://bucket/prefix``."""
    uri = str(uri)
    if not uri:
        raise DragonsError("empty path or URI: give a local path, file:// or s3://bucket/prefix")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter, not a scheme
        scheme = ""
    if scheme not in _SCHEMES:
        raise DragonsError(
            f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://bucket/prefix"
        )
    if scheme == "s3":
        if not parsed.netloc:
            raise DragonsError(f"S3 URI {uri!r} has no bucket: write it as s3://bucket/prefix")
        key = parsed.path.strip("/")
        path = f"{parsed.netloc}/{key}" if key else parsed.netloc
        return Location(uri=f"s3://{path}", scheme="s3", path=path)
    local = parsed.path if scheme == "file" else uri
    absolute = os.path.abspath(os.path.expanduser(local))
    return Location(uri=absolute, scheme="file", path=absolute)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    loc = parse(uri)
    if loc.is_s3:
        return "s3://" + posixpath.join(loc.path, *[p.strip("/") for p in parts])
    return os.path.join(loc.path, *parts)


def s3_options() -> dict[str, object]:
    """pyarrow S3FileSystem options from the standard AWS variables."""
    opts: dict[str, object] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        opts["endpoint_override"] = parsed.netloc or parsed.path
        opts["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        opts["access_key"] = key
        opts["secret_key"] = secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    # A missing object should fail at once, not after minutes of retries.
    opts["connect_timeout"] = 5.0
    opts["request_timeout"] = 60.0
    return opts


def s3_filesystem() -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**s3_options())  # type: ignore[arg-type]


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a URI and the path inside it.

    This is also the pair Ray Train's ``RunConfig(storage_filesystem=..)`` wants:
    for S3 that path is ``bucket/key``, not ``s3://bucket/key``.
    """
    loc = parse(uri)
    if loc.is_s3:
        return s3_filesystem(), loc.path
    return pafs.LocalFileSystem(), loc.path


def boto3_client(max_pool_connections: int = 10):  # type: ignore[no-untyped-def]
    """A boto3 S3 client from the same variables (boto3 reads them itself)."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None, config=Config(max_pool_connections=max_pool_connections))


def _check_bucket(fs: pafs.FileSystem, loc: Location) -> None:
    if not loc.is_s3:
        return
    try:
        info = fs.get_file_info(loc.bucket)
    except OSError as exc:
        raise DragonsError(f"cannot reach S3 for {loc.uri}: {_short(exc)}. Check AWS_ENDPOINT_URL and credentials") from None
    if info.type == pafs.FileType.NotFound:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "AWS")
        raise DragonsError(
            f"bucket {loc.bucket!r} does not exist (endpoint {endpoint}) for {loc.uri}: "
            "check the bucket name or create it"
        )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@dataclass(frozen=True)
class FileEntry:
    uri: str
    size: int


def list_files(uri: str) -> list[FileEntry]:
    """Every file under a prefix (recursively), sorted by URI.

    A single file URI lists as itself. A missing bucket or prefix is an error
    that names the input, not an empty list: an empty list silently scores nothing.
    """
    fs, path = filesystem(uri)
    loc = parse(uri)
    _check_bucket(fs, loc)
    try:
        top = fs.get_file_info(path)
        if top.type == pafs.FileType.File:
            return [FileEntry(loc.uri, int(top.size or 0))]
        if top.type == pafs.FileType.NotFound:
            raise DragonsError(f"{loc.uri} does not exist: check the path or prefix")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except DragonsError:
        raise
    except OSError as exc:
        raise DragonsError(f"cannot list {loc.uri}: {_short(exc)}") from None
    prefix = "s3://" if loc.is_s3 else ""
    out = [FileEntry(prefix + i.path, int(i.size or 0)) for i in infos if i.type == pafs.FileType.File]
    return sorted(out, key=lambda e: e.uri)


def list_dirs(uri: str) -> list[str]:
    """Immediate sub-directory names of a prefix, sorted."""
    fs, path = filesystem(uri)
    _check_bucket(fs, parse(uri))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str, fs: pafs.FileSystem | None = None) -> bytes:
    """Read a whole object. Pass ``fs`` when reading many (saves a client per call)."""
    loc = parse(uri)
    if fs is None:
        fs, _ = filesystem(uri)
    try:
        with fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError:
        _check_bucket(fs, loc)
        raise DragonsError(f"{loc.uri} does not exist: check the path") from None
    except OSError as exc:
        if fs is not None and loc.is_s3:
            _check_bucket(fs, loc)
        raise DragonsError(f"cannot read {loc.uri}: {_short(exc)}") from None


def get_object(client: Any, loc: Location) -> bytes:
    """One S3 GET with boto3; errors become DragonsError naming the object."""
    bucket, _, key = loc.path.partition("/")
    try:
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        raise DragonsError(f"cannot read {loc.uri}: {code}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; on S3 one PUT, so readers never see half a file."""
    fs, path = filesystem(uri)
    loc = parse(uri)
    _check_bucket(fs, loc)
    if not loc.is_s3:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a reader sees the old or the new file
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete(uri: str) -> None:
    """Delete a file or a whole prefix; missing is fine."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory tree to a URI (local or S3)."""
    loc = parse(uri)
    if not loc.is_s3:
        shutil.copytree(local_dir, loc.path, dirs_exist_ok=True)
        return
    for p in sorted(Path(local_dir).rglob("*")):
        if p.is_file():
            write_bytes(join(uri, p.relative_to(local_dir).as_posix()), p.read_bytes())


def download_dir(uri: str, local_dir: str | Path) -> None:
    """Copy every file under a URI into a local directory."""
    loc = parse(uri)
    fs, _ = filesystem(uri)
    for entry in list_files(uri):
        rel = entry.uri[len(loc.uri) :].lstrip("/")
        dest = Path(local_dir) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(entry.uri, fs))


def redact(text: str) -> str:
    """Remove secret values from text before it is logged or stored."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
