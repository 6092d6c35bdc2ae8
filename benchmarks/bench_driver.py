"""What one `dragons score` driver can feed, against bare Ray Data in the same shape, in one sitting.

    python benchmarks/bench_driver.py                  # the issue's sizes (about 25 minutes on 2 cores)
    python benchmarks/bench_driver.py --smallest       # every step at its smallest size (seconds; the suite runs it)

In order, on an embedded Ray in this process (the same machine, minutes apart):

1. **ceiling**: ``../shared/bench/raydata_ceiling.py`` (bare Ray Data: one read task yielding listing-like
   rows -> one actor returning error rows -> the driver spooling Arrow batches to Parquet), at
   blocks of 4,096 rows and of ~12k rows (a page of dragons' driver-mode runs: the same block size).
2. **driver mode** (``--max-bytes 1``: every object is refused from its listed size inside the scoring
   actor, before any read, so each row costs what the orchestration costs: list -> skip split -> Ray
   Data blocks -> actor call -> spool -> commit in parts), over a local folder of hard links, a Parquet
   manifest (uri, size) and a Parquet S3 Inventory report in AWS's layout, at --folder-n, --manifest-n
   and --inventory-n objects. Actor calls take 4,096 rows, as GPU actors do.
3. **listing**: keys/s over --listing-n keys on the local S3 endpoint with 100 ms added to every LIST
   call, at 1 and 8 streams (benchmarks/bench_listing.py).
4. **incremental**: the next day's inventory (1% changed, 1% new) scored ``--incremental`` into the table
   the largest inventory run filled (--inventory-n rows of the model version), with the skip sets'
   memory limit at 256 MB.

Per run: rows/s, CPU microseconds a row for each process kind (driver, listing tasks, scoring actors,
Ray's own), the driver's peak RSS, the machine's peak memory above idle (MemTotal - MemAvailable, Ray's
shared-memory object store included), the time to the first committed part. Then the bars of issue 28
and how many GPUs at --gpu-rate images/s one driver keeps busy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import dragons  # noqa: F401,E402  (before anything imports ray: it turns on Ray token auth)

CEILING = REPO.parent / "shared" / "bench" / "raydata_ceiling.py"
# Block sizes for the ceiling: the issue's 4,096, and the ~12k rows a page of dragons' driver-mode
# runs holds (STREAM_BLOCK_BYTES at ~80 bytes a manifest row): the same block size as dragons'.
CEILING_BLOCKS = (4096, 12_288)
SOURCE_BUCKET = "archive"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder-n", type=int, nargs="*", default=[1_000_000], help="objects in the local-folder runs")
    p.add_argument("--manifest-n", type=int, nargs="*", default=[1_000_000, 10_000_000], help="Parquet manifest runs")
    p.add_argument("--inventory-n", type=int, nargs="*", default=[1_000_000, 10_000_000], help="Parquet inventory runs")
    p.add_argument("--ceiling-n", type=int, default=1_000_000, help="rows for the bare Ray Data ceiling (0 = skip)")
    p.add_argument("--listing-n", type=int, default=100_000, help="keys for the listing benchmark (0 = skip)")
    p.add_argument(
        "--incremental",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the incremental night over the largest inventory run's table",
    )
    p.add_argument("--smallest", action="store_true", help="every step at its smallest size (a smoke run)")
    p.add_argument("--commit-every", type=int, default=100_000, help="rows per part (the scoring default)")
    p.add_argument("--list-concurrency", type=int, default=4, help="listing streams (the scoring default)")
    p.add_argument(
        "--gpu-rate", type=float, default=1000.0, help="images/s one GPU scores, for the GPUs-per-driver figure"
    )
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "dragons-bench-driver"),
        help="folder for the inputs (kept between runs: building 10M rows takes minutes), tables and logs",
    )
    p.add_argument("--json", default="", help="write the figures here")
    return p


def smallest(args: argparse.Namespace) -> argparse.Namespace:
    # Enough rows for two parts and more than one listing page per source; the suite's smoke run.
    args.folder_n, args.manifest_n, args.inventory_n = [600], [600], [600]
    args.ceiling_n, args.listing_n, args.commit_every = 2000, 300, 250
    return args


# ------------------------------------------------------------------ measuring


def meminfo_used_mb() -> float:
    m = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            m[k] = int(v.split()[0])
    return (m["MemTotal"] - m["MemAvailable"]) / 1024


def kind_of(title: str) -> str | None:
    """A process's part in a run, from Ray's process title (None: not known yet, e.g. an idle worker)."""
    if "Scorer" in title:
        return "actors"
    if "Read" in title or "listing" in title.lower():
        return "listing"
    if "IDLE" in title or title.startswith("ray::"):
        return None
    if any(s in title for s in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env")):
        return "ray"
    return None


class Sampler:
    """Peak driver RSS, peak machine memory above idle, and CPU seconds per process kind, sampled."""

    def __init__(self, every_s: float = 0.25) -> None:
        import psutil

        self.psutil, self.me, self.every_s = psutil, psutil.Process(), every_s
        self.idle_mb = meminfo_used_mb()
        self.peak_rss_mb = self.peak_used_mb = 0.0
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kinds: dict[int, str] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._sample(initial=True)

    def _sample(self, initial: bool = False) -> None:
        for proc in self.psutil.process_iter(["pid", "cmdline", "cpu_times"]):
            try:
                pid, times = proc.info["pid"], proc.info["cpu_times"]
                if times is None:
                    continue
                cpu = times.user + times.system
                title = " ".join(proc.info["cmdline"] or [])
            except (self.psutil.Error, TypeError):
                continue
            kind = "driver" if pid == self.me.pid else kind_of(title)
            if kind:
                self.kinds[pid] = kind
            self.first.setdefault(pid, cpu if initial else 0.0)
            self.last[pid] = cpu
        self.peak_rss_mb = max(self.peak_rss_mb, self.me.memory_info().rss / 2**20)
        self.peak_used_mb = max(self.peak_used_mb, meminfo_used_mb())

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, kind in self.kinds.items():
            out[kind] = out.get(kind, 0.0) + max(0.0, self.last[pid] - self.first.get(pid, 0.0))
        return out

    def __enter__(self) -> "Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


# ------------------------------------------------------------------ inputs


def build_folder(work: Path, n: int) -> Path:
    """``n`` hard links of a few small JPEGs, 1000 to a subfolder (a directory entry each); reused."""
    import numpy as np
    from PIL import Image

    root, done = work / f"archive-{n}", work / f"archive-{n}.done"
    if done.exists():
        return root
    seeds = work / f"seeds-{n}"  # a file takes at most 65,000 links (ext4): one per 20,000 objects
    seeds.mkdir(parents=True, exist_ok=True)
    sources = []
    for i in range(max(8, n // 20_000)):
        path = seeds / f"s{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path, quality=80)
        sources.append(path)
    t0 = time.perf_counter()
    for i in range(n):
        d = root / f"d{i // 1000:05d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        target = d / f"img{i:07d}.jpg"
        if not target.exists():
            os.link(sources[i % len(sources)], target)
    done.write_text(str(n))
    print(f"linked {n:,} files in {time.perf_counter() - t0:.0f}s under {root}", flush=True)
    return root


def _keys(start: int, n: int, day: int = 0) -> Any:
    """Archive keys, ~70-character URIs, built column-wise (10M in seconds)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    idx = pa.array(np.arange(start, start + n))
    cam = pc.cast(pc.add(pc.divide(idx, 100_000), 10), pa.string())
    num = pc.utf8_lpad(pc.cast(idx, pa.string()), 9, "0")
    return pc.binary_join_element_wise(f"photos/2026/11/{29 + day:02d}/cam-", cam, "/img_", num, ".jpg", "")


def build_manifest(work: Path, n: int) -> Path:
    """A Parquet manifest of ``n`` S3 URIs with their sizes (a manifest may carry ``size``: a night
    that has it refuses over --max-bytes objects unread, as from a listing)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = work / f"manifest-{n}.parquet"
    if not path.exists():
        with pq.ParquetWriter(path, pa.schema([("uri", pa.string()), ("size", pa.int64())])) as w:
            for s in range(0, n, 1_000_000):
                k = min(1_000_000, n - s)
                uris = pc.binary_join_element_wise(f"s3://{SOURCE_BUCKET}/", _keys(s, k), "")
                w.write_table(
                    pa.table({"uri": uris, "size": pa.array(1000 + np.arange(s, s + k) % 5000)}), row_group_size=65_536
                )
    return path


def build_inventory(work: Path, n: int, day: int = 0, changed: float = 0.0, new: float = 0.0) -> str:
    """A Parquet S3 Inventory report of ``n`` objects in AWS's layout (1M rows a data file); the next
    day's (``day`` 1) changes the etag of a ``changed`` share and adds a ``new`` share of objects."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from helpers_inventory import DEFAULT_CREATED, write_report

    root = work / f"inventory-{n}-day{day}"
    done = root / "manifest.uri"
    if done.exists():
        return done.read_text()
    mtime = pa.scalar(datetime(2026, 11, 28, 23, 0, tzinfo=timezone.utc), pa.timestamp("ms", tz="UTC"))
    total = n + int(n * new)

    def files() -> Any:
        for s in range(0, total, 1_000_000):
            k = min(1_000_000, total - s)
            i = np.arange(s, s + k)
            etag = np.where((i < n) & (i % max(1, int(1 / changed)) == 0), i + 7, i) if changed else i
            t = pa.table(
                {
                    "bucket": pa.repeat(pa.scalar(SOURCE_BUCKET), k),
                    "key": _keys(s, k),
                    "size": pa.array(1000 + i % 5000),
                    "last_modified_date": pa.repeat(mtime, k),
                    "e_tag": pc.utf8_lpad(pc.cast(pa.array(etag), pa.string()), 32, "0"),
                }
            )
            buf = io.BytesIO()
            pq.write_table(t, buf, row_group_size=65_536)
            yield buf.getvalue()

    uri = write_report(
        root,
        SOURCE_BUCKET,
        files(),
        "Parquet",
        created=DEFAULT_CREATED.replace(day=5 + day),
        fields=("Bucket", "Key", "Size", "LastModifiedDate", "ETag"),
    )
    done.write_text(uri)
    return uri


