"""The adaptive recipe: what `auto` becomes for a small and a larger data set; flags win."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragons.errors import DragonsError
from dragons.train.config import TrainConfig
from dragons.train.recipe import FINE_TUNE_MIN_IMAGES, from_json, resolve, resume, to_json


def test_rule_small_photos_head_only_large_small_images_fine_tuned() -> None:
    small, chosen = resolve(TrainConfig(), n_train=245, short_side=375)  # hymenoptera-like
    assert (small.epochs, small.head_views, small.image_size, small.crop_pct) == (0, 4, 224, 0.7)
    assert (small.augment, small.label_smoothing, small.lr_mult) == ("light", 0.0, 10.0)  # a head alone
    assert set(chosen) == {"epochs", "head_views", "image_size", "crop_pct", "augment", "label_smoothing", "lr_mult"}
    assert not small.unresolved()
    large, _ = resolve(TrainConfig(), n_train=3443, short_side=128)  # flowers5-like
    assert large.epochs >= 2 and large.head_views == 0
    assert (large.image_size, large.crop_pct) == (128, 0.875)  # the data's own resolution
    assert (large.augment, large.label_smoothing, large.lr_mult) == ("default", 0.1, 1.0)  # every layer adapts
    huge, _ = resolve(TrainConfig(), n_train=500_000, short_side=600)
    assert 1 <= huge.epochs < large.epochs and huge.image_size == 224
    assert (huge.augment, huge.label_smoothing, huge.lr_mult) == ("default", 0.1, 10.0)  # photos: fastai's slice
    # Fine-tuning forced on a small set of small images keeps the slice: a few
    # dozen steps at the full rate undo the head's fit (tests/test_finetune.py).
    forced, _ = resolve(TrainConfig(epochs=2), n_train=80, short_side=128)
    assert (forced.augment, forced.label_smoothing, forced.lr_mult) == ("default", 0.1, 10.0)


def test_explicit_flags_win() -> None:
    cfg = TrainConfig(
        epochs=2, image_size=160, crop_pct=0.8, head_views=1, augment="strong", label_smoothing=0.0, lr_mult=3.0
    )
    out, chosen = resolve(cfg, n_train=20, short_side=50)
    assert chosen == {} and out == cfg
    out, chosen = resolve(TrainConfig(epochs=0), n_train=50_000, short_side=128)
    assert out.epochs == 0 and out.head_views == 4 and "epochs" not in chosen


def test_resume_keeps_the_runs_first_choice() -> None:
    """A resumed run does not decide again: the data may have grown since its start,
    and a flag given at the start but left off on --resume keeps its value."""
    first_cfg, chosen = resolve(TrainConfig(), n_train=3443, short_side=128)
    saved = from_json(to_json(first_cfg, chosen, ["a", "b"], 3443, 128), "recipe.json")
    assert saved["chosen"] == chosen and saved["classes"] == ["a", "b"]
    # Resumed on data that would now choose a head alone at 224 px: the run keeps its recipe.
    again, kept = resume(TrainConfig(resume=True), saved, n_train=245, short_side=375)
    assert (again.epochs, again.image_size, again.lr_mult, again.augment) == (first_cfg.epochs, 128, 1.0, "default")
    assert kept == chosen and not again.unresolved()
    assert resolve(TrainConfig(), n_train=245, short_side=375)[0].epochs == 0  # what deciding again would have done
    # A flag given at the start (--epochs 3 on 500 images) and left off on --resume keeps its value.
    flagged, _ = resolve(TrainConfig(epochs=3), n_train=500, short_side=375)
    saved = from_json(to_json(flagged, {}, ["a", "b"], 500, 375), "recipe.json")
    resumed, _ = resume(TrainConfig(resume=True), saved, n_train=500, short_side=375)
    assert resumed.epochs == 3 and resumed.augment == "default" and resumed.label_smoothing == 0.1
    # An explicit flag on --resume still wins; a field the file lacks is decided as usual.
    saved["settings"].pop("label_smoothing")
    mixed, _ = resume(TrainConfig(augment="strong"), saved, n_train=500, short_side=375)
    assert mixed.augment == "strong" and mixed.epochs == 3 and mixed.label_smoothing == 0.1 and not mixed.unresolved()
    for bad in (b"[1, 2]", b'{"chosen": {}}', b"not json"):
        with pytest.raises(DragonsError, match="recipe.json is not a recipe file"):
            from_json(bad, "recipe.json")


def test_rule_applied_to_synthetic_sets(ray_session: None, workdir: Path) -> None:
    """The driver's decode check measures what the rule needs, on real files."""
    from dragons.data import discover
    from dragons.local.synth import write_dataset
    from dragons.train.plan import scan_folder

    for name, n, size, expect_epochs, expect_size in (
        ("small", 12, (480, 360), 0, 224),
        ("larger", FINE_TUNE_MIN_IMAGES // 2 + 8, (64, 64), None, 64),
    ):
        root = workdir / f"recipe-{name}"
        write_dataset(str(root), ["a", "b"], n_train=n, n_valid=2, seed=1, size=size, quality=70)
        folder = discover(str(root))
        good, bad, short = scan_folder(folder, 10**8, progress_s=60)
        assert not bad and len(good["train"]) == 2 * n
        cfg, _ = resolve(TrainConfig(), len(good["train"]), short)
        assert cfg.image_size == expect_size
        if expect_epochs is not None:
            assert cfg.epochs == expect_epochs
        else:
            assert cfg.epochs > 0 and cfg.crop_pct == 0.875
