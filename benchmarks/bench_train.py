"""Training benchmark: wall time, images/s per epoch and the Ray session's peak memory.

    python benchmarks/bench_train.py                                   # flowers5 (4.3k images), defaults
    python benchmarks/bench_train.py --scale 20000 --scale 100000 --max-images 8000   # replicated sets
    python benchmarks/bench_train.py --data ../shared/data/hymenoptera --holdout --seeds 1,2,3,4,5
    python benchmarks/bench_train.py --set epochs=3 --set lr=2e-3      # other settings

``--scale N`` replicates train/ with hard links into a temporary folder until it
holds about N images (valid/ stays as it is), so the same decode-check,
streaming and precompute path runs over N images. ``--max-images`` caps every
pass (precompute, epochs, validation) at that many images: optimiser steps stay
affordable at 100k while time per image and memory are measured on the real path.

Memory: MemTotal - MemAvailable of the whole machine, sampled every 0.25 s over
the run, minus the idle figure measured before Ray starts: driver, Ray system
processes, workers, decode tasks and object store together (other processes
on the machine count too: run it on a quiet machine). Also the peak PSS of this
process and its descendants (the embedded Ray session, object store included),
which other jobs on a shared machine do not disturb. Not a test: figures
depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

T0 = time.perf_counter()  # "from command": before torch and Ray are imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATA = str(SHARED / "flowers5")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tta", type=int, default=0)
    p.add_argument("--holdout", action="store_true", help="validate on a seeded 20%% of train/ (for choosing defaults)")
    p.add_argument(
        "--seeds",
        default="",
        help="comma-separated seeds: one run per seed (with --holdout: one split each), totals printed",
    )
    p.add_argument(
        "--scale",
        type=int,
        action="append",
        default=[],
        help="replicate train/ to about N images (repeatable: one run per N)",
    )
    p.add_argument(
        "--max-images", type=int, default=0, help="cap every pass at this many images (TrainConfig.max_images)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    p.add_argument("--json", default="")
    return p


def _meminfo() -> int:
    """MemTotal - MemAvailable in bytes."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            fields[k] = int(v.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


