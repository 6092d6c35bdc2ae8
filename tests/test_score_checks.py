"""``dragons score``'s checks before any Ray work: the spool folder, the default run id."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dragons.errors import DragonsError
from dragons.score.config import ScoreConfig
from dragons.score.pipeline import score


@pytest.fixture()
def tiny_model(tmp_path: Path) -> str:
    from dragons import artifact
    from dragons.dataconfig import DataConfig
    from dragons.models.registry import build_model, get_spec

    spec = get_spec("efficientnet_lite0")
    data = DataConfig.create(64, 0.875, spec.mean, spec.std)
    meta = {
        "arch": "efficientnet_lite0",
        "classes": ["drogon", "viserion"],
        "data_config": data.to_dict(),
        "metrics": {},
    }
    artifact.save(str(tmp_path / "model"), build_model("efficientnet_lite0", 2, "none"), meta)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"not really a jpeg")
    return str(tmp_path / "model")


def test_a_missing_spool_dir_fails_before_any_image_is_read(tiny_model: str, tmp_path: Path) -> None:
    cfg = ScoreConfig(
        model=tiny_model,
        input=str(tmp_path / "in"),
        output=str(tmp_path / "table"),
        spool_dir=str(tmp_path / "no" / "such"),
        log_file=str(tmp_path / "log"),
    )
    with pytest.raises(DragonsError, match=r"--spool-dir .*no/such is not a writable folder"):
        score(cfg)
    assert not (tmp_path / "table" / "_delta_log").exists()  # nothing committed


def test_default_run_ids_are_unique_within_a_second(tiny_model: str, tmp_path: Path) -> None:
    """Two runs started in the same second into one table must not share an id
    (re-using an id replaces that run's rows)."""
    cfg = ScoreConfig(
        model=tiny_model,
        input=str(tmp_path / "in"),
        output=str(tmp_path / "table"),
        dry_run=True,
        log_file=str(tmp_path / "log"),
    )
    ids = {score(cfg)["run_id"] for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", i) for i in ids), ids