def tiny_model(work: Path) -> str:
    """An untrained Lite0 artifact at 32 px (scoring refuses every row before the model)."""
    from helpers_hardening import save_tiny_model

    from dragons import artifact
    from dragons.dataconfig import DataConfig
    from dragons.models.registry import build_model

    model = work / "model"
    if not (model / "model.json").exists():
        save_tiny_model(str(model))
    meta = json.loads((model / "model.json").read_text())
    if meta["image_size"] != 32:
        m = build_model("efficientnet_lite0", 2, weights="none").eval()
        norm = meta["normalization"]
        artifact.save(
            str(model),
            m,
            {
                **{k: meta[k] for k in ("arch", "classes", "metrics")},
                "data_config": DataConfig.create(32, 0.875, norm["mean"], norm["std"]).to_dict(),
            },
        )
    return str(model)


# ------------------------------------------------------------------ runs


def run_one(
    label: str, work: Path, model: str, n: int, args: argparse.Namespace, keep_table: bool = False, **cfg: Any
) -> dict[str, Any]:
    import shutil

    from dragons.score.pipeline import ScoreConfig, score

    table = work / "tables" / (cfg.pop("table_name", None) or label)
    if not keep_table:
        shutil.rmtree(table, ignore_errors=True)
    from dragons.score.source import BLOCK_ROWS

    # block_rows=BLOCK_ROWS: each actor call takes a whole listing block, as GPU actors do
    # (the CPU default cuts blocks into 256-row calls for actors that decode).
    c = ScoreConfig(
        model=model,
        output=str(table),
        run_id=label,
        commit_every=args.commit_every,
        list_concurrency=args.list_concurrency,
        block_rows=BLOCK_ROWS,
        max_bytes=1,
        progress_s=30,
        log_file=str(work / "logs" / f"{label}.log"),
        **cfg,
    )
    with Sampler() as s:
        t0 = time.perf_counter()
        m = score(c)
        wall = time.perf_counter() - t0
    assert m["listed"] == n, (label, m["listed"], n)
    assert m["rows"] == n - m["skipped"], (label, m["rows"], n, m["skipped"])
    cpu = s.cpu_by_kind()
    fig = {
        "label": label,
        "n": n,
        "scored": m["new_rows"],
        "wall_s": round(wall, 1),
        "rows_per_s": round(n / wall),
        "pipeline_s": m["timings"]["total_s"],
        # from Ray's start to the last commit, as the ceiling is timed (after ray.init)
        "pipeline_rows_per_s": round(n / m["timings"]["total_s"]),
        "driver_peak_rss_mb": round(s.peak_rss_mb),
        "peak_above_idle_mb": round(s.peak_used_mb - s.idle_mb),
        "first_part_s": m["timings"]["first_part_s"],
        "listing_done_s": m["timings"]["listing_done_s"],
        "parts": m["dragons_part"],
        "cpu_us_per_row": {k: round(1e6 * v / n, 1) for k, v in sorted(cpu.items())},
    }
    print(json.dumps(fig), flush=True)
    return fig


