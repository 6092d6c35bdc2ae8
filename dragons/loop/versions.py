"""Model versions and aliases, with no server: a folder (or S3 prefix) is the registry.

    ROOT/model.json, model.pt, report/, train.log   the newest training, as ``dragons train --out ROOT`` always wrote
    ROOT/versions/<version>/model.json, model.pt    every version, immutable (``version``: the weights' content hash)
    ROOT/aliases.json                                aliases -> version, and every change (who, when, from -> to)

``ROOT@prod`` and ``ROOT@<version>`` name one version; a plain artifact folder (no
registry) still loads as itself. ``aliases.json`` is one small object changed only
by a conditional write: on S3 a PUT with ``If-Match`` on the ETag that was read (or
``If-None-Match: *`` for the first), locally a compare-and-replace under ``flock``;
so of two promotions that read the same state, one wins and the other is told so.

No torch here: resolving a model URI must stay cheap (the CLI and the score driver do it first).
"""

from __future__ import annotations

import contextlib
import fcntl  # POSIX only, as dragons is (dragons.signals stops on SIGHUP)
import getpass
import hashlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from dragons import storage
from dragons.errors import DragonsError

log = logging.getLogger("dragons")
# The artifact's two files (dragons.artifact takes its names from here: it imports torch, this must not).
WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"
VERSIONS_DIR = "versions"
ALIASES_FILE = "aliases.json"
LOCK_FILE = ".aliases.lock"  # local registries only: held for the compare-and-replace, never longer
LATEST = "latest"  # moved by every `dragons train --out ROOT`
FORMAT = 1
# Tries when aliases.json changed under us for another alias (a training moving
# `latest` while prod is promoted): the change we wanted is still valid, so write again.
MAX_TRIES = 8
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")  # artifact.content_hash
MIN_PREFIX = 6  # a version may be named by a unique prefix this long (as git abbreviates commits)
# S3 answers for a conditional write that lost: 412 (the ETag moved), 409 (a concurrent
# conditional write in flight), 404 (If-Match on an object deleted meanwhile).
_LOST_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"})


# ----------------------------------------------------------------- what callers get


@dataclass(frozen=True)
class Resolved:
    """A model URI resolved once: the artifact folder to load and its version."""

    dir: str  # what to load (ROOT/versions/<v> for a registry reference; a plain folder as given)
    version: str
    registry: str | None = None  # ROOT when the URI was ROOT@name
    name: str | None = None  # what followed the @, as given
    alias: str | None = None  # the alias it went through; None: a version or a plain folder

    @property
    def ref(self) -> str:
        """The URI as a person wrote it (ROOT@name, or the folder)."""
        return f"{self.registry}@{self.name}" if self.registry is not None else self.dir


@dataclass(frozen=True)
class VersionInfo:
    version: str
    uri: str  # the version's folder
    created: str | None  # model.json's created_at (UTC, ISO 8601); None for artifacts older than it
    metrics: dict[str, Any]
    aliases: list[str]  # the aliases pointing at it, sorted
    arch: str = ""
    classes: list[str] = field(default_factory=list)
    registered: bool = True  # False: only ROOT/model.json holds it (an artifact from before registries)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Promotion:
    """One alias change (a history entry of aliases.json), or none when it already pointed there."""

    alias: str
    version: str
    previous: str | None
    actor: str
    at: str
    seq: int
    changed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self, root: str) -> str:
        where = f"{storage.redact(root)}@{self.alias}"
        if not self.changed:
            return f"{where} already points at {self.version}: nothing changed"
        return (
            f"{where}: {self.previous or '(none)'} -> {self.version} (change {self.seq}, by {self.actor} at {self.at})"
        )


# ----------------------------------------------------------------- names and folders


def split_ref(uri: str) -> tuple[str, str | None]:
    """``ROOT@name`` -> (ROOT, name); anything else -> (uri, None). Only the last path
    segment is looked at: an '@' further up is part of a folder's name."""
    head, sep, last = str(uri).rstrip("/").rpartition("/")
    if "@" not in last:
        return uri, None
    stem, _, name = last.rpartition("@")
    if not stem or not name:
        raise DragonsError(
            f"model {uri!r}: write a registry reference as ROOT@alias or ROOT@version (e.g. s3://models/dragons@prod)"
        )
    return f"{head}{sep}{stem}", name


def version_dir(root: str, version: str) -> str:
    return storage.join(root, VERSIONS_DIR, version)


