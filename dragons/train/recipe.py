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
  (on 4 augmented views, light augmentation) did as well as fastai's
  ``fine_tune`` (hymenoptera: 245 images, ~20 optimiser steps per epoch); from
  there on the body is fine-tuned for ``epochs_for(n)`` epochs, the head fitted
  on plain features first (augmented views buy nothing once the body trains on
  augmented images), with the ``default`` augmentation and label smoothing 0.1
  (more epochs see more varied images without over-fitting);
* discriminative rates: photos keep fastai's ``lr_mult`` 10 (early filters
  stay close to ImageNet's); small images, from ``FINE_TUNE_MIN_IMAGES`` on,
  train every layer at the same rate: flowers5's 128 px frames are blurred (no
  detail above ~50 px), so ImageNet's first filters, tuned to fine texture, are
  what most needs to change (held-out: 0.797 with 10, 0.815 with 1). With a few
  dozen steps (an explicit ``--epochs`` on a small set) the full rate moves the
  early filters before the warm-up ends and undoes the head's fit, so those
  keep 10.

Explicit flags always win: only fields still at their ``auto`` value change.
A run keeps what was decided at its start (``RECIPE_FILE`` in the run's
folder): ``--resume`` reuses it rather than deciding again from data that may
have changed since, so a run never switches recipe half-way.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from dragons.dataconfig import DEFAULT_CROP_PCT
from dragons.errors import DragonsError
from dragons.train.config import AUTO, AUTO_AUGMENT, TrainConfig

RECIPE_FILE = "recipe.json"  # in the run's folder: what resolve decided at the run's start
FINE_TUNE_MIN_IMAGES = 1000  # below: head only; hymenoptera (245) never gained from fine-tuning
HIGH_RES_SIDE = 320  # shorter side at which 224 px crops of a 320 px square need no upsampling
HIGH_RES = (224, DEFAULT_CROP_PCT)  # (image_size, crop_pct) for photos
LOW_RES_CROP = 0.875  # crop for images below HIGH_RES_SIDE: keep most of a small frame
HEAD_VIEWS_HEAD_ONLY = 4  # augmented views for a head that is the whole recipe
AUGMENT_HEAD_ONLY = "light"  # hymenoptera's held-out splits: light beat default for head views
AUGMENT_FINE_TUNE = "default"  # more varied images for 5 epochs (flowers5 held-out, with smoothing 0.1: docs/training.md); also used for larger sets, unmeasured there
LABEL_SMOOTHING_HEAD_ONLY = 0.0
LABEL_SMOOTHING_FINE_TUNE = 0.1
LR_MULT_PHOTOS = 10.0  # fastai's slice(lr / 10, lr) for images at ImageNet's scale
LR_MULT_SMALL = 1.0  # one rate for every layer: images below HIGH_RES_SIDE, FINE_TUNE_MIN_IMAGES or more


def epochs_for(n_train: int) -> int:
    """Fine-tuning epochs: a few thousand images need a few passes; beyond ~20k
    one or two passes see enough steps (and keep the time linear in N)."""
    if n_train < FINE_TUNE_MIN_IMAGES:
        return 0
    if n_train < 10_000:
        return 5  # flowers5 held-out split: 0.794 after the old 3 epochs; this recipe 0.815 after 5, 0.818 after 6 (docs/training.md)
    if n_train < 20_000:
        return 3
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
    if cfg.augment == AUTO_AUGMENT:
        chosen["augment"] = AUGMENT_HEAD_ONLY if epochs == 0 else AUGMENT_FINE_TUNE
    if cfg.label_smoothing == AUTO["label_smoothing"]:
        chosen["label_smoothing"] = LABEL_SMOOTHING_HEAD_ONLY if epochs == 0 else LABEL_SMOOTHING_FINE_TUNE
    if cfg.lr_mult == AUTO["lr_mult"]:
        small = epochs > 0 and 0 < short_side < HIGH_RES_SIDE and n_train >= FINE_TUNE_MIN_IMAGES
        chosen["lr_mult"] = LR_MULT_SMALL if small else LR_MULT_PHOTOS
    return dataclasses.replace(cfg, **chosen), chosen


# The fields the recipe decides: what a run's RECIPE_FILE keeps, auto or not.
RECIPE_FIELDS = (*AUTO, "augment")


def resume(
    cfg: TrainConfig, saved: dict[str, Any], n_train: int, short_side: int
) -> tuple[TrainConfig, dict[str, Any]]:
    """``resolve`` for a resumed run: every field still at ``auto`` takes the value
    the run started with (``saved``: a RECIPE_FILE read by :func:`from_json`),
    whether the recipe chose it or a flag gave it then, so leaving a flag off
    on ``--resume`` changes nothing. A field the file lacks (a run started by
    an older dragons) is decided as usual. Returns the config and what was taken
    from the file or decided now."""
    auto = set(cfg.unresolved())
    kept = {k: v for k, v in saved["settings"].items() if k in auto}
    cfg, more = resolve(dataclasses.replace(cfg, **kept), n_train, short_side)
    return cfg, {**kept, **more}


def to_json(cfg: TrainConfig, chosen: dict[str, Any], classes: list[str], n_train: int, short_side: int) -> bytes:
    """A run's RECIPE_FILE: every recipe field's value (``cfg`` resolved), what
    ``auto`` chose, the classes, and the facts the choice was made from."""
    return json.dumps(
        {
            "settings": {k: getattr(cfg, k) for k in RECIPE_FIELDS},
            "chosen": chosen,
            "classes": classes,
            "n_train": n_train,
            "median_short_side": short_side,
        },
        indent=1,
    ).encode()


def from_json(raw: bytes, where: str) -> dict[str, Any]:
    """A RECIPE_FILE's contents, checked."""
    try:
        saved = json.loads(raw)
        if not isinstance(saved.get("settings"), dict) or not isinstance(saved.get("classes"), list):
            raise TypeError("no 'settings' object or 'classes' list")
        int(saved["n_train"]), int(saved["median_short_side"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DragonsError(
            f"--resume: {where} is not a recipe file dragons wrote ({exc}); "
            "delete it to decide the recipe again from the data"
        ) from None
    return saved


def describe(chosen: dict[str, Any], n_train: int, short_side: int) -> str:
    if not chosen:
        return ""
    parts = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in chosen.items())
    return f"recipe (auto) for {n_train} images, median shorter side {short_side} px: {parts}"