def _session_pss() -> int:
    """PSS (bytes) of this process and all its descendants: the driver, the local
    Ray cluster it started (GCS, raylet, workers, decode tasks) and the object
    store's shared memory, shared pages counted once. Unlike MemAvailable it
    does not see other jobs on the machine."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


class MemSampler(threading.Thread):
    """Peaks of the machine's used memory and of this session's PSS."""

    def __init__(self, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak, self.peak_pss, self.stop_flag = every_s, 0, 0, threading.Event()
        self.tick = 0

    def run(self) -> None:
        while not self.stop_flag.is_set():
            self.peak = max(self.peak, _meminfo())
            if self.tick % 4 == 0:  # walking /proc costs more: once a second
                self.peak_pss = max(self.peak_pss, _session_pss())
            self.tick += 1
            time.sleep(self.every_s)

    def stop(self) -> int:
        self.stop_flag.set()
        self.join()
        return max(self.peak, _meminfo())


def replicate(src: str, n: int, dest: str) -> str:
    """train/ of ``src`` hard-linked into ``dest`` until about ``n`` images; valid/ linked once."""
    root = Path(src)
    train = sorted(p for p in (root / "train").rglob("*") if p.is_file())
    copies = max(1, round(n / max(1, len(train))))
    for p in train:
        rel = p.relative_to(root / "train")
        for k in range(copies):
            out = Path(dest) / "train" / rel.parent / f"r{k:03d}_{rel.name}"
            out.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, out)
    for vdir in ("valid", "val"):
        for p in (root / vdir).rglob("*") if (root / vdir).is_dir() else []:
            if p.is_file():
                out = Path(dest) / vdir / p.relative_to(root / vdir)
                out.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, out)
    return dest


def _overrides(pairs: list[str]) -> dict:
    from dragons.train.config import TrainConfig

    out: dict = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        if not hasattr(TrainConfig, k):
            raise SystemExit(f"error: --set {kv}: unknown field {k!r}; see `dragons train --help`")
        default = getattr(TrainConfig, k)
        if v == "auto" and k in TrainConfig.AUTO_FIELDS:
            out[k] = TrainConfig.AUTO_FIELDS[k]  # the recipe decides, as `dragons train --FIELD auto`
        else:
            out[k] = (v in ("1", "true", "True")) if isinstance(default, bool) else type(default)(v)
    return out


def main(args: argparse.Namespace) -> dict:
    if not Path(args.data).is_dir() and not args.data.startswith("s3://"):
        raise SystemExit(f"error: {args.data} is missing (a shared data set: see ../shared/data/README.md)")
    overrides = _overrides(args.set)
    if args.max_images:
        overrides["max_images"] = args.max_images
    if len(args.scale) > 1:
        # One process per point: each must start from the same idle machine,
        # with no Ray session (or imported torch) left over from the previous one.
        import subprocess

        figs = []
        for n in args.scale:
            argv = [a for a in sys.argv[1:]]
            cmd = [sys.executable, __file__, *_without_scales(argv), "--scale", str(n)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            print(proc.stdout, end="", flush=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not found:
                raise SystemExit(f"error: the point --scale {n} failed (exit {proc.returncode})")
            figs.append(json.loads(found[-1][len("RESULT ") :]))
        print(
            "SUMMARY "
            + json.dumps(
                [
                    {k: f[k] for k in ("n_train", "wall_s", "peak_mem_gb_above_idle", "peak_session_pss_gb_above_idle")}
                    | {"images_per_s": [e.get("images_per_s") for e in f["epochs"] if "images_per_s" in e]}
                    for f in figs
                ]
            ),
            flush=True,
        )
        _save(args, {"runs": figs})
        return {"runs": figs}
    if args.scale:
        figs = []
        for n in args.scale:
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
                t = time.perf_counter()
                data = replicate(args.data, n, tmp)
                print(
                    f"replicated to {data}: {sum(1 for _ in Path(data, 'train').rglob('*.*'))} train images in {time.perf_counter() - t:.1f}s",
                    flush=True,
                )
                figs.append(_one(args, overrides, data, time.perf_counter()))
        _save(args, {"runs": figs})
        return {"runs": figs}
    if not args.seeds:
        fig = _one(args, overrides, args.data, T0)
        _save(args, fig)
        return fig
    figs = [_one(args, {**overrides, "seed": int(s)}, args.data, time.perf_counter()) for s in args.seeds.split(",")]
    total = {
        "errors": sum(f["errors"] for f in figs),
        "n_valid": sum(f["n_valid"] for f in figs),
        "valid_loss_mean": round(sum(f["valid_loss"] for f in figs) / len(figs), 4),
        "per_seed_errors": [f["errors"] for f in figs],
        "wall_s_mean": round(sum(f["wall_s"] for f in figs) / len(figs), 1),
        "split": figs[0]["split"],
        "seeds": args.seeds,
        "overrides": overrides,
    }
    print("TOTAL " + json.dumps(total), flush=True)
    _save(args, {"total": total, "runs": figs})
    return total


def _without_scales(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--scale":
            skip = True
            continue
        if a.startswith("--scale=") or a.startswith("--json"):
            skip = a == "--json"
            continue
        out.append(a)
    return out


def _save(args: argparse.Namespace, obj: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(obj, indent=2))


def _one(args: argparse.Namespace, overrides: dict, data: str, t0: float) -> dict:
    from dragons.train.config import TrainConfig
    from dragons.train.run import train

    idle = min(_meminfo() for _ in range(3) if time.sleep(0.1) is None)
    idle_pss = _session_pss()
    sampler = MemSampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=data,
            out=f"{tmp}/model",
            workers=args.workers,
            tta=args.tta,
            ignore_valid=args.holdout,
            report=False,
            log_file=f"{tmp}/train.log",
            **overrides,
        )
        meta = train(cfg).meta
    peak = sampler.stop()
    wall = time.perf_counter() - t0
    m = meta["metrics"]
    n = meta["data"]["n_valid"]
    n_train = meta["data"]["n_train"]
    cap = overrides.get("max_images", 0)
    per_pass = min(n_train, cap) if cap else n_train
    epochs = [
        {
            "epoch": h["epoch"],
            "phase": h["phase"],
            "s": round(h["time"], 1),
            **({"images_per_s": round(per_pass / h["time"], 1)} if h["phase"] != "head" else {}),
            "accuracy": round(h["accuracy"], 4),
        }
        for h in meta["history"]
    ]
    fig = {
        "valid_accuracy": round(m["valid_accuracy"], 4),
        "valid_loss": round(m["valid_loss"], 4),
        "errors": round((1 - m["valid_accuracy"]) * min(n, cap or n)),
        "n_valid": n,
        "n_train": n_train,
        "images_per_pass": per_pass,
        "wall_s": round(wall, 1),
        "decode_check_s": meta["timing"]["decode_s"],
        "peak_mem_gb_above_idle": round((peak - idle) / 2**30, 2),
        "idle_gb": round(idle / 2**30, 2),
        "peak_session_pss_gb_above_idle": round((sampler.peak_pss - idle_pss) / 2**30, 2),
        "epochs": epochs,
        "recipe": meta.get("recipe"),
        "image_size": meta["image_size"],
        "split": "holdout 20% of train/" if args.holdout else "valid/",
        "overrides": overrides,
    }
    if "valid_accuracy_tta" in m:
        fig.update({"valid_accuracy_tta": round(m["valid_accuracy_tta"], 4), "tta": args.tta})
    print("RESULT " + json.dumps(fig), flush=True)
    return fig


if __name__ == "__main__":
    main(get_args_parser().parse_args())
