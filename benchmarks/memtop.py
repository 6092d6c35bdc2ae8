"""Where a command's memory goes: run it, and once a second sample the machine's
used memory (MemTotal - MemAvailable, Ray's shared-memory object store included)
and every process's USS and PSS. Prints the peak above the idle figure, when it
happened and which processes held it, each process's own peak USS, and a
timeline.

    python benchmarks/memtop.py .venv/bin/dragons train --data ../shared/data/flowers5 --out /tmp/f5 --workers 2

The whole machine is sampled: run nothing else beside it.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

Proc = tuple[float, float, int, str]  # PSS MB, USS MB, pid, command line


def used_mb() -> tuple[float, float]:
    """(MemTotal - MemAvailable, Shmem) in MB."""
    m = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/meminfo")}
    return (m["MemTotal"] - m["MemAvailable"]) / 1024, m["Shmem"] / 1024


def processes() -> list[Proc]:
    out = []
    for q in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            mi = q.memory_full_info()
        except (psutil.Error, OSError):
            continue  # gone, or not ours to read
        name = " ".join(q.info["cmdline"] or [])[:70] or q.info["name"]
        out.append((mi.pss / 2**20, mi.uss / 2**20, q.info["pid"], name))
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    idle, _ = used_mb()
    t0 = time.time()
    child = subprocess.Popen(argv)
    peak: tuple[float, float, float, list[Proc]] = (0.0, 0.0, 0.0, [])  # t, used, shmem, processes
    own: dict[tuple[int, str], float] = {}
    timeline: list[tuple[float, float, float]] = []
    while child.poll() is None:
        used, shmem = used_mb()
        procs = processes()
        for pss, uss, pid, name in procs:
            own[(pid, name)] = max(own.get((pid, name), 0.0), uss)
        t = time.time() - t0
        timeline.append((t, used - idle, shmem))
        if used - idle > peak[1]:
            peak = (t, used - idle, shmem, sorted(procs, reverse=True)[:16])
        time.sleep(1.0)
    print(
        f"MEMTOP rc={child.returncode} wall={time.time() - t0:.0f}s peak_above_idle={peak[1]:.0f} MB "
        f"at t={peak[0]:.0f}s shmem={peak[2]:.0f} MB"
    )
    for pss, uss, pid, name in peak[3]:
        print(f"  pss {pss:7.0f} uss {uss:7.0f} {pid:7d} {name}")
    print("own peak USS (top 14):")
    for (pid, name), v in sorted(own.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {v:7.0f} {pid:7d} {name}")
    print("timeline (every 10th sample): t used_above_idle shmem (s, MB, MB)")
    for t, u, sh in timeline[::10]:
        print(f"  {t:5.0f} {u:6.0f} {sh:5.0f}")
    return child.returncode or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