def default_actor() -> str:
    """Who changes an alias, for the history: user@host (``DRAGONS_ACTOR`` overrides, e.g. in CI)."""
    if os.environ.get("DRAGONS_ACTOR", "").strip():
        return os.environ["DRAGONS_ACTOR"].strip()
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 (no passwd entry in a container: still say something)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_alias(alias: str) -> None:
    if not _ALIAS_RE.match(alias) or _VERSION_RE.match(alias):
        raise DragonsError(
            f"alias {alias!r} is not a valid name: use a letter then letters, digits, '_', '.' or '-' "
            "(at most 64), and not 16 hex digits (that reads as a version); e.g. prod, staging"
        )


def _meta_at(folder: str) -> dict[str, Any] | None:
    uri = storage.join(folder, META_FILE)
    if not storage.exists(uri):
        return None
    try:
        return dict(json.loads(storage.read_bytes(uri)))
    except json.JSONDecodeError as exc:
        raise DragonsError(f"{storage.redact(uri)} is not valid JSON: {exc}") from None


# ----------------------------------------------------------------- aliases.json: read, conditional write


def _empty() -> dict[str, Any]:
    return {"format": FORMAT, "seq": 0, "aliases": {}, "history": []}


def _parse_state(data: bytes, uri: str) -> dict[str, Any]:
    try:
        state = json.loads(data)
    except json.JSONDecodeError as exc:
        raise DragonsError(
            f"{storage.redact(uri)} is not valid JSON ({exc}): restore it from the bucket's versions "
            "or fix it by hand; the versions/ folders are untouched"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("aliases"), dict):
        raise DragonsError(f"{storage.redact(uri)} is not a dragons aliases file (no 'aliases' object)")
    return {**_empty(), **state}


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = storage.parse(uri).path.partition("/")
    return bucket, key


def _read_state(root: str) -> tuple[dict[str, Any], str | None]:
    """(aliases.json's contents, the token a conditional write compares: S3's ETag, else a
    hash of the bytes; None when there is no aliases.json yet)."""
    uri = storage.join(root, ALIASES_FILE)
    loc = storage.parse(uri)
    if loc.is_s3:
        bucket, key = _bucket_key(uri)
        try:
            resp = storage.boto3_client().get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            code = storage.s3_error_code(exc)
            if code in ("NoSuchKey", "404"):
                return _empty(), None
            raise _s3_failure(uri, "read", exc) from None
        data = bytes(resp["Body"].read())
        return _parse_state(data, uri), str(resp["ETag"])
    try:
        with open(loc.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return _empty(), None
    return _parse_state(data, uri), hashlib.sha256(data).hexdigest()


def _s3_failure(uri: str, what: str, exc: BaseException) -> DragonsError:
    """A failed boto3 call on a registry object as an error naming it (and what to check)."""
    code = storage.s3_error_code(exc)
    if code in storage.UNREACHABLE_CODES:
        return storage.unreachable(storage.parse(uri), exc)
    if code in storage.DENIED_CODES:
        return DragonsError(
            f"access denied: cannot {what} {storage.redact(uri)}: check the credentials' permissions on it"
        )
    if code == "NoSuchBucket":
        return DragonsError(
            f"bucket {storage.parse(uri).bucket!r} does not exist for {storage.redact(uri)}: check the registry URI"
        )
    return DragonsError(f"cannot {what} {storage.redact(uri)}: {code}")


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
    """An exclusive flock on ROOT/.aliases.lock: released by the kernel when its holder
    dies, so a killed promotion leaves no stale lock behind."""
    path = storage.join(root, LOCK_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_state(root: str, state: dict[str, Any], token: str | None) -> bool:
    """Write aliases.json only if it is still what was read (``token``); False when
    another writer changed it first (nothing written then)."""
    uri = storage.join(root, ALIASES_FILE)
    data = json.dumps(state, indent=2, sort_keys=True).encode()
    loc = storage.parse(uri)
    if loc.is_s3:
        bucket, key = _bucket_key(uri)
        cond = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
        try:
            storage.boto3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/json", **cond)
        except Exception as exc:
            code = storage.s3_error_code(exc)
            if code in _LOST_CODES:
                return False
            raise _s3_failure(uri, "write", exc) from None
        return True
    with _locked(root):
        try:
            with open(loc.path, "rb") as f:
                now: str | None = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            now = None
        if now != token:
            return False
        tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:12]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, loc.path)  # readers (who take no lock) see the old file or the new one
    return True


