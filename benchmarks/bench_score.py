"""Scoring benchmark: end-to-end `dragons score` against the model-only bound.

    python benchmarks/bench_score.py --n 2000

Writes N photo-like JPEGs into a local S3 endpoint, then measures in one run:
(a) the bound: the same (fused, fp32) model on pre-decoded tensors in this one
    process with every core, at its best batch size and memory format;
(b) `dragons score` end to end: list S3, read, decode, preprocess, infer, write
    Parquet and commit, on an embedded Ray sharing the same cores.
Prints images/s for each, their ratio, and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="images to score")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=0, help="dragons score batch size (0 = its default)")
    p.add_argument("--actors", type=int, default=0)
    p.add_argument("--json", default="", help="also write the figures here")
    return p


def _make_images(n: int, bucket: str) -> None:
    import io

    import numpy as np

    from dragons.storage import boto3_client
    from dragons.local.synth import STYLES, draw_dragon

    client = boto3_client()
    names = list(STYLES)[:2]

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        img = draw_dragon(STYLES[names[i % 2]], rng, (int(rng.integers(400, 640)), int(rng.integers(300, 480))))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        client.put_object(Bucket=bucket, Key=f"images/{names[i % 2]}/{i:06d}.jpg", Body=buf.getvalue())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def _bound(model_uri: str, uris: list[str], sample: int) -> dict[str, float]:
    """Best images/s of the model alone, every core, over batch sizes and layouts."""
    import numpy as np
    import torch

    from dragons import artifact, storage
    from dragons.models.fuse import fuse_for_inference
    from dragons.preprocess import decode_to_base, eval_batch, to_tensor

    torch.set_num_threads(os.cpu_count() or 1)
    art = artifact.load(model_uri)
    model = fuse_for_inference(art.model.eval())
    fs, _ = storage.filesystem(uris[0])
    x_all = to_tensor(np.stack([decode_to_base(storage.read_bytes(u, fs), art.base_size) for u in uris[:sample]]))

    def rate(layout: str, bs: int, passes: int) -> float:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        m = model.to(memory_format=fmt)
        with torch.inference_mode():
            batches = [eval_batch(x_all[i : i + bs], art.image_size, art.mean, art.std).contiguous(memory_format=fmt)
                       for i in range(0, sample, bs)]
            m(batches[0])  # warm-up
            t = time.perf_counter()
            for _ in range(passes):
                for b in batches:
                    m(b).softmax(1)
            return passes * sample / (time.perf_counter() - t)

    sweep = []
    for layout in ("contiguous", "channels_last"):
        for bs in (1, 2, 4, 8, 16, 32):
            r = rate(layout, bs, 1)
            sweep.append((r, layout, bs))
            print(f"  bound  batch {bs:>3}  {layout:<13} {r:7.1f} images/s", flush=True)
    # A one-second sweep point on a shared VM can be a lucky burst, and the max
    # of twelve noisy points is biased upwards. Re-measure the three best for
    # longer and take each one's median: the bound is the best of those.
    best = {"images_per_s": 0.0}
    for _, layout, bs in sorted(sweep, reverse=True)[:3]:
        r = statistics.median(rate(layout, bs, 2) for _ in range(3))
        print(f"  bound  batch {bs:>3}  {layout:<13} {r:7.1f} images/s (median of 3 longer runs)", flush=True)
        if r > best["images_per_s"]:
            best = {"images_per_s": r, "batch_size": bs, "layout": layout}  # type: ignore[dict-item]
    return best


def _cpu_group(cmdline: str, pid: int) -> str:
    if pid == os.getpid():
        return "driver (list, write Parquet)"
    if "moto.server" in cmdline:
        return "S3 endpoint (moto)"
    if "Scorer" in cmdline:
        return "scoring actors (model)"
    if "DecodeBatch" in cmdline or cmdline.startswith("ray::IDLE"):
        return "decode tasks (GET + JPEG)"
    if "ray" in cmdline:
        return "Ray system (raylet, GCS, dashboard, Data actors)"
    return ""


class _Monitor:
    """Peak used memory above the baseline, and CPU seconds per process group.

    Sampled every 0.5 s over every process on the machine, so the CPU of worker
    processes that exit before the end (actors) is counted too.
    """

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.base = psutil.virtual_memory().used
        self.peak = 0
        self.start: dict[int, float] = {p.pid: self._cpu(p) for p in psutil.process_iter()}
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu(p: "object") -> float:
        try:
            t = p.cpu_times()  # type: ignore[attr-defined]
            return float(t.user + t.system)
        except Exception:
            return 0.0

    def _sample(self) -> None:
        for p in self.psutil.process_iter():
            try:
                group = _cpu_group(" ".join(p.cmdline()), p.pid)
            except Exception:
                continue
            if group:
                self.last[p.pid] = (group, self._cpu(p) - self.start.get(p.pid, 0.0))

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.psutil.virtual_memory().used - self.base)
            self._sample()
            time.sleep(0.5)

    def cpu_by_group(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for group, secs in self.last.values():
            out[group] = out.get(group, 0.0) + max(0.0, secs)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def __enter__(self) -> "_Monitor":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()


def main(args: argparse.Namespace) -> dict[str, float]:
    import ray

    from dragons import artifact, storage
    from dragons.local import s3server
    from dragons.models.registry import build_model, get_spec
    from dragons.preprocess import base_size_for
    from dragons.raycluster import ensure_ray
    from dragons.score.pipeline import ScoreConfig, score

    server = s3server.start()
    server.apply_env()
    try:
        s3server.create_bucket("bench")
        t = time.perf_counter()
        _make_images(args.n, "bench")
        print(f"wrote {args.n} JPEGs to s3://bench/images in {time.perf_counter() - t:.0f}s", flush=True)
        spec = get_spec(args.arch)
        model = build_model(args.arch, 2, "imagenet")
        model_uri = "s3://bench/model"
        artifact.save(model_uri, model, {"arch": args.arch, "classes": ["drogon", "viserion"], "image_size": 224,
                                         "base_size": base_size_for(224), "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
                                         "metrics": {}})
        uris = [e.uri for e in storage.list_files("s3://bench/images")]
        print("model-only bound (one process, every core, pre-decoded tensors):", flush=True)
        bound = _bound(model_uri, uris, sample=min(192, len(uris)))

        ensure_ray(no_progress_timeout_s=600)
        with tempfile.TemporaryDirectory() as tmp, _Monitor() as mem:
            t = time.perf_counter()
            extra = {"batch_size": args.batch_size} if args.batch_size else {}
            m = score(ScoreConfig(model=model_uri, input="s3://bench/images", output=f"{tmp}/table", run_id="bench",
                                  actors=args.actors, log_file=f"{tmp}/log", **extra))
            wall = time.perf_counter() - t
        assert m["rows"] == args.n and m["errors"] == 0, m
        e2e = args.n / wall
        figures = {"n": args.n, "cpus": os.cpu_count() or 0, "bound_images_per_s": round(bound["images_per_s"], 2),
                   "bound_batch_size": bound.get("batch_size"), "bound_layout": bound.get("layout"),
                   "e2e_images_per_s": round(e2e, 2), "e2e_wall_s": round(wall, 2), "ratio": round(e2e / bound["images_per_s"], 3),
                   "peak_memory_mb": round(mem.peak / 2**20)}
        print(f"\nbound {figures['bound_images_per_s']} images/s (batch {figures['bound_batch_size']}, {figures['bound_layout']}); "
              f"dragons score end to end {figures['e2e_images_per_s']} images/s ({args.n} images in {wall:.1f}s); "
              f"ratio {figures['ratio']}; peak memory +{figures['peak_memory_mb']} MB", flush=True)
        cpu = mem.cpu_by_group()
        figures["cpu_s"] = {k: round(v, 1) for k, v in cpu.items()}
        # Where the two cores went: the model's share is what the ratio can reach.
        print(f"CPU seconds during the run ({sum(cpu.values()):.0f} of {wall * (os.cpu_count() or 1):.0f} available):")
        for group, secs in cpu.items():
            print(f"  {group:<50} {secs:6.1f} s  {1000 * secs / args.n:5.1f} ms/image")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return figures
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
