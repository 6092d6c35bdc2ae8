"""Checkpoints every epoch, --resume, and surviving a killed worker (slow)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from dragons.errors import DragonsError
from dragons.train.checkpoint import latest_checkpoint
from dragons.train.config import TrainConfig
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
    """SIGKILL one training worker each time the run's checkpoints reach one of ``at``
    epochs (a new worker each time: the one killed is gone).

    Complete checkpoints, not just present: a checkpoint folder appears before
    its state file is fully written, and resuming rightly passes over a half-written one.
    """

    def __init__(self, run_dir: Path, at: tuple[int, ...]) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.at = run_dir, list(at)
        self.killed: list[int] = []

    def run(self) -> None:
        # Generous: on a loaded 2-core machine two epochs took over 300 s, the
        # killer gave up, and the run it was meant to break finished instead.
        deadline = time.time() + 1200
        while self.at and time.time() < deadline:
            ckpts = list(self.run_dir.rglob("checkpoint_*")) if self.run_dir.exists() else []
            pids = [p for p in train_worker_pids() if p not in self.killed]
            if len(ckpts) >= 1 and pids:
                found = latest_checkpoint(str(ckpts[0].parent))
                if found is not None and found[1]["epochs_done"] >= self.at[0]:
                    os.kill(pids[-1], signal.SIGKILL)
                    self.killed.append(pids[-1])
                    self.at.pop(0)
            time.sleep(0.2)


def _cfg(data: str, out: Path, **kw: object) -> TrainConfig:
    base = dict(data=data, out=str(out), workers=2, image_size=64, epochs=5, head_epochs=5, batch_size=8, report=False)
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_killed_workers_restart_then_resume_finishes_the_run(
    ray_session: None, small_data: str, tmp_path: Path
) -> None:
    """One run through both ways back from a killed worker (one training, not two):

    1. a worker killed after epoch 2: the group restarts from the last checkpoint
       (``max_failures=1``) and goes on;
    2. a worker killed again after epoch 4: no restarts left, the run fails;
    3. ``--resume`` continues it from its last checkpoint, keeping its recipe.

    Every planned epoch (head + 5) runs exactly once, in order, across all of it.
    """
    out = tmp_path / "model"
    killer = _Killer(out / "_runs", at=(2, 4))
    killer.start()
    with pytest.raises(DragonsError, match="training failed"):
        train(_cfg(small_data, out, max_failures=1))
    killer.join(timeout=5)
    assert len(killer.killed) == 2, f"killed {killer.killed}: the run was meant to lose two workers"
    found = latest_checkpoint(str(out / "_runs" / os.listdir(out / "_runs")[0]))
    assert found is not None
    first_epochs = found[1]["history"]
    assert found[1]["resumes"] == 1  # restarted once within the run (the first kill)
    assert [h["epoch"] for h in first_epochs] == list(range(len(first_epochs))) and 4 <= len(first_epochs) < 6
    with pytest.raises(DragonsError, match="no earlier run"):
        train(_cfg(small_data, tmp_path / "other", resume=True))
    # The run's recipe is kept on resume, even where the data would now decide
    # otherwise: here the saved choice is edited to a value the rule never picks.
    import json

    recipe_file = out / "_runs" / os.listdir(out / "_runs")[0] / "recipe.json"
    saved = json.loads(recipe_file.read_text())
    assert saved["n_train"] == 48 and saved["settings"]["label_smoothing"] == 0.1 and saved["settings"]["epochs"] == 5
    # Other classes than the run started with: refused before any image is read.
    recipe_file.write_text(json.dumps({**saved, "classes": ["drogon", "rhaegal"]}))
    t0 = time.monotonic()
    with pytest.raises(DragonsError, match=r"started with the classes \[drogon, rhaegal\]"):
        train(_cfg(small_data, out, resume=True))
    assert time.monotonic() - t0 < 30
    saved["settings"]["label_smoothing"] = 0.05
    recipe_file.write_text(json.dumps(saved))
    meta = train(_cfg(small_data, out, resume=True)).meta
    assert meta["resumes"] == 2
    assert meta["config"]["label_smoothing"] == 0.05 and meta["recipe"]["auto"]["label_smoothing"] == 0.05
    assert [h["epoch"] for h in meta["history"]] == list(range(6))
    # The epochs before the kills come from the checkpoints, not from a second run of them.
    assert meta["history"][0]["time"] == pytest.approx(first_epochs[0]["time"])
    assert not set(killer.killed) & set(train_worker_pids())  # new worker processes finished it


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
