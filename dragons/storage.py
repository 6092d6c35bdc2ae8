"""One way to reach data: local paths, ``file://`` and ``s3://bucket/prefix``.

Everything that reads or writes goes through pyarrow's filesystems, configured
only by the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), so a local moto endpoint and real
AWS go through the same code path. pyarrow does not read ``AWS_ENDPOINT_URL`` in
every version, so we map it ourselves.

An empty ``AWS_*`` variable means *unset*, for every library: see
:func:`drop_empty_aws_env`, which every entry point calls first.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import random
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dragons.errors import DragonsError
from dragons.rowerrors import ErrorKind

_SCHEMES = ("s3", "file", "")


# ----------------------------------------------------------------- AWS_* variables


def aws_env(name: str) -> str | None:
    """The value of an ``AWS_*`` variable, or None when it is unset *or blank*.

    Env files, Kubernetes Secrets (an ``AWS_ENDPOINT_URL`` key left empty for real
    AWS) and Ray's ``${VAR}`` expansion in a runtime_env (an unresolved name
    becomes ``""``) all write "not set" as an empty string.
    """
    value = os.environ.get(name)
    return value if value is not None and value.strip() else None


def drop_empty_aws_env() -> list[str]:
    """Delete every ``AWS_*`` variable whose value is empty or blank; returns their names.

    pyarrow and boto3 read ``AWS_ENDPOINT_URL=""`` as "no endpoint" (real AWS),
    but delta-rs reads the process environment itself and takes it as an
    endpoint URL: its object store panics (``RelativeUrlWithoutBase``, then
    ``TokioMultiThreadExecutor has crashed``) at the first table access. Deleting
    the variable from ``os.environ`` also unsets it in the C environment that
    Rust reads, and in every child process started afterwards (an embedded
    Ray's workers inherit the driver's environment at ``ray.init``). So this
    runs first in every entry point: ``dragons`` (``dragons.cli.main``), the
    ``jobs/*.py`` Ray job entry points, and ``raycluster.ensure_ray`` before
    ``ray.init``. Idempotent and cheap.
    """
    names = sorted(k for k, v in os.environ.items() if k.startswith("AWS_") and not v.strip())
    for name in names:
        del os.environ[name]
    return names


# delta-rs needs a region where pyarrow and boto3 would ask the endpoint or the default chain.
DEFAULT_REGION = "us-east-1"


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment (None: real AWS S3)."""
    return aws_env("AWS_ENDPOINT_URL_S3") or aws_env("AWS_ENDPOINT_URL")


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


# scheme://rest. Parsed by hand, not with urlparse: an S3 key is raw bytes, and
# urlparse cuts it at '#' or '?' (s3://b/photo#1.jpg would read s3://b/photo).
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://(.*)$", re.S)


def parse(uri: str) -> Location:
    """Parse a local path, ``file://`` URI or ``s3://bucket/prefix``.

    Everything after the bucket is the key, verbatim: '#', '?', '%', '+',
    spaces and unicode are part of it (no percent-decoding, no fragments).
    """
    uri = str(uri)
    if not uri:
        raise DragonsError("empty path or URI: give a local path, file:// or s3://bucket/prefix")
    m = _SCHEME_RE.match(uri)
    scheme, rest = (m.group(1).lower(), m.group(2)) if m else ("", uri)
    if scheme not in _SCHEMES:
        raise DragonsError(
            f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://bucket/prefix"
        )
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise DragonsError(f"S3 URI {uri!r} has no bucket: write it as s3://bucket/prefix")
        key = key.strip("/")
        path = f"{bucket}/{key}" if key else bucket
        return Location(uri=f"s3://{path}", scheme="s3", path=path)
    local = rest if scheme == "file" else uri
    absolute = os.path.abspath(os.path.expanduser(local))
    return Location(uri=absolute, scheme="file", path=absolute)


def object_location(uri: str) -> Location:
    """A listed object's URI with its S3 key verbatim.

    ``parse`` strips slashes at both ends of a key, as a prefix wants; but an S3
    key may itself begin with '/': ``s3://b//x.jpg`` (key ``/x.jpg``) is another
    object than ``s3://b/x.jpg``, and stripping would read the wrong one. Only for
    boto3 calls: pyarrow refuses a path with an empty component.
    """
    loc = parse(uri)
    m = _SCHEME_RE.match(str(uri))
    if not loc.is_s3 or m is None:
        return loc
    bucket, _, key = m.group(2).partition("/")
    if not key.startswith("/"):
        return loc
    path = f"{bucket}/{key}"
    return Location(uri=f"s3://{path}", scheme="s3", path=path)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    loc = parse(uri)
    if loc.is_s3:
        return "s3://" + posixpath.join(loc.path, *[p.strip("/") for p in parts])
    return os.path.join(loc.path, *parts)


# Attempts per S3 request (first try included) for pyarrow and boto3 alike:
# S3 answers 503 SlowDown / 500 now and then and expects clients to back off.
S3_MAX_ATTEMPTS = 4  # pyarrow's backoff makes a 5th attempt cost ~10 s more


def s3_options() -> dict[str, object]:
    """pyarrow S3FileSystem options from the standard AWS variables.

    Credentials are deliberately *not* passed: pyarrow then uses the AWS default
    chain (env vars, profile, instance role) in whichever process uses it, and a
    pickled S3FileSystem (Ray Train's ``storage_filesystem`` travels to every
    worker and into ``trainer.pkl``) carries no key or secret.
    """
    opts: dict[str, object] = {}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        opts["endpoint_override"] = parsed.netloc or parsed.path
        opts["scheme"] = parsed.scheme or "https"
    region = aws_env("AWS_REGION") or aws_env("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    # A missing object should fail at once, not after minutes of retries; an
    # unreachable endpoint within seconds.
    opts["connect_timeout"] = 5.0
    opts["request_timeout"] = 60.0
    opts["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)
    return opts


def delta_options(uri: str) -> dict[str, str]:
    """delta-rs object-store options from the same variables as ``s3_options`` (blank = unset).

    delta-rs is handed the credentials (it does not read the default chain the way
    pyarrow does): the one place they are read for it; never log or store the result.
    """
    if not parse(uri).is_s3:
        return {}
    opts = {
        var: value
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
        if (value := aws_env(var))
    }
    opts["AWS_REGION"] = aws_env("AWS_REGION") or aws_env("AWS_DEFAULT_REGION") or DEFAULT_REGION
    endpoint = s3_endpoint()
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    # Commits are put-if-absent on the _delta_log entry: safe concurrent writers
    # without a DynamoDB lock (AWS S3 and moto support conditional puts).
    opts["conditional_put"] = "etag"
    return opts


def s3_filesystem() -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**s3_options())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a URI and the path inside it.

    This is also the pair Ray Train's ``RunConfig(storage_filesystem=..)`` wants:
    for S3 that path is ``bucket/key``, not ``s3://bucket/key``.
    """
    loc = parse(uri)
    if loc.is_s3:
        return s3_filesystem(), loc.path
    return pafs.LocalFileSystem(), loc.path


def boto3_client(max_pool_connections: int = 10) -> Any:
    """A boto3 S3 client from the same variables (boto3 reads them itself)."""
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint()
    # "standard" retries back off with jitter on 5xx, SlowDown and connection
    # errors; short timeouts make an unreachable endpoint an error in seconds.
    config = Config(
        max_pool_connections=max_pool_connections,
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


def _check_bucket(fs: pafs.FileSystem, loc: Location) -> None:
    if not loc.is_s3:
        return
    try:
        info = fs.get_file_info(loc.bucket)
    except OSError as exc:
        raise unreachable(loc, exc) from None
    if info.type == pafs.FileType.NotFound:
        endpoint = s3_endpoint() or "AWS"
        raise DragonsError(
            f"bucket {loc.bucket!r} does not exist (endpoint {endpoint}) for {loc.uri}: "
            "check the bucket name or create it"
        )


def unreachable(loc: Location, exc: BaseException) -> DragonsError:
    endpoint = s3_endpoint() or "AWS S3"
    return DragonsError(
        f"cannot reach S3 ({endpoint}) for {loc.uri}: {short_error(exc)}. "
        "Check that the endpoint is up, AWS_ENDPOINT_URL and the credentials"
    )


def shorten(text: str, limit: int = 300) -> str:
    """``text`` for a message, a log line or a table: secrets redacted, then cut to ``limit``.
    In that order: a secret cut first could straddle the cut, and its head no longer matches."""
    return redact(text)[:limit]


def short_error(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line for a message: its first line, secrets redacted, cut."""
    text = str(exc).strip().splitlines()
    return shorten(text[0], limit) if text else type(exc).__name__


# S3 error codes (botocore's ``response["Error"]["Code"]``) by what they mean to us.
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NoSuchBucket"})
DENIED_CODES = frozenset({"AccessDenied", "403", "AllAccessDisabled"})
UNREACHABLE_CODES = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"}
)


def s3_error_code(exc: BaseException) -> str:
    """The S3 error code of a boto3 exception, else the exception's class name."""
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__))


def s3_error_kind(code: str) -> ErrorKind:
    """An S3 error code as a row's error kind: not_found, access_denied or read_error."""
    if code in NOT_FOUND_CODES:
        return ErrorKind.NOT_FOUND
    return ErrorKind.ACCESS_DENIED if code in DENIED_CODES else ErrorKind.READ_ERROR


# ----------------------------------------------------------------- delta-rs failures

# delta-rs' messages are chains of lines, coloured with ANSI escapes ("Kernel error
# -> Generic S3 error / ↳ Error performing GET ... after 10 retries").
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def is_delta_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is delta-rs (or its object store) failing, rather than a bug.

    delta-rs reports storage trouble in several shapes: ``OSError``, its own
    ``DeltaError`` family (``deltalake.exceptions``, defined in the Rust module
    ``_internal``), a bare ``Exception("Generic S3 error ...")``, or pyo3's
    ``PanicException`` for a Rust panic, which derives from ``BaseException``
    (so ``except Exception`` misses it). KeyboardInterrupt, SystemExit and
    ordinary Python errors (TypeError, ...) are not delta failures: they keep
    their meaning and their traceback.
    """
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        return False
    if isinstance(exc, OSError) or type(exc).__name__ == "PanicException":
        return True
    module = type(exc).__module__ or ""
    if module == "_internal" or module.startswith("deltalake"):
        return True
    text = str(exc)
    return type(exc) in (Exception, RuntimeError) and any(
        s in text for s in ("Generic S3 error", "Generic DeltaTable error", "object_store", "panicked")
    )


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A multi-line, coloured delta-rs message as one redacted line."""
    text = " ".join(_ANSI_RE.sub("", str(exc)).replace("↳", " ").split())
    return shorten(text, limit) if text else type(exc).__name__


def delta_failure(uri: str, exc: BaseException, what: str = "read") -> DragonsError:
    """A clean ``error:`` for delta-rs failing on the table at ``uri`` (``what``: read, open, write...).

    pyarrow is asked about the same location first: an unreachable endpoint, a
    missing bucket or denied access is then named as such (with what to check),
    as for every other input. A Rust panic says which variables to check: the
    known one came from ``AWS_ENDPOINT_URL=""``.
    """
    if isinstance(exc, DragonsError):
        return exc
    try:
        exists(uri)
    except DragonsError as clearer:
        return clearer
    detail = _one_line(exc)
    if type(exc).__name__ == "PanicException" or "panicked" in detail:
        return DragonsError(
            f"cannot {what} the table at {uri}: delta-rs crashed ({detail}); check the AWS_* "
            "variables (AWS_ENDPOINT_URL, AWS_REGION, credentials): unset, not empty, where not needed"
        )
    return DragonsError(f"cannot {what} the table at {uri}: {detail}")


@contextlib.contextmanager
def delta_errors(uri: str, what: str = "read") -> Iterator[None]:
    """Inside, a delta-rs failure (:func:`is_delta_failure`) becomes a DragonsError
    naming the table; anything else passes through unchanged."""
    try:
        yield
    except DragonsError:
        raise
    except BaseException as exc:
        if not is_delta_failure(exc):
            raise
        raise delta_failure(uri, exc, what) from None


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
        raise _fail(fs, loc, "list", exc) from None
    prefix = "s3://" if loc.is_s3 else ""
    out = [FileEntry(prefix + i.path, int(i.size or 0)) for i in infos if i.type == pafs.FileType.File]
    return sorted(out, key=lambda e: e.uri)


def _fail(fs: pafs.FileSystem, loc: Location, what: str, exc: OSError) -> DragonsError:
    """A DragonsError for a failed filesystem call: a missing bucket or an
    unreachable endpoint is named as such, anything else with its first line."""
    if loc.is_s3 and "NETWORK_CONNECTION" in str(exc):
        raise unreachable(loc, exc)  # asking again about the bucket would only wait out the retries again
    if loc.is_s3:
        _check_bucket(fs, loc)  # raises the clearer message when that is the cause
    if isinstance(exc, PermissionError) or "ACCESS_DENIED" in str(exc).upper() or "ACCESSDENIED" in str(exc).upper():
        return DragonsError(f"access denied: cannot {what} {loc.uri}: check the credentials' permissions on it")
    return DragonsError(f"cannot {what} {loc.uri}: {short_error(exc)}")


def _info(uri: str, what: str) -> tuple[pafs.FileSystem, Location, pafs.FileInfo]:
    fs, path = filesystem(uri)
    loc = parse(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise _fail(fs, loc, what, exc) from None
    if info.type == pafs.FileType.NotFound:
        _check_bucket(fs, loc)  # "not there" must not hide "no such bucket"
    return fs, loc, info


def list_dirs(uri: str) -> list[str]:
    """Immediate sub-directory names of a prefix, sorted."""
    fs, path = filesystem(uri)
    loc = parse(uri)
    _check_bucket(fs, loc)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise _fail(fs, loc, "list", exc) from None
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)


def exists(uri: str) -> bool:
    return _info(uri, "check")[2].type != pafs.FileType.NotFound


def size_of(uri: str) -> int | None:
    """Bytes of an object or file (a HEAD on S3); None when it does not exist."""
    info = _info(uri, "check")[2]
    return None if info.type == pafs.FileType.NotFound else int(info.size or 0)


class ObjectError(DragonsError):
    """One object that cannot be read; ``kind`` is its row error's kind
    (``not_found``, ``too_large``, ``access_denied``, ``read_error``)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _too_large(loc: Location, size: int, max_bytes: int) -> ObjectError:
    return ObjectError(ErrorKind.TOO_LARGE, f"{loc.uri} is {size} bytes, over the {max_bytes}-byte limit (--max-bytes)")


# How the AWS SDK (curl) reports a connection that could not be made at all.
_NOT_CONNECTED = "curlCode: 7,"


def read_bytes(uri: str, fs: pafs.FileSystem | None = None, max_bytes: int = 0) -> bytes:
    """Read a whole object. Pass ``fs`` when reading many (saves a client per call).

    ``max_bytes`` > 0 refuses a bigger object from its size alone, before reading it.
    """
    loc = parse(uri)
    if fs is None:
        fs, _ = filesystem(uri)
    try:
        attempts = S3_MAX_ATTEMPTS if loc.is_s3 else 1  # a local read that failed once fails again
        for attempt in range(attempts):
            try:
                # A random-access file knows its size before any read (a HEAD on S3).
                with (fs.open_input_file if max_bytes else fs.open_input_stream)(loc.path) as f:
                    if max_bytes and int(f.size()) > max_bytes:
                        raise _too_large(loc, int(f.size()), max_bytes)
                    return f.read()
            except (FileNotFoundError, PermissionError):
                raise
            except OSError as exc:
                # pyarrow does not retry a 5xx on a ranged GET of a small object: the
                # SDK writes the error body into the object's buffer, overflows it and
                # reports a non-retryable "Failed to flush response stream".
                # An endpoint that refused every connection (curl's code 7) was
                # already retried by pyarrow's own strategy: four more rounds took
                # 11-18 s to say "cannot reach". A reset mid-transfer is retried here.
                if attempt + 1 >= attempts or "ACCESS_DENIED" in str(exc).upper() or _NOT_CONNECTED in str(exc):
                    raise
                time.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")
    except FileNotFoundError:
        _check_bucket(fs, loc)
        raise ObjectError(ErrorKind.NOT_FOUND, f"{loc.uri} does not exist: check the path") from None
    except OSError as exc:
        err = _fail(fs, loc, "read", exc)
        denied = str(err).startswith("access denied")
        raise ObjectError(ErrorKind.ACCESS_DENIED if denied else ErrorKind.READ_ERROR, str(err)) from None


def get_object(client: Any, loc: Location, max_bytes: int = 0, size: int | None = None) -> bytes:
    """One S3 GET with boto3; errors become ObjectError naming the object.

    The size limit is checked before any byte of the body is read: from the
    listing's ``size`` when the caller has it, else from the response's
    Content-Length (the body is then closed unread). A HEAD per object instead
    would double the requests, and S3's bill, for every normal image.
    """
    if max_bytes and size is not None and size > max_bytes:
        raise _too_large(loc, size, max_bytes)
    bucket, _, key = loc.path.partition("/")
    try:
        resp = client.get_object(Bucket=bucket, Key=key)
        length = int(resp.get("ContentLength", 0))
        if max_bytes and length > max_bytes:
            resp["Body"].close()
            raise _too_large(loc, length, max_bytes)
        return bytes(resp["Body"].read())
    except ObjectError:
        raise
    except Exception as exc:
        code = s3_error_code(exc)
        raise ObjectError(s3_error_kind(code), f"cannot read {loc.uri}: {code}") from None


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
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as exc:
        raise _fail(fs, loc, "write", exc) from None


def delete(uri: str) -> None:
    """Delete a file or a whole prefix; missing is fine."""
    fs, loc, info = _info(uri, "delete")
    try:
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(loc.path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(loc.path)
    except OSError as exc:
        raise _fail(fs, loc, "delete", exc) from None


def check_writable(uri: str, flag: str = "--out") -> None:
    """Fail now, before hours of work, if nothing can be written under ``uri``:
    a missing bucket, a dead endpoint or a denied PUT. Writes and deletes a probe."""
    probe = join(uri, f".dragons-write-probe-{uuid.uuid4().hex[:12]}")
    loc = parse(probe)
    if loc.is_s3:
        # One plain PUT and DELETE: pyarrow's filesystem would also leave directory
        # marker objects behind, and an output that was refused must stay untouched.
        try:
            _check_bucket(s3_filesystem(), loc)
        except DragonsError as exc:
            raise DragonsError(f"{flag} {parse(uri).uri} is not writable: {exc}") from None
        client = boto3_client()
        bucket, _, key = loc.path.partition("/")
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"")
        except Exception as exc:
            code = s3_error_code(exc)
            why = "access denied: check the credentials' permissions on it" if code in DENIED_CODES else code
            raise DragonsError(f"{flag} {parse(uri).uri} is not writable: {why}") from None
        try:
            client.delete_object(Bucket=bucket, Key=key)
        except Exception:
            pass  # writable is what we needed to know; a delete-denied probe is harmless
        return
    try:
        write_bytes(probe, b"")
    except DragonsError as exc:
        raise DragonsError(f"{flag} {parse(uri).uri} is not writable: {exc}") from None
    try:
        delete(probe)
    except DragonsError:
        pass


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
    """Copy every file under a URI into a local directory. A key that would land
    outside it (``..`` parts, an absolute path) is refused before anything is written."""
    loc = parse(uri)
    fs, _ = filesystem(uri)
    root = Path(local_dir).resolve()
    plan = []
    for entry in list_files(uri):
        rel = entry.uri[len(loc.uri) :].lstrip("/")
        dest = (root / rel).resolve()
        if root not in dest.parents:
            raise DragonsError(
                f"{redact(entry.uri)} would be written outside {local_dir} (its key holds '..' or is "
                "absolute): nothing was copied; remove or rename that object"
            )
        plan.append((entry.uri, dest))
    for src, dest in plan:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(src, fs))


# Secret-bearing parts of URLs: user:password@ and presigned-URL signatures.
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SIGNED_RE = re.compile(
    r"(?i)(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId)=[^&\s\"']+"
)
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")


def redact(text: str) -> str:
    """Remove secret values from text before it is logged or stored: the values
    of SECRET_VARS, passwords in URLs, presigned-URL signatures."""
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    text = _USERINFO_RE.sub(lambda m: m.group("scheme") + "***@", text)
    return _SIGNED_RE.sub(lambda m: m.group(1) + "=***", text)


def redact_obj(obj: Any) -> Any:
    """:func:`redact` applied to every string (keys too) in a JSON-like object:
    the one redaction for every config, manifest, artifact and report written."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj
