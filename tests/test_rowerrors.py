"""Row-error kinds, tied together as test_layers ties the layers: every kind a
producer emits is an ``ErrorKind``, ``--incremental``'s SQL keeps exactly the
enum's permanent kinds, the table carries ``error_kind`` (older tables gain it),
and no kind is spelled, nor read back out of ``error``, outside ``rowerrors``."""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dragons import storage
from dragons.decode import DecodeBatch, classify
from dragons.errors import DragonsError
from dragons.images import ImageError, decode
from dragons.local.synth import bad_file_catalogue
from dragons.rowerrors import ERROR_KIND, LEGACY_KIND_SQL, PERMANENT, TRANSIENT, ErrorKind, RowError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ants", "bees"]


def test_the_split_covers_every_kind_once() -> None:
    assert PERMANENT | TRANSIENT == set(ErrorKind) and not PERMANENT & TRANSIENT
    assert all(k.permanent == (k in PERMANENT) for k in ErrorKind)
    assert {k.value for k in TRANSIENT} == {"read_error", "access_denied", "not_found"}
    assert str(RowError(ErrorKind.TRUNCATED, "x")) == "truncated: x"


def test_every_producer_emits_members_of_the_enum(tmp_path: Path) -> None:
    # The decoder, on every bad file of the demo's catalogue.
    for data, expect in bad_file_catalogue().values():
        if expect == "error":
            with pytest.raises(ImageError) as info:
                decode(data)
            assert isinstance(info.value.kind, ErrorKind)
    # storage's S3 codes, and the one mapping of every exception a decode step meets.
    for code in ("NoSuchKey", "403", "SlowDown", "InternalError"):
        assert isinstance(storage.s3_error_kind(code), ErrorKind)
    for exc in (ValueError("bug"), DragonsError("no bucket"), storage.ObjectError(ErrorKind.NOT_FOUND, "gone")):
        assert isinstance(classify(exc).kind, ErrorKind)
    # A decoded batch: its error_kind column beside the error text, which starts with the kind.
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    (tmp_path / "text.jpg").write_bytes(b"<html>")
    uris = [str(tmp_path / n) for n in ("empty.jpg", "big.jpg", "text.jpg", "missing.jpg")]
    out = DecodeBatch(32, 10**6, io_threads=2, max_bytes=50)({"uri": np.array(uris, dtype=object)})
    assert list(out[ERROR_KIND]) == ["empty", "too_large", "not_an_image", "not_found"]
    assert all(
        isinstance(ErrorKind(k), ErrorKind) and e.startswith(f"{k}: ") for k, e in zip(out[ERROR_KIND], out["error"])
    )
    # The scorer's refusal by listed size, column-wise.
    from dragons.score.scorer import refused_rows

    rows = refused_rows(pa.table({"uri": ["s3://b/x.jpg"], "size": pa.array([99], pa.int64())}), CLASSES, 50)
    assert rows.column(ERROR_KIND).to_pylist() == ["too_large"]
    assert rows.column("error").to_pylist()[0].startswith("too_large: s3://b/x.jpg is 99 bytes")


def test_incremental_keeps_exactly_the_enums_permanent_kinds() -> None:
    from dragons.score.incremental import _kept_sql

    sql, params = _kept_sql(True)
    assert ERROR_KIND in sql and "split_part" not in sql
    assert set(params["permanent"]) == {k.value for k in PERMANENT}
    assert _kept_sql(False) == ("error IS NULL", {})


def _row(uri: str, run_id: str, error: str | None, kind: str | None, hours: int = 0) -> dict:
    at = datetime(2026, 11, 28, 2, tzinfo=UTC).replace(hour=2 + hours)
    return {
        "uri": uri,
        "label": None if error else "ants",
        "score": None if error else 0.75,
        "p_ants": 0.75,
        "p_bees": 0.25,
        "novelty": None,
        "model_version": "v1",
        "run_id": run_id,
        "scored_at": at,
        "error": error,
        ERROR_KIND: kind,
        "etag": "e",
        "size": 100,
        "last_modified": at,
        "dt": "2026-11-28",
    }


def test_an_old_table_gains_the_column_and_its_error_rows_are_retried(tmp_path: Path) -> None:
    """A table written before ``error_kind``: its error rows (kind NULL) count as transient,
    whatever their text says; the next run's append adds the column; the report still
    groups the old rows by the kind in their text."""
    from deltalake import DeltaTable, write_deltalake

    from dragons.score.incremental import load_skips
    from dragons.score.runreport import RunReader, errors_by_kind
    from dragons.score.schema import LISTING_SCHEMA, schema
    from dragons.score.table import RunWriter

    table = str(tmp_path / "t")
    full = schema(CLASSES)
    old = full.remove(full.get_field_index(ERROR_KIND))
    rows = [_row(f"s3://x/{i}.jpg", "old", e, None) for i, e in enumerate([None, "truncated: x", "read_error: y"])]
    write_deltalake(
        table, pa.Table.from_pylist([{k: r[k] for k in old.names} for r in rows], schema=old), partition_by=["dt"]
    )
    page = pa.Table.from_pylist(
        [{"uri": f"s3://x/{i}.jpg", "etag": "e", "size": 100, "last_modified": None} for i in range(4)],
        schema=LISTING_SCHEMA,
    )

    def todo() -> list[str]:
        version = DeltaTable(table).version()
        left = load_skips(table, version, "v1", "next", incremental=True).split(page)[0]
        return [u.rsplit("/", 1)[1] for u in left.column("uri").to_pylist()]

    assert todo() == ["1.jpg", "2.jpg", "3.jpg"]  # no column: every error row is scored again
    w = RunWriter(table, "new", datetime.now(UTC), CLASSES, model_version="v1")
    w.add(
        pa.table(
            {
                "uri": ["s3://x/3.jpg"],
                "error": ["not_an_image: z"],
                ERROR_KIND: ["not_an_image"],
                "etag": ["e"],
                "size": [100],
            }
        )
    )
    w.finish({})
    assert ERROR_KIND in DeltaTable(table).schema().to_arrow().names
    assert todo() == ["1.jpg", "2.jpg"]  # the new permanent row is kept; old rows (NULL kind) are retried
    reader = RunReader(table)
    try:
        assert errors_by_kind(reader, "old")[0] == {"read_error": 1, "truncated": 1}
        assert errors_by_kind(reader, "new")[0] == {"not_an_image": 1}
    finally:
        reader.close()
    assert LEGACY_KIND_SQL.startswith("trim(split_part(error")


# A string that is a kind but not one: PIL's message text, which decode reads to choose TRUNCATED.
_NOT_KINDS = {("dragons/images.py", "truncated")}


def test_no_kind_is_spelled_or_parsed_outside_rowerrors() -> None:
    """Producers name kinds by the enum, and SQL reads ``error_kind``: no string literal
    in dragons/ is a kind (or starts ``kind:``), and none splits ``error`` for its kind."""
    kinds = {k.value for k in ErrorKind}
    found = []
    for path in sorted((REPO / "dragons").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "dragons/rowerrors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            text = node.value
            spelled = text in kinds or any(text.startswith(f"{k}:") for k in kinds)
            if (spelled and (rel, text) not in _NOT_KINDS) or "split_part(error" in text:
                found.append(f"{rel}:{node.lineno}: {text[:60]!r}")
    assert not found, "kinds spelled or parsed outside dragons/rowerrors.py:\n" + "\n".join(found)
