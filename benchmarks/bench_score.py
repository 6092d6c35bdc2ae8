"""Scoring benchmark: `dragons score` against the model-only bound and two peers.

    python benchmarks/bench_score.py --n 2000 10000 --source both --json bench.json
    python benchmarks/bench_score.py --smallest     # N = 20 from local disk, peers on, a one-point bound: the suite's size

Writes max(N) photo-like JPEGs once to a local folder and uploads the same bytes
to a local S3 endpoint (moto), then measures in one run, for each N (the first N
images) and each source (local disk, S3):
(a) the bound: the same (fused, fp32) model on pre-decoded tensors in this one
    process with every core, at its best batch size and memory format;
(b) `dragons score` end to end: list, read, decode, preprocess, infer, write
    Parquet and commit, on an embedded Ray sharing the same cores;
(c) peer A: the hand-written torch DataLoader loop a practitioner writes
    (PIL decode in 2 worker processes, unfused model in the main process, one
    Parquet file at the end);
(d) peer B: Ray Data's documented recipe, read_images + an actor-pool
    map_batches classifier + write_parquet, on the same embedded Ray.
Peers run only at N <= --peers-max-n (issue 11 compares them at N = 2,000).
Prints images/s for each, the ratios, issue 11's done-when checks, and peak memory.
--smallest exists so that the test suite can run every stage in seconds: the bound's
sweep of 12 points and 9 re-runs costs a minute of a busy 2-core machine at any N.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # module level: peer A's Dataset subclasses torch's

import dragons  # noqa: F401  (before anything imports ray: it turns on Ray token auth)

# Issue 11's done-when thresholds.
BOUND_RATIO_TARGET = 0.75  # dragons score >= 0.75 x the bound, local disk, N = 10,000
PEER_RATIO_TARGET = 1.5  # dragons score >= 1.5 x each peer, N = 2,000, local and S3
PEER_BATCH_SIZE = 16  # what both peers use: a typical hand-picked batch size


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--n", type=int, nargs="+", default=[2000], help="image counts to score (the first N of max(N) images)"
    )
    p.add_argument("--source", choices=("local", "s3", "both"), default="both", help="where the images are read from")
    p.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run peer A (DataLoader loop) and peer B (Ray Data recipe)",
    )
    p.add_argument("--peers-max-n", type=int, default=2000, help="run the peers only at sizes up to this")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=0, help="dragons score batch size (0 = its default)")
    p.add_argument("--actors", type=int, default=0)
    p.add_argument(
        "--timeout-s",
        type=float,
        default=3600.0,
        help="each stage (write images, bound, one scoring run) must finish within this, else the run exits 124",
    )
    p.add_argument("--json", default="", help="also write the figures here")
    p.add_argument(
        "--smallest", action="store_true", help="N=20, local, peers on, the bound at one point (a smoke run)"
    )
    return p


@contextmanager
def _deadline(stage: str, timeout_s: float, on_timeout: Callable[[], None]) -> Iterator[None]:
    """Exit the whole process (code 124) if ``stage`` outlives ``timeout_s``.

    A hung Ray job or DataLoader blocks in C code where no Python exception can
    reach it; a benchmark must end, so a timer thread stops the S3 endpoint and
    leaves with os._exit. Ray's own processes share the driver's fate and go too.
    """

    def fire() -> None:
        print(f"\nTIMEOUT: {stage} did not finish within {timeout_s:.0f}s; exiting", flush=True)
        try:
            on_timeout()
        finally:
            os._exit(124)

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _layout(sizes: list[int]) -> tuple[Callable[[int], str], Callable[[int], str]]:
    """(relative key of image i, relative prefix holding exactly the first N images).

    Nested folders, one per size, largest outside: image i lives inside the
    folder of every size > i, so listing a size's folder yields its first N
    images, and max(N) images are written once, not once per size.
    """
    desc = sorted(set(sizes), reverse=True)

    def prefix(n: int) -> str:
        return "/".join(f"n{s}" for s in desc if s >= n)

    def key(i: int) -> str:
        return "/".join([*(f"n{s}" for s in desc if i < s), f"{i:06d}.jpg"])

    return key, prefix


def _make_images(n: int, key: Callable[[int], str], local_root: str, bucket: str, s3: bool) -> None:
    """Draw n JPEGs, write each to local_root, then upload the same bytes to S3."""
    import numpy as np

    from dragons.local.synth import STYLES, draw_dragon
    from dragons.storage import boto3_client

    client = boto3_client(max_pool_connections=16) if s3 else None
    names = list(STYLES)[:2]

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        img = draw_dragon(STYLES[names[i % 2]], rng, (int(rng.integers(400, 640)), int(rng.integers(300, 480))))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        path = Path(local_root, key(i))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if client is not None:
            client.put_object(Bucket=bucket, Key=f"images/{key(i)}", Body=data)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def _bound(model_uri: str, uris: list[str], sample: int, smallest: bool = False) -> dict[str, float]:
    """Best images/s of the model alone, every core, over batch sizes and layouts (at one point if ``smallest``)."""
    import numpy as np
    import torch

    from dragons import artifact, storage
    from dragons.images import decode_to_base
    from dragons.models.fuse import fuse_for_inference
    from dragons.preprocess import eval_batch, to_tensor

    torch.set_num_threads(os.cpu_count() or 1)
    art = artifact.load(model_uri)
    model = fuse_for_inference(art.model.eval())
    fs, _ = storage.filesystem(uris[0])
    x_all = to_tensor(np.stack([decode_to_base(storage.read_bytes(u, fs), art.data.base_size) for u in uris[:sample]]))

    def rate(layout: str, bs: int, passes: int) -> float:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        m = model.to(memory_format=fmt)
        with torch.inference_mode():
            batches = [
                eval_batch(x_all[i : i + bs], art.data.image_size, art.data.mean, art.data.std).contiguous(
                    memory_format=fmt
                )
                for i in range(0, sample, bs)
            ]
            m(batches[0])  # warm-up
            t = time.perf_counter()
            for _ in range(passes):
                for b in batches:
                    m(b).softmax(1)
            return passes * sample / (time.perf_counter() - t)

    sweep = []
    for layout in ("channels_last",) if smallest else ("contiguous", "channels_last"):
        for bs in (8,) if smallest else (1, 2, 4, 8, 16, 32):
            r = rate(layout, bs, 1)
            sweep.append((r, layout, bs))
            print(f"  bound  batch {bs:>3}  {layout:<13} {r:7.1f} images/s", flush=True)
    # A one-second sweep point on a shared VM can be a lucky burst, and the max
    # of twelve noisy points is biased upwards. Re-measure the three best for
    # longer and take each one's median: the bound is the best of those.
    best = {"images_per_s": 0.0}
    runs = 1 if smallest else 3
    for _, layout, bs in sorted(sweep, reverse=True)[:runs]:
        r = statistics.median(rate(layout, bs, 2) for _ in range(runs))
        print(f"  bound  batch {bs:>3}  {layout:<13} {r:7.1f} images/s (median of {runs} longer runs)", flush=True)
        if r > best["images_per_s"]:
            best = {"images_per_s": r, "batch_size": bs, "layout": layout}  # type: ignore[dict-item]
    return best


def _cpu_group(cmdline: str, pid: int) -> str:
    if pid == os.getpid():
        return "driver (list, write Parquet)"
    if "moto.server" in cmdline:
        return "S3 endpoint (moto)"
    if "Scorer" in cmdline:
        return "scoring actors (GET + JPEG + model)"
    if "DecodeBatch" in cmdline or cmdline.startswith("ray::IDLE"):
        return "decode tasks, idle workers"
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
    def _cpu(p: object) -> float:
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

    def __enter__(self) -> _Monitor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()


class _UriImages(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Peer A's Dataset, as a practitioner writes it: bytes -> PIL -> base square.

    Reads with open() or one boto3 GET, decodes with PIL, resizes the shorter side
    to ``base`` and centre-crops: the same base square dragons produces.
    """

    def __init__(self, uris: list[str], base: int) -> None:
        self.uris, self.base = uris, base
        self._client: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.uris)

    def _read(self, uri: str) -> bytes:
        if not uri.startswith("s3://"):
            with open(uri, "rb") as f:
                return f.read()
        if self._pid != os.getpid():  # one client per DataLoader worker, never one shared across a fork
            from dragons.storage import boto3_client

            self._client, self._pid = boto3_client(), os.getpid()
        bucket, _, key = uri[len("s3://") :].partition("/")
        return bytes(self._client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import numpy as np
        from PIL import Image

        img = Image.open(io.BytesIO(self._read(self.uris[i]))).convert("RGB")
        w, h = img.size
        s = self.base / min(w, h)
        img = img.resize((max(self.base, round(w * s)), max(self.base, round(h * s))), Image.BILINEAR)
        left, top = (img.width - self.base) // 2, (img.height - self.base) // 2
        img = img.crop((left, top, left + self.base, top + self.base))
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), i


def _peer_dataloader(model_uri: str, uris: list[str], out_file: str, timeout_s: float) -> float:
    """Peer A: the hand-written DataLoader loop. Returns seconds from start to Parquet written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dragons import artifact

    t = time.perf_counter()
    art = artifact.load(model_uri)
    # The unfused model: a practitioner loads the state dict and calls eval().
    model = art.model.eval().to(memory_format=torch.channels_last)
    mean = torch.tensor(art.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(art.data.std).view(1, 3, 1, 1)
    off, size = (art.data.base_size - art.data.image_size) // 2, art.data.image_size
    # timeout: a worker that hangs fails the batch instead of the benchmark.
    loader = torch.utils.data.DataLoader(
        _UriImages(uris, art.data.base_size), batch_size=PEER_BATCH_SIZE, num_workers=2, timeout=timeout_s
    )
    probs: list[torch.Tensor] = []
    order: list[torch.Tensor] = []
    with torch.inference_mode():
        for x, idx in loader:
            x = x[..., off : off + size, off : off + size].float().div_(255.0)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            probs.append(model(x).softmax(1))
            order.append(idx)
    p = torch.cat(probs).numpy()
    rows = torch.cat(order).numpy()
    cols: dict[str, Any] = {"uri": [uris[i] for i in rows]}
    for j, c in enumerate(art.classes):
        cols[f"prob_{c}"] = p[:, j]
    pq.write_table(pa.table(cols), out_file)
    return time.perf_counter() - t


class _RayClassifier:
    """Peer B's actor, as in Ray's batch-inference guide: load once, map batches."""

    # torch is imported inside the methods: Ray pickles this class by value (it
    # lives in __main__), and a reference to the module-level torch drags in
    # torch.classes, which cannot be pickled.
    def __init__(self, model_uri: str, threads: int) -> None:
        import torch

        from dragons import artifact

        torch.set_num_threads(threads)
        self.art = artifact.load(model_uri)
        self.model = self.art.model.eval().to(memory_format=torch.channels_last)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from dragons.preprocess import eval_batch, to_tensor

        with torch.inference_mode():
            x = eval_batch(to_tensor(batch["image"]), self.art.data.image_size, self.art.data.mean, self.art.data.std)
            p = self.model(x).softmax(1).numpy()
        out: dict[str, Any] = {"path": batch["path"]}
        for j, c in enumerate(self.art.classes):
            out[f"prob_{c}"] = p[:, j]
        return out


def _peer_ray_data(model_uri: str, input_uri: str, base: int, out_dir: str) -> tuple[float, dict[str, Any]]:
    """Peer B: read_images + ActorPoolStrategy map_batches + write_parquet on the embedded Ray.

    Returns (seconds from start to Parquet written, how the CPUs were requested).
    """
    import ray
    import ray.data

    from dragons import storage
    from dragons.raycluster import DATA_CPU_SHARE

    t = time.perf_counter()
    # The trap: actors at 1 CPU each on a 2-CPU machine leave no CPU for the read
    # tasks and the job hangs. Keep a share of the CPUs (at least one) for reads.
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    read_cpus = max(1.0, cpus * DATA_CPU_SHARE)
    actors = max(1, int(cpus - read_cpus))
    actor_cpus = 1.0 if cpus - read_cpus >= 1 else max(0.25, cpus - read_cpus)
    loc = storage.parse(input_uri)
    fs = (
        storage.s3_filesystem() if loc.is_s3 else None
    )  # built like dragons.storage: the endpoint from AWS_ENDPOINT_URL
    ds = ray.data.read_images(loc.uri, size=(base, base), mode="RGB", include_paths=True, filesystem=fs)
    ds = ds.map_batches(
        _RayClassifier,
        fn_constructor_args=(model_uri, max(1, int(actor_cpus))),
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=PEER_BATCH_SIZE,
        num_cpus=actor_cpus,
    )
    ds.write_parquet(out_dir)
    return time.perf_counter() - t, {"actors": actors, "actor_cpus": actor_cpus, "cluster_cpus": cpus}


def _check(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _print_table(r: dict[str, Any]) -> None:
    """One table per size and source: rates, ratios and issue 11's checks."""
    n, src = r["n"], r["source"]
    print(f"\n=== N = {n}, source = {src} " + "=" * 40, flush=True)
    print(f"  {'':<28} {'images/s':>9} {'wall s':>8} {'dragons / it':>13}")
    print(f"  {'bound (model only)':<28} {r['bound_images_per_s']:9.1f} {'':>8} {r['ratio_bound']:13.3f}")
    print(f"  {'dragons score (end to end)':<28} {r['dragons_images_per_s']:9.1f} {r['dragons_wall_s']:8.1f} {'':>13}")
    for key, name in (("peer_a", "peer A (DataLoader loop)"), ("peer_b", "peer B (Ray Data recipe)")):
        if f"{key}_images_per_s" in r:
            print(f"  {name:<28} {r[f'{key}_images_per_s']:9.1f} {r[f'{key}_wall_s']:8.1f} {r[f'ratio_{key}']:13.3f}")
        else:
            print(f"  {name:<28} {'not run':>9}")
    print(f"  peak memory during dragons score +{r['peak_memory_mb']} MB")
    # Every table shows every check; the done-when is the one marked so.
    official = "issue 11's done-when" if src == "local" and n == 10000 else "issue 11 asks this at local, N=10,000"
    print(
        f"  check dragons >= {BOUND_RATIO_TARGET} x bound: {_check(r['ratio_bound'] >= BOUND_RATIO_TARGET)} "
        f"({r['ratio_bound']:.3f}; {official})"
    )
    official = "issue 11's done-when" if n == 2000 else "issue 11 asks this at N=2,000"
    for key, name in (("peer_a", "peer A"), ("peer_b", "peer B")):
        if f"ratio_{key}" in r:
            print(
                f"  check dragons >= {PEER_RATIO_TARGET} x {name}: {_check(r[f'ratio_{key}'] >= PEER_RATIO_TARGET)} "
                f"({r[f'ratio_{key}']:.3f}; {official})"
            )
    if "peer_b_resources" in r:
        how = r["peer_b_resources"]
        print(
            f"  peer B ran {how['actors']} actor(s) at {how['actor_cpus']:g} CPU each of {how['cluster_cpus']:g}; "
            "read and write tasks got the rest"
        )
    for group, secs in r.get("cpu_s", {}).items():
        print(f"    CPU {group:<50} {secs:6.1f} s  {1000 * secs / n:5.1f} ms/image")


def main(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow.parquet as pq
    import ray

    from dragons import artifact
    from dragons.dataconfig import DEFAULT_CROP_PCT, DataConfig
    from dragons.local import s3server
    from dragons.models.registry import build_model, get_spec
    from dragons.raycluster import ensure_ray
    from dragons.score.pipeline import ScoreConfig, score

    if args.smallest:
        args.n, args.source, args.peers, args.peers_max_n = [20], "local", True, 20
    sizes = sorted(set(args.n))
    sources = ["local", "s3"] if args.source == "both" else [args.source]
    key, prefix = _layout(sizes)
    server = s3server.start()
    server.apply_env()  # before Ray starts: its workers inherit the endpoint
    limit = args.timeout_s
    try:
        with tempfile.TemporaryDirectory(prefix="bench-score-") as work:
            local_root = f"{work}/images"
            roots = {"local": local_root, "s3": "s3://bench/images"}
            s3server.create_bucket("bench")
            t = time.perf_counter()
            with _deadline("writing the images", limit, server.stop):
                _make_images(max(sizes), key, local_root, "bench", s3="s3" in sources)
            print(
                f"wrote {max(sizes)} JPEGs to {' and '.join(roots[s] for s in sources)} in {time.perf_counter() - t:.0f}s",
                flush=True,
            )
            spec = get_spec(args.arch)
            model = build_model(args.arch, 2, "imagenet")
            meta = {
                "arch": args.arch,
                "classes": ["drogon", "viserion"],
                "metrics": {},
                "data_config": DataConfig.create(224, DEFAULT_CROP_PCT, spec.mean, spec.std).to_dict(),
            }
            # The model lives beside the images: a local run reads nothing from S3.
            models = {"local": f"{work}/model", "s3": "s3://bench/model"}
            for s in sources:
                artifact.save(models[s], model, meta)
            base = DataConfig.from_meta(meta).base_size

            print("model-only bound (one process, every core, pre-decoded tensors):", flush=True)
            sample_uris = [f"{local_root}/{key(i)}" for i in range(min(192, max(sizes)))]
            with _deadline("the bound", limit, server.stop):
                bound = _bound(
                    f"{work}/model" if "local" in sources else models["s3"],
                    sample_uris,
                    sample=len(sample_uris),
                    smallest=args.smallest,
                )

            ensure_ray(no_progress_timeout_s=min(600.0, limit))
            results: list[dict[str, Any]] = []
            for n in sizes:
                for src in sources:
                    input_uri = f"{roots[src]}/{prefix(n)}"
                    r: dict[str, Any] = {
                        "n": n,
                        "source": src,
                        "cpus": os.cpu_count() or 0,
                        "bound_images_per_s": round(bound["images_per_s"], 2),
                        "bound_batch_size": bound.get("batch_size"),
                        "bound_layout": bound.get("layout"),
                    }
                    print(f"\nN={n} {src}: dragons score {input_uri}", flush=True)
                    with (
                        tempfile.TemporaryDirectory(dir=work) as tmp,
                        _Monitor() as mem,
                        _deadline(f"dragons score N={n} {src}", limit, server.stop),
                    ):
                        t = time.perf_counter()
                        extra = {"batch_size": args.batch_size} if args.batch_size else {}
                        m = score(
                            ScoreConfig(
                                model=models[src],
                                input=input_uri,
                                output=f"{tmp}/table",
                                run_id=f"bench-{src}-{n}",
                                actors=args.actors,
                                log_file=f"{tmp}/log",
                                no_progress_timeout_s=min(600.0, limit),
                                **extra,
                            )
                        )
                        wall = time.perf_counter() - t
                    assert m["rows"] == n and m["errors"] == 0, m
                    r.update(
                        dragons_images_per_s=round(n / wall, 2),
                        dragons_wall_s=round(wall, 2),
                        ratio_bound=round(n / wall / bound["images_per_s"], 3),
                        peak_memory_mb=round(mem.peak / 2**20),
                        cpu_s={k: round(v, 1) for k, v in mem.cpu_by_group().items()},
                    )
                    if args.peers and n <= args.peers_max_n:
                        uris = [f"{roots[src]}/{key(i)}" for i in range(n)]
                        print(f"N={n} {src}: peer A (DataLoader, 2 workers, batch {PEER_BATCH_SIZE})", flush=True)
                        with (
                            tempfile.TemporaryDirectory(dir=work) as tmp,
                            _deadline(f"peer A N={n} {src}", limit, server.stop),
                        ):
                            wall_a = _peer_dataloader(
                                models[src], uris, f"{tmp}/peer_a.parquet", timeout_s=min(600.0, limit)
                            )
                            assert pq.read_metadata(f"{tmp}/peer_a.parquet").num_rows == n
                        print(
                            f"N={n} {src}: peer B (read_images + ActorPoolStrategy map_batches + write_parquet)",
                            flush=True,
                        )
                        with (
                            tempfile.TemporaryDirectory(dir=work) as tmp,
                            _deadline(f"peer B N={n} {src}", limit, server.stop),
                        ):
                            wall_b, how = _peer_ray_data(models[src], input_uri, base, f"{tmp}/peer_b")
                            rows_b = pq.ParquetDataset(f"{tmp}/peer_b").read(columns=["path"]).num_rows
                            assert rows_b == n, (rows_b, n)
                        r.update(
                            peer_a_images_per_s=round(n / wall_a, 2),
                            peer_a_wall_s=round(wall_a, 2),
                            ratio_peer_a=round(wall_a / wall, 3),
                            peer_b_images_per_s=round(n / wall_b, 2),
                            peer_b_wall_s=round(wall_b, 2),
                            ratio_peer_b=round(wall_b / wall, 3),
                            peer_b_resources=how,
                        )
                    _print_table(r)
                    results.append(r)
        figures: dict[str, Any] = {"bound": bound, "runs": results}
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return figures
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
