from __future__ import annotations

from pathlib import Path

import pytest

from dragons.data import discover
from dragons.errors import DragonsError


def _touch(root: Path, rel: str, data: bytes = b"x") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_hymenoptera_layout(hymenoptera: Path) -> None:
    f = discover(str(hymenoptera))
    assert f.classes == ["ants", "bees"]
    assert (len(f.train), len(f.valid), f.split) == (245, 153, "folder")
    assert any(s.uri.endswith(".gif") for s in f.train)  # the GIF is kept, not skipped


def test_random_split_is_seeded_and_stratified(tmp_path: Path) -> None:
    for c in ("a", "b", "c"):
        for i in range(10):
            _touch(tmp_path, f"train/{c}/{i}.jpg")
    _touch(tmp_path, "train/a/README.md")
    f1, f2 = discover(str(tmp_path), valid_pct=0.2, seed=1), discover(str(tmp_path), valid_pct=0.2, seed=1)
    assert f1.classes == ["a", "b", "c"]
    assert [s.uri for s in f1.valid] == [s.uri for s in f2.valid]
    assert sorted(s.label for s in f1.valid) == [0, 0, 1, 1, 2, 2]
    assert len(f1.train) == 24 and f1.split == "random:0.2"
    assert len(f1.skipped) == 1 and f1.skipped[0].endswith("README.md")
    f3 = discover(str(tmp_path), valid_pct=0.2, seed=2)
    assert [s.uri for s in f3.valid] != [s.uri for s in f1.valid]


def test_ignore_valid_holds_out_from_train(hymenoptera: Path) -> None:
    f = discover(str(hymenoptera), valid_pct=0.2, ignore_valid=True)
    assert all("/train/" in s.uri for s in f.valid + f.train)
    assert len(f.valid) == 49


def test_bad_layouts_are_explained(tmp_path: Path) -> None:
    _touch(tmp_path, "images/a/1.jpg")
    _touch(tmp_path, "images/a/2.jpg")
    with pytest.raises(DragonsError, match="need at least 2 class folders"):
        discover(str(tmp_path / "images"))
    with pytest.raises(DragonsError, match="does not exist"):
        discover(str(tmp_path / "nope"))
    with pytest.raises(DragonsError, match="valid-pct"):
        discover(str(tmp_path), valid_pct=1.5)
