"""The phases of a training run, each a function of the Worker and the RunState.

* :func:`precompute`: the frozen body's features, once, and the lr finder on
  them (on cached features it costs seconds, not minutes);
* :func:`head`: the head fitted on those features, many cheap passes in one epoch;
* :func:`images`: one epoch on augmented images, the body frozen or not;
* :func:`validate`: after every epoch (with TTA after the last): the history
  row, the epoch table line and what the checkpoint carries.

Every rank runs the same calls in the same order: most steps hold collectives.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dragons.train.checkpoint import RunState
from dragons.train.config import TrainConfig
from dragons.train.ranks import gather, mean_all
from dragons.train.stream import Source
from dragons.train.worker import Preds, Worker


def plan(cfg: TrainConfig) -> list[str]:
    """The phase of every epoch: the head (with precompute) or frozen epochs, then the unfrozen ones."""
    return (["head"] if cfg.precompute else ["frozen"] * cfg.freeze_epochs) + ["unfrozen"] * cfg.epochs


@dataclass
class Features:
    """The precompute phase's body features (fp16), for the head phase."""

    train: torch.Tensor  # row k * n + i: view k of training image i (view 0: the eval view)
    train_y: torch.Tensor
    # Valid features and labels: with the body frozen, validating the head costs a matrix product.
    valid: tuple[torch.Tensor, np.ndarray] | None = None


@dataclass
class Fit:
    """One epoch's training, as its history row needs it."""

    epoch: int
    phase: str
    train_loss: float  # this rank's; the history holds the mean over ranks
    lr: float  # the epoch's peak rate: the head's, or the last layer group's
    curve: list[dict[str, float]] = field(default_factory=list)  # the head's scores after each pass


@dataclass
class Scores:
    """One epoch's validation, as the checkpoint carries it."""

    metrics: dict[str, Any]  # reported to Ray Train
    preds: tuple[np.ndarray, np.ndarray]  # every rank's (row ids, probabilities stacked by pass: plain[, TTA])
    tta: dict[str, float] | None = None  # the TTA pass's accuracy and valid_loss


def precompute(worker: Worker, run: RunState, train: Source, valid: Source) -> Features | None:
    """Body features when the head phase or the lr finder needs them (None
    otherwise); the lr finder sets ``run.lr`` when asked for (lr 0 or lr-find)."""
    cfg = worker.cfg
    fresh = run.epochs_done == 0
    if not ((cfg.precompute and fresh) or cfg.lr_find_only or (run.lr == 0 and fresh)):
        return None
    for_head = cfg.precompute and not cfg.lr_find_only
    # Augmented views give the head the variety fine-tuning would see, at the
    # price of a forward pass each (no backward): cheap augmentation.
    views = cfg.head_views if for_head else 0
    shown = f" (+{views} augmented views each)" if views else ""
    spill_dir = os.path.join(tempfile.gettempdir(), "dragons-features")
    feats = Features(*worker.features(train, views, what=f"precompute train{shown}", spill_dir=spill_dir))
    if for_head:
        valid_feats, valid_y = worker.features(valid, 0, what="precompute valid", spill_dir=spill_dir)
        feats.valid = (valid_feats, valid_y.numpy())
    if run.lr == 0 or cfg.lr_find_only:
        run.lr_find = worker.lr_find(feats.train, feats.train_y)
        run.lr = float(run.lr_find["suggestion"])
        if worker.rank == 0:
            print(f"lr_find suggests lr={run.lr:.2e}", flush=True)
    return feats


def head(worker: Worker, run: RunState, feats: Features | None, epoch: int) -> Fit:
    """The head on the cached features: ``head_epochs`` passes in one cycle, at
    ``head_lr_scale`` x the base rate (fixed features take a larger rate)."""
    assert feats is not None, "precompute runs whenever the head phase is still to do"
    lr = run.lr * worker.cfg.head_lr_scale
    loss, curve = worker.fit_head(feats.train, feats.train_y, lr, max(1, worker.cfg.head_epochs), valid=feats.valid)
    return Fit(epoch, "head", loss, lr, curve)