def _create(uri: str, data: bytes) -> bool:
    """Write ``uri`` only if nothing is there (True: written): a version's files are never replaced."""
    loc = storage.parse(uri)
    if loc.is_s3:
        bucket, key = _bucket_key(uri)
        try:
            storage.boto3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as exc:
            code = storage.s3_error_code(exc)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise _s3_failure(uri, "write", exc) from None
        return True
    os.makedirs(os.path.dirname(loc.path), exist_ok=True)
    tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:12]}"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, loc.path)  # atomic and refuses an existing name: a reader sees the whole file or none
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


# ----------------------------------------------------------------- writing versions and aliases


def write_version(root: str, version: str, weights: bytes, meta_json: bytes) -> bool:
    """ROOT/versions/<version>/: the weights, then model.json (a version exists once its
    model.json does). An existing version is left alone (False): same hash, same weights."""
    folder = version_dir(root, version)
    if storage.exists(storage.join(folder, META_FILE)):
        return False
    _create(storage.join(folder, WEIGHTS_FILE), weights)  # already there: the same bytes (the name is their hash)
    return _create(storage.join(folder, META_FILE), meta_json)


def add_file(root: str, version: str, name: str, data: bytes) -> bool:
    """A file beside a version's model (its train.log), written once; False when it was there."""
    return _create(storage.join(version_dir(root, version), name), data)


def register(root: str) -> str:
    """Copy ROOT's top-level artifact (one written before registries) into versions/; returns its version."""
    meta = _meta_at(root)
    if meta is None:
        raise DragonsError(
            f"no model artifact at {storage.redact(root)}: {META_FILE} is missing "
            f"(train one with `dragons train --out {storage.redact(root)}`)"
        )
    version = str(meta["version"])
    weights = storage.read_bytes(storage.join(root, meta.get("weights_file", WEIGHTS_FILE)))
    if hashlib.sha256(weights).hexdigest()[:16] != version:
        raise DragonsError(
            f"{storage.redact(root)}: weights do not match model.json's version {version}: the artifact "
            "is corrupt or half-written (a training writing it now?); nothing was registered"
        )
    write_version(root, version, weights, storage.read_bytes(storage.join(root, META_FILE)))
    return version


def adopt(root: str) -> str | None:
    """Before a training replaces ROOT's top-level artifact: keep the one there as a version if
    no versions/ folder holds it yet (ROOT written before registries; maybe what the nights
    score). Returns its version, None when there was nothing to keep or it is half-written."""
    meta = _meta_at(root)
    if meta is None or _meta_at(version_dir(root, str(meta["version"]))) is not None:
        return None
    try:
        return register(root)
    except DragonsError as exc:  # a corrupt artifact is not worth keeping, nor a reason to lose the new one
        log.warning("%s: not kept as a version before it is replaced: %s", storage.redact(root), exc)
        return None


def set_latest(root: str, version: str, actor: str | None = None) -> Promotion:
    """Point ``latest`` at a version just written (a training): the newest training wins, no questions."""
    return _move(root, LATEST, version, actor or default_actor(), expect=None, strict=False)


def promote(
    root: str, version: str, alias: str = "prod", actor: str | None = None, expect: str | None = None
) -> Promotion:
    """Point ``alias`` at ``version`` (a version, a unique prefix of one, or another alias).

    Refused: an unknown version (the message lists them); ``expect`` given and the alias
    not pointing there now; another promotion of the same alias winning between our read
    and our write ("another promotion ... won"). A version only ROOT/model.json holds (an
    artifact from before registries) is copied into versions/ first.
    """
    _check_alias(alias)
    state, _ = _read_state(root)
    target = _find_version(root, version, state)
    if expect is not None and state["aliases"].get(alias) != expect:
        raise DragonsError(
            f"{storage.redact(root)}@{alias} points at {state['aliases'].get(alias) or 'nothing'}, "
            f"not {expect} (--expect): run `dragons model list --registry {storage.redact(root)}` "
            "and try again"
        )
    return _move(root, alias, target, actor or default_actor(), expect=state["aliases"].get(alias), strict=True)


