"""One short GPU check (run on a lent GPU machine, never in CI).

Exercises the GPU paths that CPU CI cannot: bf16 autocast + channels_last
training steps of the per-worker loop, TTA prediction, and the fused scoring
model's throughput on CUDA. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers_hardening.Shard: images in memory

import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers_hardening import Shard  # noqa: E402

from dragons.models.fuse import fuse_for_inference  # noqa: E402
from dragons.preprocess import eval_batch  # noqa: E402
from dragons.train.config import TrainConfig  # noqa: E402
from dragons.train.recipe import resolve  # noqa: E402
from dragons.train.worker import Worker  # noqa: E402

assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda")
out: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
# What the recipe decides for a small photo set (head only), at this check's size.
cfg, _ = resolve(
    TrainConfig(data="x", out="y", batch_size=64, image_size=224, crop_pct=0.875), n_train=245, short_side=375
)
w = Worker(cfg, ["a", "b"], None, dev)
out["amp_dtype"] = str(w.amp_dtype)
n = 512
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.integers(0, 255, (n, 3, 256, 256), dtype=np.uint8))
y = torch.from_numpy((np.arange(n) % 2).astype(np.int64))
x[y == 1, 0] = 255  # a learnable difference: class 1 is red
shard = Shard(x, y, torch.arange(n))
params = [{"params": g, "lr": 1e-3} for g in w.model.layer_groups()]
opt = torch.optim.AdamW(params)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
steps = n // cfg.batch_size
t = time.perf_counter()
loss0 = w.train_images(shard, opt, sched, frozen=False, net=w.model, epoch=0)
loss1 = w.train_images(shard, opt, sched, frozen=False, net=w.model, epoch=1)
torch.cuda.synchronize()
out["train_images_per_s"] = round(2 * steps * cfg.batch_size / (time.perf_counter() - t), 1)
out["train_loss_epoch1_epoch2"] = [round(loss0, 4), round(loss1, 4)]
preds = w.predict(shard, tta=4)  # the one inference path (dragons.predictor), bf16 autocast on the GPU
out["tta_accuracy"] = round(float((preds.probs.argmax(1) == preds.y).mean()), 4)
model = fuse_for_inference(w.model.eval()).to(memory_format=torch.channels_last)
best = {}
for bs in (64, 256):
    xb = eval_batch(x[:bs].to(dev), 224, w.mean, w.std)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(xb)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            model(xb).float().softmax(1)
        torch.cuda.synchronize()
    best[bs] = round(20 * bs / (time.perf_counter() - t), 1)
out["fused_bf16_inference_images_per_s"] = best
print(json.dumps(out))
