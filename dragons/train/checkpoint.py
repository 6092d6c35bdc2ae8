"""A run's saved state: its folder, its recipe file and its checkpoints.

Every read of saved state is here (the driver's and the workers'), so what a
resume trusts is decided in one place:

* the run's folder (:class:`RunFolder`): ``<storage>/<name>``, named after
  ``--out`` unless ``--name`` says otherwise; Ray Train resumes by this name;
* its recipe file (:func:`saved_recipe`): what the run decided at its start,
  which ``--resume`` keeps;
* its checkpoints: a folder per epoch holding ``STATE_FILE`` (the weights and
  the run's :class:`RunState`) and, after a trained epoch, ``PREDS_FILE`` (the
  validation predictions the report is drawn from). Every epoch ends with one,
  through ``ray.train.report`` (:func:`save`); a restarted worker group
  (``--max-failures``) or a ``--resume`` continues from the newest complete one
  (:func:`restore`); the driver reads the last one (:func:`final_state`).
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dragons import storage
from dragons.errors import DragonsError
from dragons.train import recipe
from dragons.train.config import TrainConfig

STATE_FILE = "state.pt"
PREDS_FILE = "valid_preds.npz"


@dataclass(frozen=True)
class RunFolder:
    """Where a run keeps its checkpoints and recipe file."""

    name: str  # Ray Train's run name (it resumes by it)
    storage: str  # the folder runs are kept under (--storage, else <out>/_runs)

    @classmethod
    def of(cls, cfg: TrainConfig, lr_find: bool = False) -> "RunFolder":
        """``lr_find``: dragons lr-find's sweep, whose checkpoints must never meet a training run's."""
        name = cfg.name
        if not name:  # derived from --out, so a --resume with the same --out finds the run
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", storage.parse(cfg.out or cfg.data).uri.strip("/")).strip("-")
            name = ("lr-find-" if lr_find else "") + slug[-80:]
        return cls(name, cfg.storage or storage.join(cfg.out or os.path.expanduser("~/dragons_results"), "_runs"))

    @property
    def uri(self) -> str:
        return storage.join(self.storage, self.name)

    @property
    def recipe_uri(self) -> str:
        return storage.join(self.uri, recipe.RECIPE_FILE)


def saved_recipe(cfg: TrainConfig, classes: list[str], data: str) -> dict[str, Any] | None:
    """For ``--resume``: the run's saved recipe (None for a fresh run, or a run
    started by a dragons without recipe files). Checked before any image is
    read: the run must exist, and its classes must be the data's (the head's
    outputs are those classes, in that order)."""
    if not cfg.resume:
        return None
    run = RunFolder.of(cfg)
    if not storage.exists(run.uri):
        raise DragonsError(f"--resume: no earlier run at {run.uri}; run without --resume first (same --out/--name)")
    if not storage.exists(run.recipe_uri):
        return None
    saved = recipe.from_json(storage.read_bytes(run.recipe_uri), run.recipe_uri)
    if saved["classes"] != classes:

        def show(c: list[str]) -> str:
            return ", ".join(c[:10]) + (f" … ({len(c)} in all)" if len(c) > 10 else "")

        raise DragonsError(
            f"--resume: the run at {run.uri} was started with the classes [{show(saved['classes'])}] "
            f"but {data} has [{show(classes)}]; resume on the same classes, or start a new run "
            "(without --resume, or with another --name)"
        )
    return saved


def final_state(result: Any) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """The state in a finished Ray Train ``Result``'s last checkpoint, and its
    validation predictions (row ids, probabilities by pass) when it has them."""
    ckpt = result.checkpoint
    if ckpt is None:
        raise DragonsError("training finished without a checkpoint; see the worker log above")
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        idx = probs = None
        if os.path.exists(os.path.join(d, PREDS_FILE)):
            z = np.load(os.path.join(d, PREDS_FILE))
            idx, probs = z["idx"], z["probs"]
    return state, idx, probs


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
        out: dict[str, Any] = {
            "epochs_done": self.epochs_done,
            "history": self.history,
            "lr": self.lr,
            "lr_find": self.lr_find,
            "resumes": self.resumes,
            "optimizer": self.optimizer,
        }
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
    return RunState(
        lr=float(state["lr"]),
        epochs_done=int(state["epochs_done"]),
        history=list(state["history"]),
        lr_find=state.get("lr_find"),
        resumes=int(state.get("resumes", 0)) + 1,
        optimizer=state.get("optimizer"),
    )


def save(
    rank: int,
    model: nn.Module,
    state: dict[str, Any],
    metrics: dict[str, Any],
    preds: tuple[np.ndarray, np.ndarray] | None,
) -> None:
    """Report ``metrics`` with a checkpoint of ``state`` and the weights.

    All ranks call report (it is a barrier); only rank 0 attaches files.
    ``preds``: (row ids, probabilities stacked by pass: plain[, TTA]).
    """
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(
            {**state, "model": {k: v.cpu() for k, v in model.state_dict().items()}}, os.path.join(tmp, STATE_FILE)
        )
        if preds is not None:
            np.savez(os.path.join(tmp, PREDS_FILE), idx=preds[0], probs=preds[1])
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
