"""Where a command's CPU time goes on this machine, by process kind (for the test suite's time).

    python benchmarks/suite_cpu.py --json /tmp/suite-cpu.json -- make test
    python benchmarks/suite_cpu.py -- .venv/bin/python -m pytest -q tests/test_resume.py

Runs the command and samples the whole machine every ``--every-s`` seconds (``/proc``; stdlib only, so
it can watch a fresh clone's install too): the machine's busy CPU-seconds (``/proc/stat``), each
process's (utime + stime) by kind (from its title or command line), how many processes of each kind
started, and how many of them loaded torch (``libtorch_cpu`` in its memory map). A process that lives
less than one sample is not seen: its CPU is in ``unattributed``. Then the figures that bound the
suite's wall time on this machine: busy CPU-seconds against wall-seconds x cores, and the CPU-seconds
spent importing torch (the processes that loaded it x one import's cost, measured here first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
# First match wins: (kind, pattern over the title or command line).
KINDS: list[tuple[str, str]] = [
    ("scoring actors (Ray Data map workers)", r"^ray::_?MapWorker"),
    ("training workers (Ray Train)", r"^ray::(_?RayTrainWorker|TrainController|_?TrainTrainable)"),
    ("Ray daemons", r"^ray::(DashboardAgent|RuntimeEnvAgent)"),
    ("Ray task workers", r"(^ray::|ray/_private/workers/default_worker\.py)"),
    (
        "Ray daemons",
        r"(/raylet |/gcs_server |ray/dashboard/|log_monitor\.py|autoscaler/.*monitor\.py|runtime_env/agent)",
    ),
    ("dragons CLI drivers", r"(-m dragons\.cli|/bin/dragons |jobs/(score|train)\.py)"),
    ("benchmark drivers", r"benchmarks/"),
    ("test helper drivers", r"tests/(drill_node_loss|fake_autoscaler|_table_writer)"),
    ("pytest", r"(pytest|exec\(eval\(sys\.stdin)"),
    ("moto S3", r"moto\.server"),
    ("chromium", r"chrom"),
    ("install and lint", r"(/pip[0-9.]* |-m pip |/ruff |/mypy|apt-get|dpkg|/make )"),
]
RAY_WORKER_KINDS = {KINDS[0][0], KINDS[1][0], "Ray task workers"}


def kind_of(cmdline: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, cmdline):
            return kind
    return "other"


def busy_ticks() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
    return sum(fields[:8]) - fields[3] - fields[4]


def proc_ticks(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # utime, stime (fields 14 and 15)


def cmdline_of(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def loaded_torch(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("libtorch_cpu" in line for line in f)
    except OSError:
        return False


class Sampler:
    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.seen: dict[str, tuple[int, str, float]] = {}  # pid -> (last ticks, kind, first seen)
        self.cpu: dict[str, int] = {}
        self.started: dict[str, int] = {}
        self.torch: dict[str, int] = {}
        self.torch_checked: set[str] = set()
        self.stop = threading.Event()
        self.busy0 = busy_ticks()
        self.t0 = time.monotonic()
        self.mine = str(os.getpid())
        self.first = True

    def sample(self) -> None:
        now = time.monotonic()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid == self.mine:
                continue
            ticks = proc_ticks(pid)
            if ticks is None:
                continue
            if pid not in self.seen:
                kind = kind_of(cmdline_of(pid))
                # What ran before the command counts from now; what started since, all of it.
                self.seen[pid] = (ticks if self.first else 0, kind, now)
                if not self.first:
                    self.started[kind] = self.started.get(kind, 0) + 1
            last, kind, first = self.seen[pid]
            if ticks > last:
                self.cpu[kind] = self.cpu.get(kind, 0) + ticks - last
            # Ray renames a worker when it becomes an actor: the title says what it is now.
            if kind in RAY_WORKER_KINDS or kind == "other":
                kind = kind_of(cmdline_of(pid))
            self.seen[pid] = (ticks, kind, first)
            # torch loads when a process first needs it: look again every few seconds until it has.
            if pid not in self.torch_checked and ticks > 0 and int((now - first) / self.every_s) % 8 == 1:
                if loaded_torch(pid):
                    self.torch_checked.add(pid)
                    self.torch[kind] = self.torch.get(kind, 0) + 1
        self.first = False

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.sample()

    def figures(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        busy = (busy_ticks() - self.busy0) / TICK
        by_kind = {k: round(v / TICK, 1) for k, v in sorted(self.cpu.items(), key=lambda kv: -kv[1])}
        return {
            "wall_s": round(wall, 1),
            "cores": os.cpu_count(),
            "busy_cpu_s": round(busy, 1),
            "busy_share": round(busy / (wall * (os.cpu_count() or 1)), 3),
            "cpu_s_by_kind": by_kind,
            "unattributed_cpu_s": round(busy - sum(by_kind.values()), 1),
            "processes_started": dict(sorted(self.started.items(), key=lambda kv: -kv[1])),
            "processes_that_loaded_torch": dict(sorted(self.torch.items(), key=lambda kv: -kv[1])),
        }


def torch_import_cost(python: str) -> float:
    """CPU-seconds of `import torch` in a fresh interpreter (warm page cache: the best case)."""
    code = "import resource, torch; r = resource.getrusage(resource.RUSAGE_SELF); print(r.ru_utime + r.ru_stime)"
    runs = []
    for _ in range(3):
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            return float("nan")
        runs.append(float(out.stdout.strip()))
    return min(runs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every-s", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--json", default="", help="write the figures here too")
    p.add_argument("--python", default=sys.executable, help="the interpreter whose `import torch` is timed")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command to watch after --")
    sampler = Sampler(args.every_s)
    sampler.sample()  # what runs already, before the command starts
    t = threading.Thread(target=sampler.run, daemon=True)
    t.start()
    rc = subprocess.call(cmd)
    sampler.stop.set()
    t.join()
    fig = sampler.figures()
    fig["command"] = cmd
    fig["rc"] = rc
    fig["torch_import_cpu_s"] = round(torch_import_cost(args.python), 2)
    loaded = sum(fig["processes_that_loaded_torch"].values())
    fig["torch_imports_cpu_s_estimate"] = round(loaded * fig["torch_import_cpu_s"], 1)
    text = json.dumps(fig, indent=2)
    print("SUITE_CPU " + text, flush=True)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
