"""Scoring 10k real photos from local disk: this tree against another (e.g. the last release), same run.

    python benchmarks/bench_parity.py --other /tmp/oldmain --n 10000 --json parity.json

Makes a folder of N hard links to the real photos in ../shared/data (flowers5
and hymenoptera, cycled) and an untrained Lite0 artifact at 224 px (the photo
recipe's size and crop; training does not change the compute), then runs
`dragons score` over it from each code tree in turn (a fresh process and
embedded Ray each, with the same venv), sampling the machine's used memory
(MemTotal - MemAvailable, Ray's shared-memory object store included) every
0.5 s. Prints images/s and the peak above idle for each, and their ratios.
Issue 20's bar: peak memory no higher than the other tree's, throughput within 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def used_mb() -> float:
    m = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/meminfo")}
    return (m["MemTotal"] - m["MemAvailable"]) / 1024


def photos(work: Path, n: int) -> Path:
    root = work / f"photos-{n}"
    if (work / f"photos-{n}.done").exists():
        return root
    src = sorted(p for d in ("flowers5", "hymenoptera") for p in (DATA / d).rglob("*.jp*g"))
    if not src:
        sys.exit(f"error: no photos under {DATA}: the shared data sets ship beside the repo in ../shared/data")
    for i in range(n):
        d = root / f"d{i // 1000:03d}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(src[i % len(src)], d / f"{i:06d}-{src[i % len(src)].name}")
    (work / f"photos-{n}.done").write_text(str(n))
    return root


def model(work: Path) -> str:
    out = work / "model224"
    if not (out / "model.json").exists():
        sys.path.insert(0, str(REPO))
        from dragons import artifact
        from dragons.dataconfig import DataConfig
        from dragons.models.registry import build_model, get_spec

        spec = get_spec("efficientnet_lite0")
        m = build_model("efficientnet_lite0", 5, weights="none").eval()
        artifact.save(
            str(out),
            m,
            {
                "arch": "efficientnet_lite0",
                "classes": ["a", "b", "c", "d", "e"],
                "data_config": DataConfig.create(224, 0.7, spec.mean, spec.std).to_dict(),
                "metrics": {},
            },
        )
    return str(out)


def run(tree: Path, label: str, work: Path, model_uri: str, inp: Path, n: int) -> dict:
    table = work / f"table-{label}"
    shutil.rmtree(table, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "DRAGONS_PROGRESS_BARS": "0"}
    idle = used_mb()
    peak = [idle]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], used_mb())
            stop.wait(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dragons.cli",
            "score",
            "--model",
            model_uri,
            "--input",
            str(inp),
            "--output",
            str(table),
            "--run-id",
            label,
            "--log-file",
            str(work / f"{label}.log"),
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    if p.returncode != 0:
        sys.exit(f"error: {label} failed:\n{p.stderr[-3000:]}")
    fig = {
        "label": label,
        "tree": str(tree),
        "n": n,
        "wall_s": round(wall, 1),
        "images_per_s": round(n / wall, 1),
        "peak_above_idle_mb": round(peak[0] - idle),
    }
    print(json.dumps(fig), flush=True)
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", required=True, help="the other code tree (a git worktree of another commit)")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "dragons-bench-parity"))
    p.add_argument("--json", default="")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    inp, m = photos(work, a.n), model(work)
    other = run(Path(a.other).resolve(), "other", work, m, inp, a.n)
    this = run(REPO, "this", work, m, inp, a.n)
    speed = this["images_per_s"] / other["images_per_s"]
    mem = this["peak_above_idle_mb"] / max(other["peak_above_idle_mb"], 1)
    print(f"throughput this/other: {speed:.3f} (bar >= 0.90) -> {'ok' if speed >= 0.9 else 'MISSED'}")
    print(f"peak memory above idle this/other: {mem:.3f} (bar <= 1.00) -> {'ok' if mem <= 1.0 else 'MISSED'}")
    if a.json:
        Path(a.json).write_text(
            json.dumps({"runs": [other, this], "speed_ratio": speed, "memory_ratio": mem}, indent=2)
        )


if __name__ == "__main__":
    main()
