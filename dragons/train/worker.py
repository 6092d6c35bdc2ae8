"""One Ray Train worker's model and the steps it takes: features, head fits,
the lr finder, image epochs and prediction.

The training loop (dragons.train.loop, dragons.train.trainer) decides which
steps run when; a Worker also runs alone, without Ray (one rank of one), which
is how the unit tests and benchmarks/ft_holdout.py use it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dragons.models.registry import Classifier, build_model, get_spec
from dragons.predictor import Predictor, amp_dtype
from dragons.preprocess import eval_batch, get_preset, train_batch
from dragons.runlog import Progress
from dragons.train.config import TrainConfig
from dragons.train.ranks import all_reduce, mean_all, world
from dragons.train.schedule import discriminative_lrs, exp_lrs, is_finite, one_cycle, smooth, suggest_valley
from dragons.train.stream import Source, num_steps

# Images per forward pass when nothing is learnt (features, validation).
EVAL_BATCH = 32


@dataclass
class Preds:
    """One rank's predictions: row ids, labels and class probabilities."""

    idx: np.ndarray
    y: np.ndarray
    probs: np.ndarray


# Precomputed features above this many bytes (per worker) go to a memory-mapped
# file on local disk instead of RAM: fp16, 2.5 KB per image and view for Lite0.
SPILL_BYTES = 256 * 1024 * 1024


def _feature_buffer(rows: int, dim: int, spill_dir: str | None) -> torch.Tensor:
    """A zeroed fp16 (rows, dim) buffer: in RAM, or beyond ``SPILL_BYTES`` memory-mapped under ``spill_dir``."""
    if rows * dim * 2 <= SPILL_BYTES or spill_dir is None:
        return torch.zeros(rows, dim, dtype=torch.float16)
    os.makedirs(spill_dir, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".f16", dir=spill_dir)
    os.close(fd)
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(rows, dim))
    os.unlink(path)  # the mapping keeps the file alive; nothing is left behind
    return torch.from_numpy(mm)


