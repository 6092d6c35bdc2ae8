"""Every script under benchmarks/ at its smallest size (seconds each), so that a library change cannot
silently break one: each runs in a process of its own, must exit 0 and must print a line that shows it
measured something. The figures themselves depend on the machine and are not checked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # together a few minutes: each case scores, trains or lists end to end

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SHARED = REPO.parent / "shared" / "data"
PY = sys.executable

# (script, arguments after it, a regex one printed line must match). "{tmp}" is the case's tmp_path.
CASES: list[tuple[str, list[str], str]] = [
    ("bench_driver.py", ["--smallest", "--work", "{tmp}"], r"^one driver passes [\d,]+ rows/s"),
    ("bench_listing.py", ["--n", "2000", "--latency-ms", "10"], r"^8 stream\(s\): 2000 keys in .* keys/s$"),
    ("bench_skips.py", ["--n", "10000", "--work", "{tmp}"], r"^membership: \{.*\"rows_per_s\""),
    ("bench_novelty.py", ["--smallest"], r"^AUROC novelty \d\.\d+ +AUROC 1-max p \d\.\d+"),
    (
        "bench_score.py",
        ["--smallest", "--timeout-s", "300"],
        r"^  peer B \(Ray Data recipe\) +\d+\.\d +\d+\.\d +\d+\.\d{3}$",
    ),
    ("bench_table.py", ["query", "--rows", "2000"], r"\"query_peak_rss_mb\": \d+"),
    ("bench_table.py", ["listing", "--objects", "400", "--local"], r"would score 100"),
    (
        "bench_train.py",
        [
            "--data",
            str(SHARED / "hymenoptera"),
            "--max-images",
            "24",
            "--workers",
            "1",
            *("--set", "image_size=64", "--set", "head_epochs=1", "--set", "head_views=0", "--set", "epochs=1"),
        ],
        r"^RESULT \{.*\"images_per_s\": \d",
    ),
    ("bench_parity.py", ["--other", str(REPO), "--n", "40", "--work", "{tmp}"], r"^throughput this/other: \d"),
    ("blur_probe.py", ["--smallest"], r"^ImageNet top-1 is ant or bee, 8 hymenoptera val/ photos .* sharp \d"),
    ("ft_holdout.py", ["--n", "40", "--epochs", "1", "--size", "64"], r"^epoch 0: train \d.* img/s"),
    ("step_speed.py", ["--smallest"], r"fwd\+bwd \d+\.\d ms/img"),
    ("memtop.py", ["true"], r"^MEMTOP rc=0 wall="),
    ("memrun.sh", ["true"], r"^MEMRUN rc=0 wall="),
    ("suite_cpu.py", ["--", "sleep", "2"], r"^  \"busy_cpu_s\": \d"),
]


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """In a session of its own, so that on a timeout its whole process tree (Ray included) dies with it."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{cmd[1:]} timed out after {timeout:.0f}s:\n{out[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    CASES,
    ids=[f"{s.split('.')[0]}-{a[0]}" if s == "bench_table.py" else s.split(".")[0] for s, a, _ in CASES],
)
def test_benchmark_runs_at_its_smallest_size(script: str, args: list[str], expect: str, tmp_path: Path) -> None:
    assert (BENCH / script).exists(), f"{script} is gone from benchmarks/: drop its case here"
    # Its own Ray beside the session's (no RAY_ADDRESS), with a short temp dir: Ray's socket paths must stay short.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env.update(
        {
            "RAY_TMPDIR": ray_tmp,
            "DRAGONS_PROGRESS_BARS": "0",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            # A second Ray beside the session's: keep its object store small.
            "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.05",
        }
    )
    interpreter = ["bash"] if script.endswith(".sh") else [PY]
    cmd = [*interpreter, str(BENCH / script), *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    t0 = time.perf_counter()
    try:
        p = _run(cmd, env, timeout=420)  # a guard against a hang: a loaded 2-core CI machine is slow
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, f"{script} {args} exited {p.returncode} after {wall:.0f}s:\n{p.stdout[-5000:]}"
    assert re.search(expect, p.stdout, re.MULTILINE), (
        f"{script} printed no line matching {expect!r}:\n{p.stdout[-5000:]}"
    )
