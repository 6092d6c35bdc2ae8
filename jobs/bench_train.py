"""Thin entry point: the training benchmark lives in benchmarks/bench_train.py (same flags)."""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"), run_name="__main__")