def ceiling(n: int) -> dict[int, float]:
    """Bare Ray Data's rows/s at CEILING_BLOCKS, in a process of its own."""
    if not CEILING.exists():
        raise SystemExit(f"error: {CEILING} is missing: it ships in ../shared/bench beside the repo")
    # RAY_ADDRESS=local: a Ray of its own, never one `ray start` left running on this machine.
    out = subprocess.run(
        [sys.executable, str(CEILING), str(n), *map(str, CEILING_BLOCKS)],
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=1800,
        env={**os.environ, "RAY_ADDRESS": "local"},
    )
    if out.returncode:
        raise SystemExit(f"error: the Ray Data ceiling failed:\n{out.stderr[-2000:]}")
    rates = {
        int(b): float(r.replace(",", "")) for b, r in re.findall(r"block\s+(\d+) rows: .*= ([\d,]+) rows/s", out.stdout)
    }
    for line in out.stdout.splitlines():
        print(f"ceiling: {line}", flush=True)
    return rates


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.smallest:
        args = smallest(args)
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"runs": []}
    if args.ceiling_n:
        out["ceiling"] = ceiling(args.ceiling_n)
    model = tiny_model(work)
    runs = out["runs"]
    for n in args.folder_n:
        runs.append(run_one(f"folder-{n}", work, model, n, args, input=str(build_folder(work, n))))
    for n in args.manifest_n:
        runs.append(run_one(f"manifest-{n}", work, model, n, args, manifest=str(build_manifest(work, n))))
    for n in args.inventory_n:
        runs.append(
            run_one(
                f"inventory-{n}",
                work,
                model,
                n,
                args,
                inventory=build_inventory(work, n),
                input=f"s3://{SOURCE_BUCKET}/photos",
            )
        )
    if args.incremental and args.inventory_n:
        n = max(args.inventory_n)
        day2 = build_inventory(work, n, day=1, changed=0.01, new=0.01)
        runs.append(
            run_one(
                f"incremental-{n}",
                work,
                model,
                n + int(n * 0.01),
                args,
                keep_table=True,
                table_name=f"inventory-{n}",
                inventory=day2,
                input=f"s3://{SOURCE_BUCKET}/photos",
                incremental=True,
                skip_memory_limit="256MB",
            )
        )
    if args.listing_n:
        from bench_listing import main as listing_main  # type: ignore[import-not-found]

        out["listing"] = listing_main(["--n", str(args.listing_n)])
    report(out, args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    """The issue's bars, each against its figure measured above."""
    runs = {r["label"]: r for r in out["runs"]}
    block = max(CEILING_BLOCKS)
    ceil = out.get("ceiling", {}).get(block)

    def bar(name: str, ok: bool, text: str) -> None:
        print(f"{name}: {text} -> {'ok' if ok else 'MISSED'}", flush=True)

    for r in out["runs"]:
        if r["label"].startswith(("folder-", "manifest-", "inventory-")) and r["n"] >= 1_000_000:
            bar(
                f"{r['label']} rate",
                r["pipeline_rows_per_s"] >= 40_000,
                f"{r['pipeline_rows_per_s']:,} rows/s over the pipeline's time, {r['rows_per_s']:,} over the "
                f"command's (Ray's start included) (bar 40,000)",
            )
        if ceil and r["label"].startswith(("folder-", "manifest-", "inventory-")):
            bar(
                f"{r['label']} vs ceiling",
                r["rows_per_s"] >= 0.8 * ceil,
                f"{r['pipeline_rows_per_s'] / ceil:.2f} x bare Ray Data's {ceil:,.0f} rows/s at {block}-row blocks "
                f"(pipeline time; bar 0.8)",
            )
    for kind in ("manifest", "inventory"):
        sizes = sorted(r["n"] for r in out["runs"] if r["label"].startswith(f"{kind}-"))
        if len(sizes) > 1:
            lo, hi = runs[f"{kind}-{sizes[0]}"], runs[f"{kind}-{sizes[-1]}"]
            bar(
                f"{kind} {hi['n']:,} rate vs {lo['n']:,}",
                hi["rows_per_s"] >= 0.8 * lo["rows_per_s"],
                f"{hi['rows_per_s'] / lo['rows_per_s']:.2f} (bar 0.8)",
            )
            bar(
                f"{kind} {hi['n']:,} driver RSS vs {lo['n']:,}",
                hi["driver_peak_rss_mb"] <= 1.25 * lo["driver_peak_rss_mb"],
                f"{hi['driver_peak_rss_mb'] / lo['driver_peak_rss_mb']:.2f} (bar 1.25)",
            )
    for r in out["runs"]:
        if r["label"].startswith("incremental-"):
            bar(
                f"{r['label']} peak memory above idle",
                r["peak_above_idle_mb"] < 2048,
                f"{r['peak_above_idle_mb']:,} MB (bar 2,048; skip sets at 256 MB; {r['scored']:,} scored)",
            )
    if "listing" in out:
        lst = out["listing"]
        bar("listing 8 streams vs 1", lst.get("ratio", 0) >= 4, f"{lst.get('ratio', 0):.2f}x (bar 4)")
    rates = [r["rows_per_s"] for r in out["runs"] if not r["label"].startswith("incremental-")]
    if rates:
        best = max(rates)
        out["gpus_per_driver"] = round(best / args.gpu_rate, 1)
        print(
            f"one driver passes {best:,} rows/s: it keeps {out['gpus_per_driver']} GPUs busy at "
            f"{args.gpu_rate:,.0f} images/s each",
            flush=True,
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
