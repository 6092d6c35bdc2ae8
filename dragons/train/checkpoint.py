"""Checkpoints: what a run saves after every epoch, and where it resumes from.

A checkpoint folder holds ``STATE_FILE`` (the model's weights and the run's
:class:`RunState`) and, after a trained epoch, ``PREDS_FILE`` (the validation
predictions the report is drawn from). Every epoch ends with one, through
``ray.train.report``; a restarted worker group (``--max-failures``) or a
``--resume`` continues from the newest complete one.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dragons import storage

STATE_FILE = "state.pt"
PREDS_FILE = "valid_preds.npz"


@dataclass
class RunState:
    """Where a run stands: what a checkpoint carries besides the weights."""

    lr: float  # the base rate: the configured one, or the lr finder's suggestion
    epochs_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per epoch, the report's table
    lr_find: dict[str, Any] | None = None  # the lr finder's sweep, when it ran
    resumes: int = 0  # restarts of this run so far
    optimizer: dict[str, Any] | None = None  # the image phase's optimiser: {"phase", "state" (its state_dict)}

    def state(self, tta: dict[str, float] | None = None) -> dict[str, Any]:
        """The checkpoint's state (the weights are added by :func:`save`); ``tta``: the last epoch's TTA scores."""
        out: dict[str, Any] = {"epochs_done": self.epochs_done, "history": self.history, "lr": self.lr,
                               "lr_find": self.lr_find, "resumes": self.resumes, "optimizer": self.optimizer}
        if tta is not None:
            out["tta"] = tta
        return out


def latest_checkpoint(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """(uri, state) of the newest ``checkpoint_<timestamp>`` of a run whose state loads.

    Checkpoint folder names sort by time. One cut short by a failure (its state
    file missing or truncated) is passed over for the one before it.
    """
    if not storage.exists(run_dir):
        return None
    for name in sorted((d for d in storage.list_dirs(run_dir) if d.startswith("checkpoint_")), reverse=True):
        uri = storage.join(run_dir, name)
        try:
            raw = storage.read_bytes(storage.join(uri, STATE_FILE))
            return uri, torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception:  # incomplete: take the previous one
            continue
    return None


def restore(run_dir: str | None, model: nn.Module) -> RunState | None:
    """Load the run's newest checkpoint into ``model`` and return where the run
    stands (one more restart), or None for a fresh start.

    Where from, after a worker failure (--max-failures) or with --resume: the
    run's own newest complete checkpoint on storage. The driver deletes the run
    folder before a fresh run, so whatever is there belongs to this run. Not
    ray.train.get_checkpoint() alone: Ray's controller registers a checkpoint
    only when it next polls the workers, so a worker killed just after writing
    one restarts from an older checkpoint, or from nothing.
    """
    import ray.train

    found = latest_checkpoint(run_dir) if run_dir else None
    state = found[1] if found else None
    if state is None and (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    if state is None:
        return None
    model.load_state_dict(state["model"])
    return RunState(lr=float(state["lr"]), epochs_done=int(state["epochs_done"]), history=list(state["history"]),
                    lr_find=state.get("lr_find"), resumes=int(state.get("resumes", 0)) + 1,
                    optimizer=state.get("optimizer"))


def save(rank: int, model: nn.Module, state: dict[str, Any], metrics: dict[str, Any],
         preds: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Report ``metrics`` with a checkpoint of ``state`` and the weights.

    All ranks call report (it is a barrier); only rank 0 attaches files.
    ``preds``: (row ids, probabilities stacked by pass: plain[, TTA]).
    """
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({**state, "model": {k: v.cpu() for k, v in model.state_dict().items()}}, os.path.join(tmp, STATE_FILE))
        if preds is not None:
            np.savez(os.path.join(tmp, PREDS_FILE), idx=preds[0], probs=preds[1])
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
