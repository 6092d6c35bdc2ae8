"""Image-folder data sets on disk or S3: discovery, classes, the train/valid split.

Layout: ``root/train/<class>/...`` and ``root/valid/<class>/...`` (or ``val/``).
Classes come from folder names, sorted, as in fastai and torchvision. With no
validation folder, ``valid_pct`` makes a seeded, stratified random split.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from dragons import storage
from dragons.errors import DragonsError
from dragons.images import is_image_name

log = logging.getLogger("dragons")

VALID_DIRS = ("valid", "val", "validation")


@dataclass
class Sample:
    uri: str
    label: int


@dataclass
class ImageFolder:
    root: str
    classes: list[str]
    train: list[Sample]
    valid: list[Sample]
    split: str  # "folder" (a valid/ folder was used) or "random:<pct>"
    skipped: list[str] = field(default_factory=list)  # non-image files, by URI

    def summary(self) -> str:
        def counts(samples: list[Sample]) -> str:
            c = Counter(s.label for s in samples)
            return ", ".join(f"{name} {c.get(i, 0)}" for i, name in enumerate(self.classes))

        lines = [
            f"data {self.root}: {len(self.classes)} classes {self.classes}",
            f"  train {len(self.train)} ({counts(self.train)})",
            f"  valid {len(self.valid)} ({counts(self.valid)}) split={self.split}",
        ]
        if self.skipped:
            shown = ", ".join(u.rsplit("/", 1)[-1] for u in self.skipped[:5])
            lines.append(f"  skipped {len(self.skipped)} non-image file(s): {shown}{' ...' if len(self.skipped) > 5 else ''}")
        return "\n".join(lines)


def _relative_parts(root_uri: str, uri: str) -> list[str]:
    return uri[len(root_uri) :].strip("/").split("/")


def discover(root: str, valid_pct: float = 0.2, seed: int = 42, ignore_valid: bool = False) -> ImageFolder:
    """Find classes and samples under ``root`` (local or S3).

    ``ignore_valid`` holds out ``valid_pct`` of ``train/`` even when a validation
    folder exists: how defaults are tuned without ever looking at ``valid/``.
    """
    if not 0.0 < valid_pct < 1.0:
        raise DragonsError(f"--valid-pct must be between 0 and 1 (exclusive), got {valid_pct}")
    root_uri = storage.parse(root).uri.rstrip("/")
    files = storage.list_files(root_uri)
    if not files:
        raise DragonsError(f"no files under {root_uri}: expected train/<class>/<image> folders")
    by_split: dict[str, dict[str, list[str]]] = {}
    skipped: list[str] = []
    for entry in files:
        parts = _relative_parts(root_uri, entry.uri)
        if not is_image_name(parts[-1]):
            if not parts[-1].startswith("."):
                skipped.append(entry.uri)
            continue
        if len(parts) >= 3:
            by_split.setdefault(parts[0].lower(), {}).setdefault(parts[1], []).append(entry.uri)
        elif len(parts) == 2:  # root/<class>/<image>: no train/valid folders at all
            by_split.setdefault("", {}).setdefault(parts[0], []).append(entry.uri)
    train_dirs = by_split.get("train") or by_split.get("")
    if not train_dirs:
        found = sorted(k for k in by_split if k)
        raise DragonsError(
            f"{root_uri} has no train/<class>/ folders with images (found top-level folders: {found or 'none'}); "
            "lay the data out as train/<class>/*.jpg and valid/<class>/*.jpg"
        )
    classes = sorted(train_dirs)
    if len(classes) < 2:
        raise DragonsError(f"{root_uri}: need at least 2 class folders under train/, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    train = [Sample(u, index[c]) for c in classes for u in sorted(train_dirs[c])]
    valid_dir = next((by_split[d] for d in VALID_DIRS if d in by_split), None)
    if valid_dir and not ignore_valid:
        extra = sorted(set(valid_dir) - set(classes))
        if extra:
            raise DragonsError(f"{root_uri}: validation classes {extra} have no training folder; classes are {classes}")
        valid = [Sample(u, index[c]) for c in classes for u in sorted(valid_dir.get(c, []))]
        split = "folder"
    else:
        train, valid = _random_split(train, valid_pct, seed)
        split = f"random:{valid_pct}"
    if not valid:
        raise DragonsError(f"{root_uri}: the validation split is empty; add a valid/ folder or raise --valid-pct")
    return ImageFolder(root=root_uri, classes=classes, train=train, valid=valid, split=split, skipped=skipped)


def _random_split(samples: list[Sample], pct: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified seeded split: every class keeps the same share in valid."""
    rng = random.Random(seed)
    train: list[Sample] = []
    valid: list[Sample] = []
    by_label: dict[int, list[Sample]] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda s: s.uri)
        rng.shuffle(group)
        k = max(1, round(len(group) * pct)) if len(group) > 1 else 0
        valid += group[:k]
        train += group[k:]
    return train, valid
