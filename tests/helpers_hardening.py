"""Shared test helpers: a tiny untrained model artifact, small JPEGs, the recipe's
head-only settings, and a training Source of images in memory. Untrained weights
are enough where a test compares rows with rows."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGE_SIZE = 64


def jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def save_tiny_model(out: str, classes: tuple[str, ...] = ("ants", "bees")) -> dict:
    import torch

    from dragons import artifact
    from dragons.dataconfig import DataConfig
    from dragons.models.registry import build_model, get_spec

    torch.manual_seed(0)
    spec = get_spec("efficientnet_lite0")
    model = build_model("efficientnet_lite0", len(classes), weights="none").eval()
    data = DataConfig.create(IMAGE_SIZE, 0.875, spec.mean, spec.std)
    meta = {"arch": "efficientnet_lite0", "classes": list(classes), "data_config": data.to_dict(), "metrics": {}}
    return artifact.save(out, model, meta)


def rows_of(table_uri: str, run_id: str) -> list[dict]:
    """Every row of one run in a scores table, through `dragons query`'s path."""
    from dragons.score.query import run_sql

    return run_sql(table_uri, f"SELECT * FROM scores WHERE run_id = '{run_id}'").to_pylist()


def head_only_settings() -> dict:
    """What the recipe decides for a small photo set's head-only run, for the fields a
    Worker reads itself: for tests that build a Worker without data to decide from."""
    from dragons.train.config import TrainConfig
    from dragons.train.recipe import resolve

    cfg, _ = resolve(TrainConfig(data="x", out="y"), n_train=245, short_side=375)
    return {"augment": cfg.augment, "label_smoothing": cfg.label_smoothing, "lr_mult": cfg.lr_mult}


@dataclass
class Shard:
    """A training Source (dragons.train.stream) of images already in memory: uint8
    NCHW base squares, labels and row ids; for tests and the GPU check."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    seed: int = 0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def row_ids(self) -> np.ndarray:
        return self.idx.numpy().astype(np.int64)

    def batches(self, batch_size: int, shuffle: bool = False, epoch: int = 0) -> Iterator[tuple]:
        import torch

        from dragons.train.stream import num_steps, shard_rows, split_sizes

        order = torch.from_numpy(shard_rows(len(self), 0, 1, self.seed, epoch, shuffle))
        start = 0
        for size in split_sizes(len(self), num_steps(len(self), batch_size)):
            sel = order[start : start + size]
            start += size
            yield self.x[sel], self.y[sel], self.idx[sel]
