"""Image-folder data sets on disk or S3: discovery, classes, the train/valid split.

Layout: ``root/train/<class>/...`` and ``root/valid/<class>/...`` (or ``val/``).
Classes come from folder names, sorted, as in fastai and torchvision. With no
validation folder, ``valid_pct`` makes a seeded, stratified random split.

Labels (``--labels``: a labels table or a ``uri,label[,split]`` file, read by
``dragons.loop.labels.training_labels``) join a folder or stand alone
(:func:`with_labels`): a URI's label overrides its folder's, URIs only in the
labels are added, and the classes are the union of both, sorted. An added URI
without a split goes to valid when a hash of its URI falls below ``valid_pct``:
the same image stays on the same side across retrains, whatever else changes.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dragons import storage
from dragons.errors import DragonsError
from dragons.images import is_image_name
from dragons.loop.labels import training_labels

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
    labels: dict[str, Any] = field(default_factory=dict)  # what --labels changed (with_labels), for model.json

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
            lines.append(
                f"  skipped {len(self.skipped)} non-image file(s): {shown}{' ...' if len(self.skipped) > 5 else ''}"
            )
        if self.labels:
            lb = self.labels
            lines.append(
                f"  labels {lb['source']}: {lb['overridden']} overrode folder labels, "
                f"{lb['confirmed']} agreed, "
                f"{lb['added']} added ({lb['added_train']} train, {lb['added_valid']} valid)"
                + (f", new classes {lb['new_classes']}" if lb["new_classes"] else "")
            )
        return "\n".join(lines)


def _relative_parts(root_uri: str, uri: str) -> list[str]:
    return uri[len(root_uri) :].strip("/").split("/")


def discover(
    root: str, valid_pct: float = 0.2, seed: int = 42, ignore_valid: bool = False, labels: str = ""
) -> ImageFolder:
    """Find classes and samples under ``root`` (local or S3), then apply ``labels`` (if given).

    ``ignore_valid`` holds out ``valid_pct`` of ``train/`` even when a validation
    folder exists: how defaults are tuned without ever looking at ``valid/``.
    ``root`` may be empty when ``labels`` is given: the labels are then the data set.
    """
    if not 0.0 < valid_pct < 1.0:
        raise DragonsError(f"--valid-pct must be between 0 and 1 (exclusive), got {valid_pct}")
    if not root and not labels:
        raise DragonsError(
            "no training data: give --data (an image folder) or --labels (a labels table or a "
            "uri,label CSV/Parquet), or both"
        )
    folder = _folder(root, valid_pct, seed, ignore_valid) if root else None
    if labels:
        table = training_labels(labels)
        rows = zip(*(table.column(c).to_pylist() for c in ("uri", "label", "split")))
        folder = with_labels(folder, rows, valid_pct, storage.redact(labels))
    assert folder is not None
    if not folder.valid:
        raise DragonsError(f"{folder.root}: the validation split is empty; add a valid/ folder or raise --valid-pct")
    return folder


def _folder(root: str, valid_pct: float, seed: int, ignore_valid: bool) -> ImageFolder:
    """An image folder's classes and split, as the folders say."""
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


def hash_valid(uri: str, valid_pct: float) -> bool:
    """Whether ``uri`` falls in the validation split: a hash of the URI alone (no seed, no
    order), so an image never moves between train and valid across retrains."""
    return int.from_bytes(hashlib.sha256(uri.encode("utf-8")).digest()[:8], "big") / 2**64 < valid_pct


def _same_uri(uri: str) -> str:
    """A label's URI as a folder listing spells it: S3 keys verbatim, local paths absolute."""
    return uri if uri.startswith("s3://") else storage.parse(uri).uri


def with_labels(
    folder: ImageFolder | None, rows: Iterable[tuple[str, str, str | None]], valid_pct: float, source: str
) -> ImageFolder:
    """``folder`` (None: no folder) with labels ``rows`` (uri, label, split or None) applied.

    A labelled folder image keeps its folder's split unless the row names one; an
    added URI takes the row's split, else :func:`hash_valid`'s. The result does not
    depend on the order of ``rows``."""
    given: dict[str, tuple[str, str | None]] = {}
    for uri, label, split in rows:
        key = _same_uri(uri)
        if split not in (None, "train", "valid"):
            raise DragonsError(f"{source}: {key} has split {split!r}; a split is train, valid or empty (hashed)")
        if key in given and given[key] != (label, split):
            raise DragonsError(
                f"{source} labels {key} twice, as {given[key]} and {(label, split)}: keep one row per uri"
            )
        given[key] = (label, split)
    if not given and folder is None:
        raise DragonsError(f"{source} holds no labels: import a Label Studio export first, or give --data")
    old = folder.classes if folder is not None else []
    classes = sorted(set(old) | {label for label, _ in given.values()})
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, list[Sample]] = {"train": [], "valid": []}
    n = {"overridden": 0, "confirmed": 0, "moved_split": 0}
    seen: set[str] = set()
    for side, samples in (("train", folder.train), ("valid", folder.valid)) if folder is not None else ():
        for s in samples:
            name, to = old[s.label], side
            if s.uri in given:
                seen.add(s.uri)
                label, split = given[s.uri]
                n["overridden" if label != name else "confirmed"] += 1
                name = label
                if split and split != side:
                    n["moved_split"] += 1
                    to = split
            out[to].append(Sample(s.uri, index[name]))
    added = {"train": 0, "valid": 0}
    hashed = explicit = False
    for uri in sorted(set(given) - seen):
        label, split = given[uri]
        hashed, explicit = hashed or not split, explicit or bool(split)
        to = split or ("valid" if hash_valid(uri, valid_pct) else "train")
        added[to] += 1
        out[to].append(Sample(uri, index[label]))
    trained = {s.label for s in out["train"]}
    empty = [c for c in classes if index[c] not in trained]
    if empty:
        raise DragonsError(
            f"classes {empty} have no training image once {source} is applied: label more images of "
            "them (or give them split train)"
        )
    split_desc = "+".join(
        ([folder.split] if folder is not None else [])
        + (["labels"] if explicit else [])
        + ([f"hash:{valid_pct}"] if hashed else [])
    )
    facts = {
        "source": source,
        "rows": len(given),
        **n,
        "added": added["train"] + added["valid"],
        "added_train": added["train"],
        "added_valid": added["valid"],
        "new_classes": sorted(set(classes) - set(old)) if folder is not None else [],
    }
    return ImageFolder(
        root=folder.root if folder is not None else source,
        classes=classes,
        train=out["train"],
        valid=out["valid"],
        split=split_desc or "labels",
        skipped=folder.skipped if folder else [],
        labels=facts,
    )
