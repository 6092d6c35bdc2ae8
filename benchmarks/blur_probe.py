"""How much detail flowers5's frames hold, and what blur does to ImageNet features (docs/training.md):

    python benchmarks/blur_probe.py            # PSNR of down-and-up scaled frames; Lite0's ImageNet top-1 on blurred hymenoptera
    python benchmarks/blur_probe.py --probe    # also: a linear probe on flowers5 train/ (seed-42 20% held out), BN as is vs AdaBN
    python benchmarks/blur_probe.py --smallest # 8 frames and 8 photos: seconds, so the suite can run it

Never reads flowers5's valid/.
"""

from __future__ import annotations

import argparse
import copy
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from dragons.dataconfig import DataConfig
from dragons.images import decode_to_base
from dragons.models.efficientnet_lite import EfficientNetLite
from dragons.models.registry import LITE_MEAN, LITE_STD, _lite_state, build_model
from dragons.preprocess import eval_batch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ANT, BEE = 310, 309  # ImageNet class indices


def psnr_after_rescale(files: list[Path], side: int) -> float:
    """Median PSNR between each 128 px frame and the frame shrunk to ``side`` and blown up again."""
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        x = np.asarray(im, dtype=np.float32)
        y = np.asarray(im.resize((side, side), Image.BICUBIC).resize(im.size, Image.BICUBIC), dtype=np.float32)
        out.append(10 * np.log10(255**2 / max(((x - y) ** 2).mean(), 1e-9)))
    return float(np.median(out))


def imagenet_top1(model: torch.nn.Module, files: list[Path], blur: int | None, sharpen: int = 0) -> float:
    """Share of hymenoptera photos whose ImageNet top-1 is ant or bee, at 224 px (optionally blurred via ``blur`` px)."""
    hits = 0
    for i in range(0, len(files), 32):
        ims = []
        for f in files[i : i + 32]:
            im = Image.open(f).convert("RGB")
            if blur:
                im = im.resize((blur, blur), Image.BICUBIC)
            im = im.resize((224, 224), Image.BICUBIC)
            if sharpen:
                im = im.filter(ImageFilter.UnsharpMask(radius=sharpen, percent=100 + 50 * sharpen, threshold=0))
            ims.append(np.asarray(im, dtype=np.float32) / 255)
        x = (torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2) - 0.5) / 0.5
        with torch.inference_mode():
            hits += int(torch.isin(model(x).argmax(1), torch.tensor([ANT, BEE])).sum())
    return hits / len(files)


def linear_probe(size: int = 128) -> None:
    """Logistic regression on the frozen body's features: ImageNet BN statistics vs re-estimated on flowers5 (AdaBN)."""
    root = DATA / "flowers5" / "train"
    classes = sorted(p.name for p in root.iterdir())
    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((root / c).iterdir())]
    random.Random(42).shuffle(files)
    k = len(files) // 5
    side = DataConfig.create(size, 0.875, (0.5,) * 3, (0.5,) * 3).base_size

    def load(fs: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.stack([decode_to_base(f.read_bytes(), side) for f, _ in fs])
        return torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([c for _, c in fs])

    (xh, yh), (xt, yt) = load(files[:k]), load(files[k:])
    model = build_model("efficientnet_lite0", len(classes)).eval()

    def feats(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat(
                [m.body(eval_batch(x[i : i + 64], size, LITE_MEAN, LITE_STD)) for i in range(0, len(x), 64)]
            )

    adapted = copy.deepcopy(model)
    for mod in adapted.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # a plain average over every batch
            mod.train()
    with torch.no_grad():
        for i in range(0, len(xt), 64):
            adapted.body(eval_batch(xt[i : i + 64], size, LITE_MEAN, LITE_STD))
    adapted.eval()
    for name, m in (("ImageNet BN statistics", model), ("AdaBN (statistics of flowers5 train/)", adapted)):
        ft, fh = feats(m, xt), feats(m, xh)
        mu, sd = ft.mean(0), ft.std(0) + 1e-6
        a, b = (ft - mu) / sd, (fh - mu) / sd
        best = 0.0
        for wd in (1e-3, 1e-2, 3e-2, 1e-1):  # reported: the best L2 on the held-out part (an upper bound for the probe)
            lin = torch.nn.Linear(a.shape[1], len(classes))
            opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(lin(a), yt) + wd * lin.weight.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                best = max(best, (lin(b).argmax(1) == yh).float().mean().item())
        print(f"linear probe, {name}: held-out accuracy {best:.3f} ({len(yh)} images)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", action="store_true", help="also run the linear probe (a few minutes)")
    ap.add_argument("--smallest", action="store_true", help="8 frames and 8 photos, no probe (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    frames = sorted((DATA / "flowers5" / "train").glob("*/*"))[::40]
    photos = sorted((DATA / "hymenoptera" / "val").glob("*/*"))
    if args.smallest:  # spread over the classes: every class's frames, both ants and bees
        frames, photos = frames[:: max(1, len(frames) // 8)][:8], photos[:: max(1, len(photos) // 8)][:8]
    for side in (96, 64, 48, 32):
        print(
            f"flowers5 frames shrunk to {side} px and back: median PSNR {psnr_after_rescale(frames, side):.1f} dB ({len(frames)} frames)"
        )
    model = EfficientNetLite()
    model.load_state_dict(_lite_state(0)())
    model.eval()
    print(
        f"ImageNet top-1 is ant or bee, {len(photos)} hymenoptera val/ photos at 224 px: "
        f"sharp {imagenet_top1(model, photos, None):.3f}, blurred via 64 px {imagenet_top1(model, photos, 64):.3f}, "
        f"via 40 px {imagenet_top1(model, photos, 40):.3f}, via 64 px then sharpened {imagenet_top1(model, photos, 64, 2):.3f}"
    )
    if args.probe and not args.smallest:
        linear_probe()


if __name__ == "__main__":
    main()