class Worker:
    """State and steps of one Ray Train worker; a dragons.train.trainer.Trainer drives it."""

    def __init__(
        self, cfg: TrainConfig, classes: list[str], class_weights: list[float] | None, device: torch.device
    ) -> None:
        auto = [
            f for f in cfg.unresolved() if f in ("augment", "label_smoothing", "lr_mult")
        ]  # what a worker reads itself
        if auto:  # a programming error: run.train resolves the config before any worker starts
            raise ValueError(
                f"TrainConfig fields still 'auto' (resolve them with dragons.train.recipe.resolve): {auto}"
            )
        self.cfg = cfg
        self.classes = classes
        self.device = device
        self.rank, self.world = world()
        torch.manual_seed(cfg.seed)  # identical head init on every rank
        self.model: Classifier = build_model(cfg.arch, len(classes), cfg.weights).to(device)
        self.model = self.model.to(memory_format=torch.channels_last)
        spec = get_spec(cfg.arch)
        self.mean, self.std = spec.mean, spec.std
        self.preset = get_preset(cfg.augment)
        w = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=w, label_smoothing=cfg.label_smoothing)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.amp_dtype = amp_dtype(device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        # The current image phase's (optimiser, schedule, max rates): see phase_optimizer.
        self._phase_opt: tuple[str, tuple[torch.optim.Optimizer, Any, list[float]]] | None = None

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def progress(self, what: str, total_local: int, unit: str = "images") -> Progress:
        """Rank 0 prints for everyone: its count x world is the step's (equal shards)."""
        total = int(all_reduce([float(total_local)])[0])
        return Progress(what, total, enabled=self.rank == 0, every_s=self.cfg.progress_s, scale=self.world, unit=unit)

    # ----- evaluation ------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, src: Source, tta: int = 0, what: str = "") -> Preds:
        """Class probabilities of every row of ``src`` (eval mode, centre crop)."""
        predictor = Predictor(
            self.model, self.cfg.image_size, self.mean, self.std, self.device, tta=tta, amp_dtype=self.amp_dtype
        )
        out, ys, ids = [], [], []
        prog = self.progress(what, len(src)) if what else None
        for x, y, idx in src.batches(EVAL_BATCH):
            plain = predictor(x)
            out.append(plain.cpu().numpy())
            ys.append(y.numpy())
            ids.append(idx.numpy())
            if prog:
                prog.update(len(y))
        if prog:
            prog.finish()
        probs = np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)
        return Preds(np.concatenate(ids).astype(np.int64), np.concatenate(ys).astype(np.int64), probs)

    @torch.inference_mode()
    def predict_features(self, feats: torch.Tensor) -> np.ndarray:
        self.model.head.eval()
        out = [
            self.model.head(feats[i : i + 4096].float().to(self.device)).float().softmax(1).cpu().numpy()
            for i in range(0, len(feats), 4096)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def validate(self, y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
        """(valid_loss, accuracy) over all ranks."""
        y = np.asarray(y)
        p = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0) if len(y) else np.zeros(0)
        correct = float((probs.argmax(1) == y).sum()) if len(y) else 0.0
        loss_sum, correct, n = all_reduce([float(-np.log(p).sum()), correct, float(len(y))])
        return loss_sum / max(n, 1), correct / max(n, 1)

    # ----- precompute ------------------------------------------------------------
    @torch.inference_mode()
    def features(
        self, src: Source, views: int = 0, what: str = "", spill_dir: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Body features of every image in one streaming pass: the eval view and
        ``views`` random augmented views of each (rows ``k * n + i`` hold view k of
        image i). Stored as fp16 (half the memory; the head trains in fp32), in a
        memory-mapped file beyond ``SPILL_BYTES``. Returns (features, labels)."""
        self.model.eval()
        n = len(src)
        feats = _feature_buffer(n * (views + 1), self.model.num_features, spill_dir)
        labels = torch.zeros(n * (views + 1), dtype=torch.long)
        prog = self.progress(what, n) if what else None
        done = 0
        for x, y, _ in src.batches(EVAL_BATCH):
            x = x.to(self.device)
            b = len(y)
            for k in range(views + 1):
                if b == 0:
                    break
                view = (
                    eval_batch(x, self.cfg.image_size, self.mean, self.std)
                    if k == 0
                    else train_batch(x, self.cfg.image_size, self.mean, self.std, self.preset, self.gen)
                )
                with self.autocast():
                    feats[k * n + done : k * n + done + b] = self.model.body(view).float().cpu().half()
                labels[k * n + done : k * n + done + b] = y
            done += b
            if prog:
                prog.update(b)
        if prog:
            prog.finish()
        return feats, labels

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DDP when there are several ranks (its gradients averaged over them)."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _head_steps(self, n: int) -> int:
        n_min = int(all_reduce([float(n)], op="min")[0])
        return max(1, n_min // self.cfg.batch_size)

    def fit_head(
        self,
        feats: torch.Tensor,
        labels: torch.Tensor,
        lr: float,
        epochs: int,
        valid: tuple[torch.Tensor, np.ndarray] | None = None,
    ) -> tuple[float, list[dict[str, float]]]:
        """Fit the head on cached features with one cycle.

        Returns the last pass's mean train loss and, with ``valid`` (cached valid
        features and their labels), each pass's train loss, valid loss and
        accuracy: the head's training curve costs one matrix product per pass.
        """
        head = self.wrap(self.model.head)
        opt = torch.optim.AdamW(self.model.head.parameters(), lr=lr, weight_decay=self.cfg.weight_decay)
        bs = self.cfg.batch_size
        steps = self._head_steps(len(labels))
        sched = one_cycle(opt, [lr], steps * epochs, pct_start=0.25)
        self.model.head.train()
        losses = []
        curve: list[dict[str, float]] = []
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=self.gen)
            for s in range(steps):
                sel = order[(torch.arange(bs) + s * bs) % len(labels)]
                loss = self.loss_fn(head(feats[sel].float().to(self.device)), labels[sel].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            if valid is not None:
                vloss, vacc = self.validate(valid[1], self.predict_features(valid[0]))
                curve.append(
                    {"train_loss": mean_all(float(np.mean(losses[-steps:]))), "valid_loss": vloss, "accuracy": vacc}
                )
                self.model.head.train()
        return (float(np.mean(losses[-steps:])) if losses else float("nan")), curve

    def lr_find(
        self, feats: torch.Tensor, labels: torch.Tensor, start: float = 1e-6, end: float = 1.0, steps: int = 100
    ) -> dict[str, Any]:
        """Exponential sweep on a throw-away copy of the head; the real head is untouched."""
        saved = {k: v.clone() for k, v in self.model.head.state_dict().items()}
        head = self.wrap(self.model.head)
        opt = torch.optim.AdamW(self.model.head.parameters(), lr=start, weight_decay=self.cfg.weight_decay)
        bs = self.cfg.batch_size
        lrs = exp_lrs(start, end, steps)
        raw: list[float] = []
        self.model.head.train()
        best = float("inf")
        for step, lr in enumerate(lrs):
            for g in opt.param_groups:
                g["lr"] = lr
            sel = torch.randint(0, len(labels), (bs,), generator=self.gen)
            loss = self.loss_fn(head(feats[sel].float().to(self.device)), labels[sel].to(self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = mean_all(loss.item())
            raw.append(value)
            smoothed = smooth(raw)[-1]
            best = min(best, smoothed)
            # Stop like fastai once the loss diverges (the same decision on every rank).
            if not is_finite(smoothed) or (step > 10 and smoothed > 4 * best):
                break
        self.model.head.load_state_dict(saved)
        sm = smooth(raw)
        used = lrs[: len(sm)]
        return {"lrs": used, "losses": sm, "suggestion": suggest_valley(used, sm)}

    # ----- image epochs ----------------------------------------------------------
    def set_frozen(self, frozen: bool) -> None:
        """Frozen: only the head trains. Unfrozen: the body too, except its early
        half under ``freeze_early``: the first stages run at the highest
        resolution, so leaving them out of autograd halves a step's CPU time."""
        for p in self.model.body.parameters():
            p.requires_grad_(not frozen)
        if not frozen and self.cfg.freeze_early:
            for p in self.model.layer_groups()[0]:
                p.requires_grad_(False)

    def train_mode(self, frozen: bool) -> None:
        """Train mode for the head and dropout; BatchNorm layers stay in eval mode
        unless ``bn_stats``.

        Why frozen BN by default: the head was fitted on features computed with
        BN's running (ImageNet) statistics. In train mode BN normalises by each
        per-worker batch's own statistics instead (16 images, 4x4 maps in the
        last stages): the features shift under the head and the first unfrozen
        epoch starts far off (train loss 0.07 -> 1.43 on 300 flowers, chance
        1.61). And with EfficientNet's BN momentum of 0.01 the running statistics
        lag the changing weights, so eval-mode validation degrades too.
        """
        self.model.train()
        if frozen or not self.cfg.bn_stats:
            for m in self.model.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def frozen_optimizer(
        self, lr: float, total_steps: int, start_step: int = 0
    ) -> tuple[torch.optim.Optimizer, Any, list[float]]:
        """fastai ``fine_tune`` before the unfreeze: the head alone at the base
        rate, one cycle that warms up for almost all of it (pct_start 0.99).
        Returns (optimizer, scheduler, max rates)."""
        opt = torch.optim.AdamW(
            [{"params": list(self.model.head.parameters()), "lr": lr}], weight_decay=self.cfg.weight_decay
        )
        sched = one_cycle(opt, [lr], total_steps, pct_start=0.99, div=25.0, start_step=start_step)
        return opt, sched, [lr]

    def unfrozen_optimizer(
        self, lr: float, total_steps: int, start_step: int = 0
    ) -> tuple[torch.optim.Optimizer, Any, list[float]]:
        """fastai ``fine_tune`` after the freeze: half the base rate, spread over
        the layer groups (early body lr/2/lr_mult ... head lr/2), one cycle with a
        short warm-up from max/5. Returns (optimizer, scheduler, max rates)."""
        max_lrs = discriminative_lrs(lr / 2, self.cfg.lr_mult, 3)
        params: list[dict[str, Any]] = [
            {"params": [p for p in g if p.requires_grad], "lr": r} for g, r in zip(self.model.layer_groups(), max_lrs)
        ]
        params = [g for g in params if g["params"]]  # a frozen early group has nothing to step
        max_lrs = [g["lr"] for g in params]
        opt = torch.optim.AdamW(params, weight_decay=self.cfg.weight_decay)
        sched = one_cycle(opt, max_lrs, total_steps, pct_start=0.3, div=5.0, start_step=start_step)
        return opt, sched, max_lrs

    def phase_optimizer(
        self, phase: str, lr: float, total_steps: int, start_step: int, saved: dict[str, Any] | None = None
    ) -> tuple[torch.optim.Optimizer, Any, list[float]]:
        """The optimiser and schedule of image phase ``phase`` ("frozen" or
        "unfrozen"), built at its first epoch and kept for the rest: a fresh
        AdamW every epoch would restart its moment estimates, and its first
        bias-corrected step moves every weight by about the full rate at once.
        ``saved`` (a checkpoint's ``{"phase", "state"}``) restores the moments
        when a resumed run re-enters the phase part-way."""
        if self._phase_opt is not None and self._phase_opt[0] == phase:
            return self._phase_opt[1]
        make = self.frozen_optimizer if phase == "frozen" else self.unfrozen_optimizer
        opt, sched, max_lrs = make(lr, total_steps, start_step)
        if saved is not None and saved.get("phase") == phase and start_step > 0:
            # Only moments of the same parameters: a resume that changes the groups
            # (--freeze-early drops the early one) starts the optimiser afresh.
            if [len(g["params"]) for g in saved["state"]["param_groups"]] == [
                len(g["params"]) for g in opt.param_groups
            ]:
                # This run's schedule decides the rates (a resume may change --lr-mult):
                # load_state_dict would bring back the saved run's.
                rates: list[dict[str, Any]] = [
                    {k: g[k] for k in ("lr", "initial_lr", "max_lr", "min_lr") if k in g} for g in opt.param_groups
                ]
                opt.load_state_dict(saved["state"])
                for group, keep in zip(opt.param_groups, rates):
                    group.update(keep)
        self._phase_opt = (phase, (opt, sched, max_lrs))
        return opt, sched, max_lrs

    def steps_per_epoch(self, src: Source) -> int:
        """Optimiser steps of one image epoch: every image once, the same count on every rank."""
        return num_steps(len(src), self.cfg.batch_size)

    @contextlib.contextmanager
    def recompute_early(self, frozen: bool) -> Iterator[None]:
        """While inside (an unfrozen epoch on CPU with ``recompute_early``), each
        early block keeps only its input for the backward pass and recomputes its
        activations there: those blocks run at the highest resolution, so their
        activations are most of a CPU worker's peak memory. Gradients are the
        same (the blocks are deterministic: no dropout, BatchNorm frozen)."""
        on = self.cfg.recompute_early and not frozen and not self.cfg.freeze_early and self.device.type == "cpu"
        blocks = self.model.early_blocks() if on else []
        for block in blocks:
            # An instance attribute shadows the class's forward; deleting it restores it.
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        try:
            yield
        finally:
            for block in blocks:
                del block.forward

    def train_images(
        self,
        src: Source,
        opt: torch.optim.Optimizer,
        sched: Any,
        frozen: bool,
        net: nn.Module,
        epoch: int = 0,
        what: str = "",
    ) -> float:
        """One epoch over every image of the shard (a new seeded order each epoch)."""
        self.train_mode(frozen)
        total, count = 0.0, 0
        prog = self.progress(what, len(src)) if what else None
        with self.recompute_early(frozen):
            for x, y, _ in src.batches(self.cfg.batch_size, shuffle=True, epoch=epoch):
                if len(y):
                    x = train_batch(x.to(self.device), self.cfg.image_size, self.mean, self.std, self.preset, self.gen)
                else:
                    x = torch.zeros(0, 3, self.cfg.image_size, self.cfg.image_size, device=self.device).contiguous(
                        memory_format=torch.channels_last
                    )
                with self.autocast():
                    out = net(x).float()
                    # A rank with one row fewer can get an empty batch (batch size 1):
                    # it must still join DDP's all-reduce, with zero gradients, not NaN.
                    loss = self.loss_fn(out, y.to(self.device)) if len(y) else out.sum() * 0.0
                opt.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(opt)
                    self.scaler.update()
                else:
                    loss.backward()
                    opt.step()
                sched.step()
                if len(y):
                    total += loss.item()
                    count += 1
                if prog:
                    prog.update(len(y))
        if prog:
            prog.finish()
        return total / max(count, 1)
