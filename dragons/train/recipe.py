"""The adaptive recipe: settings left at ``auto`` are chosen from the data.

Two facts are known before any worker starts (the driver's decode check reads
every image once): how many training images there are and their resolution
(median shorter side). The rule, chosen on held-out splits of train/ of both
shared data sets (never their valid/; tables in docs/training.md):

* resolution: photos at least ``224 / 0.7`` = 320 px on their shorter side are
  trained at 224 px from a 320 px base square (crop 0.7, tuned on hymenoptera);
  smaller images at their own resolution (rounded down to a multiple of 32,
  at least 64) with crop 0.875: upsampling a 128 px flower to 224 px costs three
  times the compute and adds no detail;
* fine-tuning: below ``FINE_TUNE_MIN_IMAGES`` training images the head alone
  (on 4 augmented views) did as well as fastai's ``fine_tune`` (hymenoptera: 245
  images, ~20 optimiser steps per epoch); from there on the body is fine-tuned
  for ``epochs_for(n)`` epochs, the head fitted on plain features first
  (augmented views buy nothing once the body trains on augmented images).

Explicit flags always win: only fields still at their ``auto`` value change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dragons.preprocess import DEFAULT_CROP_PCT
from dragons.train.config import AUTO, TrainConfig

FINE_TUNE_MIN_IMAGES = 1000  # below: head only; hymenoptera (245) never gained from fine-tuning
HIGH_RES_SIDE = 320  # shorter side at which 224 px crops of a 320 px square need no upsampling
HIGH_RES = (224, DEFAULT_CROP_PCT)  # (image_size, crop_pct) for photos
LOW_RES_CROP = 0.875  # crop for images below HIGH_RES_SIDE: keep most of a small frame
HEAD_VIEWS_HEAD_ONLY = 4  # augmented views for a head that is the whole recipe


def epochs_for(n_train: int) -> int:
    """Fine-tuning epochs: a few thousand images need a few passes; beyond ~20k
    one or two passes see enough steps (and keep the time linear in N)."""
    if n_train < FINE_TUNE_MIN_IMAGES:
        return 0
    if n_train < 20_000:
        return 3  # flowers5 held-out split: head 0.737 -> 0.786 after 3 epochs (docs/training.md)
    if n_train < 100_000:
        return 2
    return 1


def image_size_for(short_side: int) -> tuple[int, float]:
    """(image_size, crop_pct) from the median shorter side of the training images."""
    if short_side <= 0 or short_side >= HIGH_RES_SIDE:
        return HIGH_RES
    return max(64, min(224, (short_side // 32) * 32)), LOW_RES_CROP


def resolve(cfg: TrainConfig, n_train: int, short_side: int) -> tuple[TrainConfig, dict[str, Any]]:
    """A copy of ``cfg`` with every ``auto`` field decided; and what was decided, for the log."""
    chosen: dict[str, Any] = {}
    if cfg.image_size == AUTO["image_size"] or cfg.crop_pct == AUTO["crop_pct"]:
        size, crop = image_size_for(short_side)
        if cfg.image_size == AUTO["image_size"]:
            chosen["image_size"] = size
        if cfg.crop_pct == AUTO["crop_pct"]:
            chosen["crop_pct"] = crop if chosen.get("image_size", cfg.image_size) < HIGH_RES[0] else HIGH_RES[1]
    epochs = cfg.epochs
    if cfg.epochs == AUTO["epochs"]:
        epochs = chosen["epochs"] = epochs_for(n_train)
    if cfg.head_views == AUTO["head_views"]:
        chosen["head_views"] = HEAD_VIEWS_HEAD_ONLY if epochs == 0 else 0
    return dataclasses.replace(cfg, **chosen), chosen


def describe(chosen: dict[str, Any], n_train: int, short_side: int) -> str:
    if not chosen:
        return ""
    parts = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in chosen.items())
    return f"recipe (auto) for {n_train} images, median shorter side {short_side} px: {parts}"