def images(worker: Worker, run: RunState, train: Source, plan: list[str], epoch: int) -> Fit:
    """One epoch over the shard's augmented images, frozen (the head alone) or
    unfrozen. A phase's epochs share one cycle and one optimiser (AdamW's
    moments carry over from epoch to epoch, as in fastai's ``fit_one_cycle``);
    a resumed run starts the cycle at this epoch's step with the moments its
    checkpoint saved (``run.optimizer``)."""
    phase = plan[epoch]
    frozen = phase == "frozen"
    worker.set_frozen(frozen)
    net = worker.wrap(worker.model)
    steps = worker.steps_per_epoch(train)
    total, start = steps * plan.count(phase), (epoch - plan.index(phase)) * steps
    opt, sched, max_lrs = worker.phase_optimizer(phase, run.lr, total, start, run.optimizer)
    loss = worker.train_images(train, opt, sched, frozen, net, epoch=epoch, what=f"epoch {epoch} {phase}")
    run.optimizer = {"phase": phase, "state": opt.state_dict()}  # saved with the epoch's checkpoint
    return Fit(epoch, phase, loss, max_lrs[-1])


def validate(worker: Worker, run: RunState, valid: Source, fit: Fit, feats: Features | None, t0: float, tta: int = 0) -> Scores:
    """Score the epoch's model on the valid rows; append and print its history row.

    ``t0``: when the epoch began (its time leaves the TTA pass out). ``tta``
    (the last epoch): a second pass over that many augmented views of each image.
    """
    if fit.phase == "head" and feats is not None and feats.valid is not None and not tta:
        # The body is frozen: the valid features are cached.
        preds = Preds(valid_rows(valid), feats.valid[1], worker.predict_features(feats.valid[0]))
    else:
        preds = worker.predict(valid, what=f"epoch {fit.epoch} validate")
    valid_loss, acc = worker.validate(preds.y, preds.probs)
    row: dict[str, Any] = {"epoch": fit.epoch, "phase": fit.phase, "train_loss": mean_all(fit.train_loss), "valid_loss": valid_loss,
                           "accuracy": acc, "time": time.perf_counter() - t0, "lr": fit.lr}
    run.history.append(row)
    if fit.curve:
        row["head_curve"] = fit.curve  # one point per pass over the cached features, for the report
    metrics: dict[str, Any] = {"epoch": fit.epoch, "valid_loss": valid_loss, "accuracy": acc, "train_loss": row["train_loss"]}
    # Only (row id, probabilities) travel to rank 0, for the report.
    idx, probs = gather(preds.idx), gather(preds.probs)
    passes = [probs]
    tta_scores: dict[str, float] | None = None
    if tta:
        tpreds = worker.predict(valid, tta=tta, what=f"TTA x{tta}")
        tloss, tacc = worker.validate(tpreds.y, tpreds.probs)
        metrics.update({"valid_loss_tta": tloss, "accuracy_tta": tacc})
        tta_scores = {"accuracy": tacc, "valid_loss": tloss}
        order, tprobs = gather(tpreds.idx), gather(tpreds.probs)
        # The same rows in the same order as the plain pass (streams are reproducible, but say so).
        pos = {int(i): k for k, i in enumerate(order)}
        passes.append(tprobs[[pos[int(i)] for i in idx]])
    print_row(run.history, worker.rank)
    if tta_scores is not None and worker.rank == 0:
        print(f"TTA x{tta}: valid_loss {tta_scores['valid_loss']:.4f} accuracy {tta_scores['accuracy']:.4f}", flush=True)
    return Scores(metrics, (idx, np.stack(passes)), tta_scores)


def print_row(history: list[dict[str, Any]], rank: int) -> None:
    """The epoch table's line for the newest epoch (rank 0), after a header for the first."""
    if rank != 0:
        return
    h = history[-1]
    if len(history) == 1:
        print(f"{'epoch':>5}  {'phase':<9}{'train_loss':>11}{'valid_loss':>11}{'accuracy':>10}{'time':>8}", flush=True)
    mins, secs = divmod(int(round(h["time"])), 60)
    print(f"{h['epoch']:>5}  {h['phase']:<9}{h['train_loss']:>11.4f}{h['valid_loss']:>11.4f}{h['accuracy']:>10.4f}{mins:>5}:{secs:02d}", flush=True)


def valid_rows(src: Source) -> np.ndarray:
    """Row ids of an unshuffled pass over ``src``, without decoding an image."""
    return src.row_ids()
