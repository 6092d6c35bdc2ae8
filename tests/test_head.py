"""The precompute phase without Ray: eval view, augmented views, crop_pct."""

from __future__ import annotations

import torch
from helpers_hardening import Shard, head_only_settings

from dragons.dataconfig import DEFAULT_CROP_PCT, LEGACY_CROP_PCT, DataConfig
from dragons.preprocess import eval_batch
from dragons.train.config import TrainConfig
from dragons.train.worker import Worker


def _worker(**kw: object) -> Worker:
    kw = {**head_only_settings(), **kw}  # settled, as recipe.resolve leaves them
    cfg = TrainConfig(data="x", out="y", image_size=64, **kw)  # type: ignore[arg-type]
    return Worker(cfg, ["a", "b"], None, torch.device("cpu"))


def _shard(n: int = 6, side: int = 80) -> Shard:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    return Shard(x, torch.arange(n) % 2, torch.arange(n))


def test_base_size_follows_crop_pct() -> None:
    def base(size: int, crop: float) -> int:
        return DataConfig.create(size, crop, (0.5,) * 3, (0.5,) * 3).base_size

    assert base(224, 0.875) == 256  # torchvision's resize 256 / crop 224
    assert base(224, DEFAULT_CROP_PCT) == 320  # the photo default (recipe.HIGH_RES)
    # model.json keeps it; artifacts from before data_config read as they were written.
    new = DataConfig.create(224, 0.7, (0.5,) * 3, (0.5,) * 3)
    assert DataConfig.from_meta({"data_config": new.to_dict()}) == new
    old = DataConfig.from_meta({"image_size": 224, "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    assert (old.base_size, old.crop_pct) == (256, LEGACY_CROP_PCT)
    assert (
        DataConfig.from_meta(
            {"image_size": 224, "base_size": 320, "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}
        ).base_size
        == 320
    )


def test_eval_view_is_the_centre_crop_and_augmented_views_differ() -> None:
    w = _worker()
    shard = _shard()
    plain, labels = w.features(shard)
    assert plain.shape == (6, w.model.num_features) and plain.dtype == torch.float16  # stored compactly
    assert torch.equal(labels, shard.y)
    # The plain features are those of the centre crop, the view evaluation and scoring use.
    with torch.inference_mode():
        expect = w.model.body(eval_batch(shard.x, 64, w.mean, w.std))
    assert torch.allclose(plain.float(), expect, atol=2e-2, rtol=1e-2)
    three, labels3 = w.features(shard, views=2)
    assert three.shape == (18, w.model.num_features) and torch.equal(labels3, shard.y.repeat(3))
    assert torch.allclose(three[:6].float(), plain.float())  # rows 0..n-1: the plain view
    a1, a2 = three[6:12].float(), three[12:].float()
    plain = plain.float()
    assert (a1 - plain).abs().max() > 1e-3 and (a1 - a2).abs().max() > 1e-3  # random views, new each pass


def test_head_fits_on_plain_plus_augmented_views() -> None:
    w = _worker(head_views=2, batch_size=4)
    shard = _shard(8)
    feats, labels = w.features(shard, views=2)
    before = w.model.head[-1].weight.detach().clone()
    loss, curve = w.fit_head(feats, labels, lr=1e-2, epochs=5)
    assert loss == loss and loss < 0.7  # finite, and below chance (ln 2) on its own training set
    assert not torch.equal(before, w.model.head[-1].weight)
    assert curve == []  # no valid features given: no curve
    _, curve = w.fit_head(feats, labels, lr=1e-2, epochs=3, valid=(feats[:8], shard.y.numpy()))
    assert len(curve) == 3 and all(set(p) == {"train_loss", "valid_loss", "accuracy"} for p in curve)


def test_bn_stats_off_keeps_imagenet_running_statistics() -> None:
    from dragons.train.schedule import one_cycle

    for bn_stats in (False, True):
        w = _worker(bn_stats=bn_stats, batch_size=4)
        bn = next(m for m in w.model.body.modules() if isinstance(m, torch.nn.BatchNorm2d))
        before = bn.running_mean.clone()
        opt = torch.optim.AdamW(w.model.parameters(), lr=1e-4)
        w.train_images(_shard(8), opt, one_cycle(opt, [1e-4], 2), frozen=False, net=w.model)
        assert torch.equal(bn.running_mean, before) is (not bn_stats)
        assert w.model.head[-1].weight.grad is not None  # the network itself still trained


def test_fine_tuning_leaves_the_early_body_frozen_unless_asked() -> None:
    """``freeze_early`` (default): the unfrozen phase steps the late body and the
    head only; the early half gets no gradient (nor autograd's backward cost)."""
    for freeze_early in (True, False):
        w = _worker(freeze_early=freeze_early)
        early, late, head = w.model.layer_groups()
        before = {id(p): p.detach().clone() for p in early + late}
        w.set_frozen(False)
        opt, sched, max_lrs = w.unfrozen_optimizer(1e-2, 4)
        assert len(max_lrs) == (2 if freeze_early else 3) == len(opt.param_groups)
        w.train_images(_shard(8), opt, sched, frozen=False, net=w.model)
        moved = lambda ps: sum(not torch.equal(before[id(p)], p.detach()) for p in ps)  # noqa: E731
        assert moved(late) > 0
        if freeze_early:
            assert moved(early) == 0 and all(p.grad is None for p in early)
        else:
            assert moved(early) > 0
