"""Single-process fine-tuning on a held-out 20% of flowers5 train/ (never valid/), without Ray:
    python benchmarks/ft_holdout.py --epochs 3 --lr 1e-3 [--size 224] [--arch efficientnet_lite2] [--freeze-early] [--tta 2,4]
        [--eval-views 160:1.0,...] [--ema 0.99,0.995]
Prints the head-only and per-epoch held-out accuracy (docs/training.md)."""

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dragons.dataconfig import DataConfig
from dragons.images import decode_to_base
from dragons.train.config import TrainConfig
from dragons.train.recipe import LOW_RES_CROP
from dragons.train.worker import Worker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers_hardening import Shard  # an in-memory Source: images already decoded, no Ray

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=128)
ap.add_argument("--arch", default="efficientnet_lite0")
ap.add_argument(
    "--ema",
    default="",
    help="comma-separated decays per step: also read out exponential moving averages of the weights",
)
ap.add_argument("--crop", type=float, default=LOW_RES_CROP)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--lr-mult", type=float, default=10.0)
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--bs", type=int, default=32)
ap.add_argument("--augment", default="light")
ap.add_argument("--n", type=int, default=0)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--wd", type=float, default=0.01)
ap.add_argument("--ls", type=float, default=0.0)
ap.add_argument("--head-lr", type=float, default=5e-3)
ap.add_argument("--freeze-early", action="store_true")
ap.add_argument("--tta", default="", help="comma-separated TTA view counts read out after the last epoch")
ap.add_argument(
    "--eval-views",
    default="",
    help="comma-separated SIZE:CROP eval views read out after the last epoch (test-time resolution)",
)
ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers5"))
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
root = Path(a.data) / "train"
classes = sorted(p.name for p in root.iterdir())
files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((root / c).iterdir())]
random.Random(42).shuffle(files)
if a.n:
    files = files[: a.n]
k = len(files) // 5
held, train = files[:k], files[k:]
cfg = TrainConfig(
    data="x",
    out="y",
    arch=a.arch,
    image_size=a.size,
    crop_pct=a.crop,
    batch_size=a.bs,
    lr=a.lr,
    lr_mult=a.lr_mult,
    augment=a.augment,
    weight_decay=a.wd,
    label_smoothing=a.ls,
    freeze_early=a.freeze_early,
)
side = DataConfig.create(a.size, a.crop, (0.5,) * 3, (0.5,) * 3).base_size


def load(fs):
    x = np.stack([decode_to_base(f.read_bytes(), side) for f, _ in fs])
    return Shard(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([c for _, c in fs]), torch.arange(len(fs)))


t0 = time.time()
tr, he = load(train), load(held)
print(f"decoded {len(train)}+{len(held)} at side {side} in {time.time() - t0:.0f}s", flush=True)
w = Worker(cfg, classes, None, torch.device("cpu"))
t0 = time.time()
feats, labels = w.features(tr)
hl, _ = w.fit_head(feats, labels, a.head_lr, 20)
p = w.predict(he)
vl, va = w.validate(p.y, p.probs)
print(f"head: train {hl:.3f} held loss {vl:.3f} acc {va:.4f} ({time.time() - t0:.0f}s)", flush=True)
steps = w.steps_per_epoch(tr)
opt, sched, _ = w.unfrozen_optimizer(cfg.lr, steps * a.epochs)
w.set_frozen(False)
emas = {}
if a.ema:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    emas = {
        d: AveragedModel(w.model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)
        for d in map(float, a.ema.split(","))
    }

    class _StepEMA:  # the schedule steps once per optimiser step: update the averages there
        def __init__(self, inner):
            self.inner = inner

        def step(self):
            self.inner.step()
            for m in emas.values():
                m.update_parameters(w.model)

    sched = _StepEMA(sched)
for e in range(a.epochs):
    t0 = time.time()
    tl = w.train_images(tr, opt, sched, frozen=False, net=w.model, epoch=e)
    t1 = time.time()
    p = w.predict(he)
    vl, va = w.validate(p.y, p.probs)
    print(
        f"epoch {e}: train {tl:.3f} held loss {vl:.3f} acc {va:.4f} train {t1 - t0:.0f}s ({len(train) / (t1 - t0):.1f} img/s) valid {time.time() - t1:.0f}s",
        flush=True,
    )
    for d, m in emas.items():
        live, w.model = w.model, m.module
        p = w.predict(he)
        el, ea = w.validate(p.y, p.probs)
        w.model = live
        print(f"epoch {e}: EMA {d}: held loss {el:.3f} acc {ea:.4f}", flush=True)
for n in [int(v) for v in a.tta.split(",") if v]:
    p = w.predict(he, tta=n)
    vl, va = w.validate(p.y, p.probs)
    print(f"tta {n}: held loss {vl:.3f} acc {va:.4f}", flush=True)
for view in [v for v in a.eval_views.split(",") if v]:
    from dragons.models.registry import get_spec
    from dragons.predictor import Predictor

    size, crop = int(view.split(":")[0]), float(view.split(":")[1])
    x = np.stack(
        [
            decode_to_base(f.read_bytes(), DataConfig.create(size, crop, (0.5,) * 3, (0.5,) * 3).base_size)
            for f, _ in held
        ]
    )
    spec, y = get_spec(cfg.arch), np.array([c for _, c in held])
    pred = Predictor(w.model, size, spec.mean, spec.std)
    probs = np.concatenate([pred.numpy(x[i : i + 64]) for i in range(0, len(x), 64)])
    nll = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1)).mean())
    print(f"eval view {size} px, crop {crop}: held loss {nll:.3f} acc {(probs.argmax(1) == y).mean():.4f}", flush=True)
