"""Forward+backward CPU time per image of Lite0 at 128 px, early body trained or frozen, channels_last or not (one thread).

    python benchmarks/step_speed.py              # batch 16 at 128 px, best of 3 (half a minute)
    python benchmarks/step_speed.py --smallest   # batch 2 at 64 px, one timed step (seconds)

--smallest is there so that tests/test_benchmarks.py can run the script in seconds.
"""

import argparse
import time

import torch

from dragons.models.registry import build_model as create_model

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--smallest", action="store_true", help="batch 2 at 64 px, one timed step (a smoke run)")
args = ap.parse_args()
torch.set_num_threads(1)
m = create_model("efficientnet_lite0", 5, "imagenet") if True else None
m.train()
for mod in m.body.modules():
    if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
        mod.eval()
groups = m.layer_groups()


def run(cl, freeze_early, bs=16, size=128, reps=3):
    for p in m.parameters():
        p.requires_grad_(True)
    if freeze_early:
        for p in groups[0]:
            p.requires_grad_(False)
    x = torch.randn(bs, 3, size, size)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
        m.to(memory_format=torch.channels_last)
    else:
        m.to(memory_format=torch.contiguous_format)
    y = torch.randint(0, 5, (bs,))
    ts = []
    for i in range(reps + 1):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        ts.append(time.perf_counter() - t)
    with torch.inference_mode():
        t = time.perf_counter()
        m(x)
        fwd = time.perf_counter() - t
    print(
        f"cl={cl} freeze_early={freeze_early} size={size}: fwd+bwd {min(ts[1:]) / bs * 1000:.1f} ms/img, fwd only {fwd / bs * 1000:.1f} ms/img",
        flush=True,
    )


for cl in (True, False):
    for fe in (False, True):
        run(cl, fe, bs=2, size=64, reps=1) if args.smallest else run(cl, fe)
