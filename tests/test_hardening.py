"""Defects from the hardening review (issue 10), each through a real run:
odd keys, size limits, clear errors for a missing bucket or a dead endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dragons import storage
from dragons.query import run_sql
from dragons.score import ScoreConfig, score
from helpers_hardening import jpeg, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
ODD_KEYS = ["photo#1.jpg", "what?x=1&y=2.jpg", "a b.jpg", "100%25 sure%.jpg", "c+d.jpg", "drăgon-龍.jpg",
            "deep/er/and/deeper/x.jpg"]


@pytest.fixture(scope="module")
def tiny_model(bucket: str) -> str:
    uri = f"s3://{bucket}/models/tiny"
    save_tiny_model(uri)
    return uri


def _rows(table_uri: str, run_id: str) -> list[dict]:
    return run_sql(table_uri, f"SELECT * FROM scores WHERE run_id = '{run_id}'").to_pylist()


def test_odd_keys_score_the_right_object(ray_session: None, tiny_model: str, bucket: str, tmp_path: Path) -> None:
    root = f"s3://{bucket}/oddscore"
    client = storage.boto3_client()
    for i, key in enumerate(ODD_KEYS):
        client.put_object(Bucket=bucket, Key=f"oddscore/odd/{key}", Body=jpeg(i))
        client.put_object(Bucket=bucket, Key=f"oddscore/plain/{i}.jpg", Body=jpeg(i))
    # Decoys where urlparse would have cut the key: a different image.
    client.put_object(Bucket=bucket, Key="oddscore/odd/photo", Body=jpeg(100))
    client.put_object(Bucket=bucket, Key="oddscore/odd/what", Body=jpeg(101))
    listed = [e.uri for e in storage.list_files(root)]
    out = f"s3://{bucket}/tables/odd"
    m = score(ScoreConfig(model=tiny_model, input=root, output=out, run_id="odd", log_file=str(tmp_path / "log")))
    assert m["errors"] == 0 and m["rows"] == len(listed)
    rows = {r["uri"]: r for r in _rows(out, "odd")}
    assert sorted(rows) == sorted(listed)
    for i, key in enumerate(ODD_KEYS):
        odd, plain = rows[f"{root}/odd/{key}"], rows[f"{root}/plain/{i}.jpg"]
        assert (odd["p_ants"], odd["p_bees"]) == (plain["p_ants"], plain["p_bees"]), key


def test_max_bytes_and_max_pixels_give_too_large_rows(ray_session: None, tiny_model: str, bucket: str, tmp_path: Path) -> None:
    from dragons.synth import png_bomb

    root = f"s3://{bucket}/sizes"
    small, big = jpeg(1), jpeg(2, size=(900, 700))
    assert len(big) > 20_000 > len(small)
    storage.write_bytes(f"{root}/small.jpg", small)
    storage.write_bytes(f"{root}/big.jpg", big)
    storage.write_bytes(f"{root}/bomb.png", png_bomb(3000, 3000))
    out = f"s3://{bucket}/tables/sizes"
    m = score(ScoreConfig(model=tiny_model, input=root, output=out, run_id="sizes", max_bytes=20_000,
                          max_pixels=1_000_000, log_file=str(tmp_path / "log")))
    assert m["rows"] == 3 and m["errors"] == 2
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in _rows(out, "sizes")}
    assert rows["big.jpg"]["error"].startswith("too_large:") and "--max-bytes" in rows["big.jpg"]["error"]
    assert rows["bomb.png"]["error"].startswith("too_large")
    assert rows["small.jpg"]["error"] is None
    # The CLI exposes both limits, with ScoreConfig's defaults.
    from dragons.score_cli import get_score_parser

    ns = get_score_parser().parse_args(["--model", "m", "--output", "o"])
    assert (ns.max_bytes, ns.max_pixels) == (ScoreConfig().max_bytes, ScoreConfig().max_pixels) == (64 * 2**20, 64_000_000)
    ns = get_score_parser().parse_args(["--model", "m", "--output", "o", "--max-bytes", "10", "--max-pixels", "20"])
    assert (ns.max_bytes, ns.max_pixels) == (10, 20)


def test_max_bytes_refuses_from_the_listing_size_without_a_get() -> None:
    """With the listing's size the object is never requested at all."""
    import numpy as np

    from dragons.decode import DecodeBatch

    class NoGet:
        def get_object(self, **kw: object) -> None:
            raise AssertionError("GET issued for an object known to be too large")

    from dragons import decode

    saved = decode._CLIENTS.get("s3")
    decode._CLIENTS["s3"] = NoGet()
    try:
        out = DecodeBatch(32, 1000, max_bytes=100)({"uri": np.array(["s3://b/huge.bin"]), "size": np.array([10**10])})
    finally:
        decode._CLIENTS.pop("s3")
        if saved is not None:
            decode._CLIENTS["s3"] = saved
    assert out["error"][0].startswith("too_large:")
