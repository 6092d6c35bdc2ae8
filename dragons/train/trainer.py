"""One worker's training run: fastai's ``fine_tune``, data-parallel, epoch by epoch.

A :class:`Trainer` holds the phases; :meth:`Trainer.train_one_epoch` is the loop's body:

* :meth:`~Trainer.precompute`: the frozen body's features, once, and the lr
  finder on them (on cached features it costs seconds, not minutes);
* :meth:`~Trainer.fit_head`: the head fitted on those features, many cheap
  passes in one epoch;
* :meth:`~Trainer.fit_images`: one epoch on augmented images, the body frozen or not;
* :meth:`~Trainer.validate`: after every epoch (with TTA after the last): the
  history row, the epoch table's line and what the checkpoint carries.

The model's own steps (a forward pass, an optimiser step) are
dragons.train.worker's. Every rank makes the same calls in the same order:
most steps hold collectives.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dragons import novelty
from dragons.runlog import say
from dragons.telemetry import TrainMetrics
from dragons.train import checkpoint
from dragons.train.checkpoint import RunState
from dragons.train.config import TrainConfig
from dragons.train.ranks import gather, mean_all
from dragons.train.stream import Source
from dragons.train.worker import Preds, Worker


def epoch_phases(cfg: TrainConfig) -> list[str]:
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


class Trainer:
    """A worker's run: its model (``worker``), where the run stands (``run``) and its shards."""

    def __init__(self, worker: Worker, run: RunState, train: Source, valid: Source) -> None:
        self.worker, self.run, self.train, self.valid = worker, run, train, valid
        self.cfg = worker.cfg
        self.phases = epoch_phases(self.cfg)
        self.feats: Features | None = None
        # Epoch, loss and accuracy on Ray's metrics endpoint (Grafana), from rank 0 only.
        self.metrics = TrainMetrics(checkpoint.RunFolder.of(self.cfg).name) if worker.rank == 0 else None

    def say(self, message: str) -> None:
        if self.worker.rank == 0:  # one line for the whole group
            say(message)

    def epochs_left(self) -> range:
        return range(self.run.epochs_done, len(self.phases))

    def train_one_epoch(self, epoch: int) -> Scores:
        """Train, validate, checkpoint."""
        t0 = time.perf_counter()
        fit = self.fit_head(epoch) if self.phases[epoch] == "head" else self.fit_images(epoch)
        last = epoch == len(self.phases) - 1
        scores = self.validate(fit, t0, tta=self.cfg.tta if last else 0)
        # The last epoch's checkpoint is the artifact: it carries the novelty statistics of the final model.
        nov = self.novelty() if last else None
        self.feats = None  # only the head phase (epoch 0) uses them: free them before fine-tuning
        self.run.epochs_done = epoch + 1
        state = self.run.state(scores.tta)
        if nov is not None:
            state["novelty"] = nov
        checkpoint.save(self.worker.rank, self.worker.model, state, scores.metrics, scores.preds)
        return scores

    def novelty(self) -> dict[str, Any]:
        """The final model's novelty scorer (dragons.novelty) as model.json keeps it: statistics of
        the training images' eval-view features, summed over ranks, and the 95th percentile of
        the validation images' novelty as its threshold.

        When the body never trained (the head recipe) the precomputed eval-view features are the
        final model's: no image is read again. Otherwise one eval pass over both shards."""
        worker, feats = self.worker, self.feats
        if feats is not None and "head" in self.phases and self.phases[-1] == "head":
            n = len(self.train)  # rows k * n + i hold view k: view 0 is the eval view
            train_f, train_y = feats.train[:n], feats.train_y[:n]
            valid_f = feats.valid[0] if feats.valid is not None else None
        else:
            spill_dir = os.path.join(tempfile.gettempdir(), "dragons-features")
            train_f, train_y = worker.features(self.train, 0, what="novelty statistics: train", spill_dir=spill_dir)
            valid_f, _ = worker.features(self.valid, 0, what="novelty statistics: valid", spill_dir=spill_dir)

        def chunks(f: torch.Tensor) -> list[np.ndarray]:  # fp32 a chunk at a time: the features may be a disk map
            return [f[i : i + 8192].float().numpy() for i in range(0, len(f), 8192)]

        y = train_y.numpy()
        stats = novelty.Stats.of(np.zeros((0, worker.model.num_features)), y[:0], len(worker.classes))
        for i, c in enumerate(chunks(train_f)):
            stats = stats + novelty.Stats.of(c, y[i * 8192 : i * 8192 + len(c)], len(worker.classes))
        nov = novelty.fit(stats.all_reduce())

        def scores(f: torch.Tensor) -> np.ndarray:
            return gather(np.concatenate([nov.score(c) for c in chunks(f)] or [np.zeros(0)]))

        nov = novelty.with_threshold(nov, scores(valid_f) if valid_f is not None else None, scores(train_f))
        shown = "none" if nov.threshold_p95 is None else f"{nov.threshold_p95:.3f}"
        self.say(
            f"novelty: Mahalanobis over {nov.proj.shape[1]} principal directions (+ the residual), fitted on "
            f"{nov.fitted_on} training images; threshold (95th percentile, {nov.threshold_from}) {shown}"
        )
        return nov.to_meta()

    def precompute(self, lr_find_only: bool = False) -> None:
        """Body features when the head phase or the lr finder needs them; the lr
        finder sets ``run.lr`` when asked for (lr 0, or ``lr_find_only``: dragons
        lr-find, which wants the sweep and no head)."""
        cfg, run, worker = self.cfg, self.run, self.worker
        fresh = run.epochs_done == 0
        if not ((cfg.precompute and fresh) or lr_find_only or (run.lr == 0 and fresh)):
            return
        for_head = cfg.precompute and not lr_find_only
        # Augmented views give the head the variety fine-tuning would see, at the
        # price of a forward pass each (no backward): cheap augmentation.
        views = cfg.head_views if for_head else 0
        shown = f" (+{views} augmented views each)" if views else ""
        spill_dir = os.path.join(tempfile.gettempdir(), "dragons-features")
        feats = Features(*worker.features(self.train, views, what=f"precompute train{shown}", spill_dir=spill_dir))
        if for_head:
            valid_feats, valid_y = worker.features(self.valid, 0, what="precompute valid", spill_dir=spill_dir)
            feats.valid = (valid_feats, valid_y.numpy())
        if run.lr == 0 or lr_find_only:
            run.lr_find = worker.lr_find(feats.train, feats.train_y)
            run.lr = float(run.lr_find["suggestion"])
            self.say(f"lr_find suggests lr={run.lr:.2e}")
        self.feats = feats

    def save_lr_find(self) -> None:
        """dragons lr-find: the sweep is the whole result."""
        state = {"epochs_done": 0, "history": [], "lr": self.run.lr, "lr_find": self.run.lr_find}
        checkpoint.save(self.worker.rank, self.worker.model, state, {"lr": self.run.lr}, None)

    def fit_head(self, epoch: int) -> Fit:
        """The head on the cached features: ``head_epochs`` passes in one cycle, at
        ``head_lr_scale`` x the base rate (fixed features take a larger rate)."""
        assert self.feats is not None, "precompute runs whenever the head phase is still to do"
        lr = self.run.lr * self.cfg.head_lr_scale
        loss, curve = self.worker.fit_head(
            self.feats.train, self.feats.train_y, lr, max(1, self.cfg.head_epochs), valid=self.feats.valid
        )
        return Fit(epoch, "head", loss, lr, curve)

    def fit_images(self, epoch: int) -> Fit:
        """One epoch over the shard's augmented images, frozen (the head alone) or
        unfrozen. A phase's epochs share one cycle and one optimiser (AdamW's
        moments carry over from epoch to epoch, as in fastai's ``fit_one_cycle``);
        a resumed run starts the cycle at this epoch's step with the moments its
        checkpoint saved (``run.optimizer``)."""
        worker, run, phase = self.worker, self.run, self.phases[epoch]
        frozen = phase == "frozen"
        worker.set_frozen(frozen)
        net = worker.wrap(worker.model)
        steps = worker.steps_per_epoch(self.train)
        total, start = steps * self.phases.count(phase), (epoch - self.phases.index(phase)) * steps
        opt, sched, max_lrs = worker.phase_optimizer(phase, run.lr, total, start, run.optimizer)
        loss = worker.train_images(self.train, opt, sched, frozen, net, epoch=epoch, what=f"epoch {epoch} {phase}")
        run.optimizer = {"phase": phase, "state": opt.state_dict()}  # saved with the epoch's checkpoint
        return Fit(epoch, phase, loss, max_lrs[-1])

    def validate(self, fit: Fit, t0: float, tta: int = 0) -> Scores:
        """Score the epoch's model on the valid rows; append and say its history row.

        ``t0``: when the epoch began (its time leaves the TTA pass out). ``tta``
        (the last epoch): a second pass over that many augmented views of each image.
        """
        worker, feats = self.worker, self.feats
        if fit.phase == "head" and feats is not None and feats.valid is not None and not tta:
            # The body is frozen: the valid features are cached.
            preds = Preds(self.valid.row_ids(), feats.valid[1], worker.predict_features(feats.valid[0]))
        else:
            preds = worker.predict(self.valid, what=f"epoch {fit.epoch} validate")
        valid_loss, acc = worker.validate(preds.y, preds.probs)
        row: dict[str, Any] = {
            "epoch": fit.epoch,
            "phase": fit.phase,
            "train_loss": mean_all(fit.train_loss),
            "valid_loss": valid_loss,
            "accuracy": acc,
            "time": time.perf_counter() - t0,
            "lr": fit.lr,
        }
        self.run.history.append(row)
        if self.metrics is not None:
            self.metrics.epoch(row)
        if fit.curve:
            row["head_curve"] = fit.curve  # one point per pass over the cached features, for the report
        metrics: dict[str, Any] = {
            "epoch": fit.epoch,
            "valid_loss": valid_loss,
            "accuracy": acc,
            "train_loss": row["train_loss"],
        }
        # Only (row id, probabilities) travel to rank 0, for the report.
        idx, probs = gather(preds.idx), gather(preds.probs)
        passes = [probs]
        tta_scores: dict[str, float] | None = None
        if tta:
            tpreds = worker.predict(self.valid, tta=tta, what=f"TTA x{tta}")
            tloss, tacc = worker.validate(tpreds.y, tpreds.probs)
            metrics.update({"valid_loss_tta": tloss, "accuracy_tta": tacc})
            tta_scores = {"accuracy": tacc, "valid_loss": tloss}
            order, tprobs = gather(tpreds.idx), gather(tpreds.probs)
            # The same rows in the same order as the plain pass (streams are reproducible, but say so).
            pos = {int(i): k for k, i in enumerate(order)}
            passes.append(tprobs[[pos[int(i)] for i in idx]])
        for line in table_lines(self.run.history):
            self.say(line)
        if tta_scores is not None:
            self.say(f"TTA x{tta}: valid_loss {tta_scores['valid_loss']:.4f} accuracy {tta_scores['accuracy']:.4f}")
        return Scores(metrics, (idx, np.stack(passes)), tta_scores)


def table_lines(history: list[dict[str, Any]]) -> list[str]:
    """The epoch table's line for the newest epoch, after the header for the first."""
    h = history[-1]
    header = f"{'epoch':>5}  {'phase':<9}{'train_loss':>11}{'valid_loss':>11}{'accuracy':>10}{'time':>8}"
    mins, secs = divmod(int(round(h["time"])), 60)
    line = f"{h['epoch']:>5}  {h['phase']:<9}{h['train_loss']:>11.4f}{h['valid_loss']:>11.4f}{h['accuracy']:>10.4f}{mins:>5}:{secs:02d}"
    return [header, line] if len(history) == 1 else [line]
