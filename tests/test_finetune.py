"""Fine-tuning must not undo the head it starts from (issue 8), without Ray.

The head is fitted on precomputed eval-mode body features; the first unfrozen
epoch then trains the whole network. With BatchNorm in train mode at a
per-worker batch of 16 the body's features jumped to per-batch statistics and
the fitted head no longer fitted them: train loss 0.07 -> 1.43 on 300 flowers.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dragons.images import decode_to_base
from dragons.preprocess import base_size_for
from dragons.train.config import TrainConfig
from dragons.train.worker import Worker
from dragons.train.stream import Shard

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers5"


def _load(files: list[tuple[Path, int]], side: int) -> Shard:
    x = np.stack([decode_to_base(f.read_bytes(), side) for f, _ in files])
    y = torch.tensor([c for _, c in files])
    return Shard(torch.from_numpy(x).permute(0, 3, 1, 2), y, torch.arange(len(files)))


@pytest.fixture(scope="module")
def flowers_split() -> tuple[Shard, Shard, list[str], TrainConfig]:
    if not (FLOWERS / "train").is_dir():
        pytest.fail(f"{FLOWERS} is missing: the shared flowers5 data set is needed (see ../shared/data/README.md)")
    classes = sorted(p.name for p in (FLOWERS / "train").iterdir())
    train, held = [], []
    for ci, c in enumerate(classes):  # held-out images come from train/ too: valid/ is never looked at
        files = sorted((FLOWERS / "train" / c).iterdir())
        random.Random(ci).shuffle(files)
        train += [(f, ci) for f in files[:16]]
        held += [(f, ci) for f in files[16:24]]
    # The module's own defaults, at a small size to keep the test fast.
    cfg = TrainConfig(data="x", out="y", image_size=96, crop_pct=0.875, batch_size=16)
    side = base_size_for(cfg.image_size, cfg.crop_pct)
    return _load(train, side), _load(held, side), classes, cfg


def test_first_unfrozen_epoch_keeps_the_heads_fit(flowers_split: tuple[Shard, Shard, list[str], TrainConfig]) -> None:
    torch.set_num_threads(1)
    train, held, classes, cfg = flowers_split
    w = Worker(cfg, classes, None, torch.device("cpu"))
    feats, labels = w.features(train)
    head_loss, _ = w.fit_head(feats, labels, cfg.lr * cfg.head_lr_scale, 20)
    p = w.predict(held)
    head_held_loss, head_held_acc = w.validate(p.y, p.probs)
    assert head_loss < 0.5 and head_held_loss < 1.2  # the head has learnt something (chance: ln 5 = 1.61)

    steps = w.steps_per_epoch(train)
    opt, sched, _ = w.unfrozen_optimizer(cfg.lr, steps * 2)
    w.set_frozen(False)
    train_loss = w.train_images(train, opt, sched, frozen=False, net=w.model, epoch=0)
    # Augmented images are harder than the head's plain features, so some rise is
    # expected; the broken default (BN in train mode) gave 1.3 here (head: 0.01).
    assert train_loss < head_loss + 0.5, (head_loss, train_loss)
    w.train_images(train, opt, sched, frozen=False, net=w.model, epoch=1)
    p = w.predict(held)
    held_loss, held_acc = w.validate(p.y, p.probs)
    # 80 training images over-fit a little when the body is unfrozen (held-out
    # loss 0.99 -> 1.43, 29 -> 25 of 40 right): why the adaptive recipe stops
    # after the head on small sets. The margins are that noise, not a collapse.
    assert held_loss < head_held_loss + 0.6, (head_held_loss, held_loss)
    assert held_acc >= head_held_acc - 0.15, (head_held_acc, held_acc)
