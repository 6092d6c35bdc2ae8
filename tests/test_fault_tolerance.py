"""Checkpoints every epoch, --resume, and surviving a killed worker (slow)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from dragons.errors import DragonsError
from dragons.train.config import TrainConfig
from dragons.train.checkpoint import latest_checkpoint
from dragons.train.run import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(workdir: Path) -> str:
    from dragons.local.synth import write_dataset

    root = workdir / "ft-data"
    write_dataset(str(root), ["drogon", "viserion"], n_train=24, n_valid=8, seed=11, size=(160, 120))
    return str(root)


def train_worker_pids() -> list[int]:
    """This machine's Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if line.startswith("ray::RayTrainWorker"):
            pids.append(p.pid)
    return sorted(pids)


class _Killer(threading.Thread):
    """SIGKILL one training worker once ``epochs`` checkpoints are complete.

    Complete, not just present: a checkpoint folder appears before its state
    file is fully written, and resuming rightly passes over a half-written one.
    """

    def __init__(self, run_dir: Path, epochs: int = 2) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.epochs = run_dir, epochs
        self.killed: int | None = None

    def run(self) -> None:
        # Generous: on a loaded 2-core machine two epochs took over 300 s, the
        # killer gave up, and the run it was meant to break finished instead.
        deadline = time.time() + 1200
        while time.time() < deadline:
            ckpts = list(self.run_dir.rglob("checkpoint_*")) if self.run_dir.exists() else []
            pids = train_worker_pids()
            if len(ckpts) >= 1 and pids:
                found = latest_checkpoint(str(ckpts[0].parent))
                if found is not None and found[1]["epochs_done"] >= self.epochs:
                    os.kill(pids[-1], signal.SIGKILL)
                    self.killed = pids[-1]
                    return
            time.sleep(0.2)


def _cfg(data: str, out: Path, **kw: object) -> TrainConfig:
    base = dict(data=data, out=str(out), workers=2, image_size=64, epochs=4, head_epochs=5, batch_size=8, report=False)
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_killed_worker_restarts_from_last_checkpoint(ray_session: None, small_data: str, tmp_path: Path) -> None:
    out = tmp_path / "model"
    killer = _Killer(out / "_runs", epochs=2)
    killer.start()
    meta = train(_cfg(small_data, out, max_failures=1))
    killer.join(timeout=5)
    assert killer.killed is not None, "no worker was killed"
    assert meta["resumes"] == 1
    # Every planned epoch ran exactly once, in order, across the restart.
    assert [h["epoch"] for h in meta["history"]] == list(range(5))
    assert killer.killed not in train_worker_pids()  # new worker processes finished it


def test_resume_continues_a_failed_run(ray_session: None, small_data: str, tmp_path: Path) -> None:
    out = tmp_path / "model"
    killer = _Killer(out / "_runs", epochs=2)
    killer.start()
    with pytest.raises(DragonsError, match="training failed"):
        train(_cfg(small_data, out, max_failures=0))
    killer.join(timeout=5)
    assert killer.killed is not None
    found = latest_checkpoint(str(out / "_runs" / os.listdir(out / "_runs")[0]))
    assert found is not None
    first_epochs = found[1]["history"]
    assert 2 <= len(first_epochs) < 5
    with pytest.raises(DragonsError, match="no earlier run"):
        train(_cfg(small_data, tmp_path / "other", resume=True))
    # The run's recipe is kept on resume, even where the data would now decide
    # otherwise: here the saved choice is edited to a value the rule never picks.
    import json

    recipe_file = out / "_runs" / os.listdir(out / "_runs")[0] / "recipe.json"
    saved = json.loads(recipe_file.read_text())
    assert saved["n_train"] == 48 and saved["settings"]["label_smoothing"] == 0.1 and saved["settings"]["epochs"] == 4
    # Other classes than the run started with: refused before any image is read.
    recipe_file.write_text(json.dumps({**saved, "classes": ["drogon", "rhaegal"]}))
    t0 = time.monotonic()
    with pytest.raises(DragonsError, match=r"started with the classes \[drogon, rhaegal\]"):
        train(_cfg(small_data, out, resume=True))
    assert time.monotonic() - t0 < 30
    saved["settings"]["label_smoothing"] = 0.05
    recipe_file.write_text(json.dumps(saved))
    meta = train(_cfg(small_data, out, resume=True))
    assert meta["resumes"] == 1
    assert meta["config"]["label_smoothing"] == 0.05 and meta["recipe"]["auto"]["label_smoothing"] == 0.05
    assert [h["epoch"] for h in meta["history"]] == list(range(5))
    # The epochs before the kill come from the checkpoint, not from a second run of them.
    assert meta["history"][0]["time"] == pytest.approx(first_epochs[0]["time"])


def test_latest_checkpoint_passes_over_one_cut_short(tmp_path: Path) -> None:
    """A worker killed while writing leaves a truncated state file: resume from the one before."""
    import io

    import torch

    from dragons.train.checkpoint import STATE_FILE

    run = tmp_path / "run"
    for name, epochs in (("checkpoint_2026-01-01_00-00-01.000001", 1), ("checkpoint_2026-01-01_00-00-02.000001", 2)):
        (run / name).mkdir(parents=True)
        torch.save({"epochs_done": epochs}, run / name / STATE_FILE)
    assert latest_checkpoint(str(run))[1]["epochs_done"] == 2  # type: ignore[index]
    newest = run / "checkpoint_2026-01-01_00-00-03.000001"
    newest.mkdir()
    buf = io.BytesIO()
    torch.save({"epochs_done": 3}, buf)
    (newest / STATE_FILE).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    uri, state = latest_checkpoint(str(run))  # type: ignore[misc]
    assert state["epochs_done"] == 2 and uri.endswith("00-00-02.000001")
    assert latest_checkpoint(str(tmp_path / "nowhere")) is None