def _move(root: str, alias: str, version: str, actor: str, expect: str | None, strict: bool) -> Promotion:
    """The one writer of aliases.json: read, change one alias, write conditionally; on a lost
    write read again. ``strict``: the alias itself must still point where it did (``expect``)."""
    for _ in range(MAX_TRIES):
        state, token = _read_state(root)
        current = state["aliases"].get(alias)
        if current == version:
            return Promotion(alias, version, current, actor, _now(), int(state["seq"]), changed=False)
        if strict and current != expect:
            last: dict[str, Any] = next((h for h in reversed(state["history"]) if h.get("alias") == alias), {})
            raise DragonsError(
                f"another promotion of {storage.redact(root)}@{alias} won: it now points at {current} "
                f"(by {last.get('actor', '?')} at {last.get('at', '?')}), not at {version}; run "
                f"`dragons model list --registry {storage.redact(root)}` and try again"
            )
        seq = int(state["seq"]) + 1
        entry = {"seq": seq, "alias": alias, "from": current, "to": version, "actor": actor, "at": _now()}
        new = {
            **state,
            "format": FORMAT,
            "seq": seq,
            "aliases": {**state["aliases"], alias: version},
            "history": [*state["history"], entry],
        }
        if _write_state(root, new, token):
            return Promotion(alias, version, current, actor, entry["at"], seq, changed=True)
    raise DragonsError(
        f"{storage.redact(storage.join(root, ALIASES_FILE))} kept changing under {MAX_TRIES} tries to "
        f"point {alias} at {version}: another process is changing aliases in a loop; try again"
    )


# ----------------------------------------------------------------- reading the registry


def _versions(root: str) -> list[str]:
    """The names under ROOT/versions/ (a folder without model.json is a version being written: not one yet)."""
    base = storage.join(root, VERSIONS_DIR)
    return [v for v in storage.list_dirs(base) if storage.exists(storage.join(base, v, META_FILE))]


def _find_version(root: str, name: str, state: dict[str, Any]) -> str:
    """A version, a unique prefix of one, or an alias -> the version (registered first if only ROOT holds it)."""
    if name in state["aliases"]:
        return str(state["aliases"][name])
    known = _versions(root)
    top = _meta_at(root)
    top_version = str(top["version"]) if top else None
    pool = sorted(set(known) | ({top_version} if top_version else set()))
    hits = _match(pool, name)
    if len(hits) > 1:
        raise _ambiguous(root, name, hits)
    if not hits:
        if not pool and not state["aliases"]:
            raise DragonsError(
                f"no model registry at {storage.redact(root)}: no {VERSIONS_DIR}/, {ALIASES_FILE} or "
                f"{META_FILE} there (train one with `dragons train --out {storage.redact(root)}`)"
            )
        raise DragonsError(
            f"no version {name!r} in {storage.redact(root)}: versions {', '.join(pool) or '(none)'}; "
            f"aliases {_alias_list(state)}"
        )
    if hits[0] not in known:
        register(root)  # only ROOT/model.json holds it: make it an immutable version first
    return hits[0]


def _match(pool: list[str], name: str) -> list[str]:
    """The versions ``name`` names: itself, else those it is a prefix of (MIN_PREFIX digits at least)."""
    exact = [v for v in pool if v == name]
    return exact or ([v for v in pool if v.startswith(name)] if len(name) >= MIN_PREFIX else [])


def _ambiguous(root: str, name: str, hits: list[str]) -> DragonsError:
    return DragonsError(f"version {name!r} is ambiguous in {storage.redact(root)}: {', '.join(hits)}; give more digits")


def _alias_list(state: dict[str, Any]) -> str:
    return ", ".join(f"{a} -> {v}" for a, v in sorted(state["aliases"].items())) or "(none)"


def resolve(uri: str) -> Resolved:
    """``ROOT@alias`` / ``ROOT@<version>`` -> ROOT/versions/<version>; a plain artifact folder -> itself."""
    root, name = split_ref(uri)
    # A folder, or its model.json (as artifact.read_meta takes it).
    folder = uri[: -len(META_FILE)].rstrip("/") if str(uri).rstrip("/").endswith(META_FILE) else uri
    plain = _meta_at(folder)
    if name is None or plain is not None:  # a folder whose own name holds an '@' stays a folder
        if plain is None:
            raise DragonsError(
                f"no model artifact at {storage.redact(uri)}: "
                f"{storage.redact(storage.join(folder, META_FILE))} is missing "
                f"(train one with `dragons train --out {storage.redact(folder)}`)"
            )
        return Resolved(dir=folder, version=str(plain["version"]))
    state, _ = _read_state(root)
    if name in state["aliases"]:
        version = str(state["aliases"][name])
        folder = version_dir(root, version)
        if _meta_at(folder) is None:
            raise DragonsError(
                f"{storage.redact(root)}@{name} points at version {version}, but "
                f"{storage.redact(storage.join(folder, META_FILE))} is missing: promote another version"
            )
        return Resolved(dir=folder, version=version, registry=root, name=name, alias=name)
    known = _versions(root)
    hits = _match(known, name)
    if len(hits) == 1:
        return Resolved(dir=version_dir(root, hits[0]), version=hits[0], registry=root, name=name)
    top = _meta_at(root)
    if top is not None and str(top["version"]) == name:  # ROOT@<version> of an artifact from before registries
        return Resolved(dir=root, version=name, registry=root, name=name)
    if len(hits) > 1:
        raise _ambiguous(root, name, hits)
    if not known and not state["aliases"] and top is None:
        raise DragonsError(
            f"no model registry at {storage.redact(root)} (model {storage.redact(uri)}): no "
            f"{VERSIONS_DIR}/, {ALIASES_FILE} or {META_FILE} there"
        )
    listed = known + ([f"{top['version']} (only in {META_FILE})"] if top is not None else [])
    how = (
        f". Promote one with `dragons model promote --registry {storage.redact(root)} --alias {name} VERSION`"
        if _ALIAS_RE.match(name)
        else ""
    )
    raise DragonsError(
        f"no alias or version {name!r} in the model registry {storage.redact(root)}: aliases "
        f"{_alias_list(state)}; versions {', '.join(listed) or '(none)'}{how}"
    )


def artifact_dir(uri: str) -> str:
    """The folder to load for a model URI: ``ROOT@name`` resolved, anything else as given (no I/O)."""
    return resolve(uri).dir if split_ref(uri)[1] is not None else uri


def aliases(root: str) -> dict[str, str]:
    return dict(_read_state(root)[0]["aliases"])


def history(root: str) -> list[dict[str, Any]]:
    """Every alias change, oldest first: seq, alias, from, to, actor, at."""
    return list(_read_state(root)[0]["history"])


def list_versions(root: str) -> list[VersionInfo]:
    """Every version in the registry, newest first (an artifact from before registries: its one version)."""
    state, _ = _read_state(root)
    pointing: dict[str, list[str]] = {}
    for a, v in state["aliases"].items():
        pointing.setdefault(str(v), []).append(a)
    out = []
    for v in _versions(root):
        meta = _meta_at(version_dir(root, v)) or {}
        out.append(_info(v, version_dir(root, v), meta, sorted(pointing.get(v, [])), True))
    top = _meta_at(root)
    if top is not None and str(top["version"]) not in {i.version for i in out}:
        out.append(_info(str(top["version"]), root, top, sorted(pointing.get(str(top["version"]), [])), False))
    if not out and not storage.exists(storage.join(root, ALIASES_FILE)):
        raise DragonsError(
            f"no model registry at {storage.redact(root)}: no {VERSIONS_DIR}/, {ALIASES_FILE} or "
            f"{META_FILE} there (train one with `dragons train --out {storage.redact(root)}`)"
        )
    return sorted(out, key=lambda i: (i.created or "", i.version), reverse=True)


def _info(version: str, uri: str, meta: dict[str, Any], names: list[str], registered: bool) -> VersionInfo:
    return VersionInfo(
        version=version,
        uri=uri,
        created=meta.get("created_at"),
        metrics=dict(meta.get("metrics") or {}),
        aliases=names,
        arch=str(meta.get("arch", "")),
        classes=list(meta.get("classes", [])),
        registered=registered,
    )


def show(root: str, version_or_alias: str) -> dict[str, Any]:
    """One version: where it is, its aliases, the alias changes that involved it, and its model.json."""
    r = resolve(f"{storage.parse(root).uri}@{version_or_alias}")
    state, _ = _read_state(root)
    meta = _meta_at(r.dir) or {}
    return {
        "version": r.version,
        "uri": r.dir,
        "alias": r.alias,
        "created": meta.get("created_at"),
        "aliases": sorted(a for a, v in state["aliases"].items() if v == r.version),
        "promotions": [h for h in state["history"] if r.version in (h.get("to"), h.get("from"))],
        "meta": meta,
    }


def describe(infos: list[VersionInfo]) -> str:
    """``dragons model list`` as text: one line a version, newest first."""
    lines = [f"{'VERSION':<16}  {'CREATED':<20}  {'ARCH':<18}  {'VALID ACC':>9}  ALIASES"]
    for i in infos:
        acc = i.metrics.get("valid_accuracy")
        lines.append(
            f"{i.version:<16}  {i.created or '-':<20}  {i.arch or '-':<18}  "
            f"{'-' if acc is None else f'{acc:.4f}':>9}  {', '.join(i.aliases) or '-'}"
            + ("" if i.registered else "  (not in versions/: promote it to register it)")
        )
    return "\n".join(lines)
