"""The per-worker training function that Ray Train runs on every worker.

fastai's ``fine_tune`` recipe, data-parallel:

1. (``precompute``) compute the frozen body's features once, each worker for its
   shard, and fit the head on them for many cheap epochs (the learning-rate
   finder runs here too: on cached features it costs seconds, not minutes);
   without precompute, ``freeze_epochs`` epochs train the head on augmented images;
2. unfreeze and fine-tune the whole network with a one-cycle schedule and
   discriminative learning rates over layer groups.

Every epoch ends with a checkpoint through ``ray.train.report``; a restarted
worker group (``max_failures``) or a ``--resume`` continues from the last one.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dragons.models.registry import Classifier, build_model
from dragons.predictor import Predictor
from dragons.preprocess import eval_batch, get_preset, train_batch
from dragons.train.config import TrainConfig
from dragons.train.progress import Progress
from dragons.train.stream import Shard, StreamShard, all_reduce, num_steps, world
from dragons.train.schedule import discriminative_lrs, exp_lrs, is_finite, one_cycle, smooth, suggest_valley

STATE_FILE = "state.pt"
PREDS_FILE = "valid_preds.npz"
# Images per forward pass when nothing is learnt (features, validation).
EVAL_BATCH = 32


def _world() -> tuple[int, int]:
    return world()


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    return all_reduce(values, op)


def _gather(arr: np.ndarray) -> np.ndarray:
    if _world()[1] == 1:
        return arr
    parts: list[Any] = [None] * _world()[1]
    dist.all_gather_object(parts, arr)
    return np.concatenate(parts)


Source = Union[Shard, StreamShard]


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
    if rows * dim * 2 <= SPILL_BYTES or spill_dir is None:
        return torch.zeros(rows, dim, dtype=torch.float16)
    os.makedirs(spill_dir, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".f16", dir=spill_dir)
    os.close(fd)
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(rows, dim))
    os.unlink(path)  # the mapping keeps the file alive; nothing is left behind
    return torch.from_numpy(mm)


class Worker:
    """State and steps of one Ray Train worker; the functions below drive it."""

    def __init__(self, cfg: TrainConfig, classes: list[str], class_weights: list[float] | None, device: torch.device) -> None:
        self.cfg = cfg
        self.classes = classes
        self.device = device
        self.rank, self.world = _world()
        torch.manual_seed(cfg.seed)  # identical head init on every rank
        self.model: Classifier = build_model(cfg.arch, len(classes), cfg.weights).to(device)
        self.model = self.model.to(memory_format=torch.channels_last)
        from dragons.models.registry import get_spec

        spec = get_spec(cfg.arch)
        self.mean, self.std = spec.mean, spec.std
        self.preset = get_preset(cfg.augment)
        w = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=w, label_smoothing=cfg.label_smoothing)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    def _amp_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda" or self.cfg.amp == "off":
            return None  # CPU autocast is slower than fp32 without AMX
        if self.cfg.amp == "fp16" or (self.cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def progress(self, what: str, total_local: int, unit: str = "images") -> Progress:
        """Rank 0 prints for everyone: its count x world is the step's (equal shards)."""
        total = int(_all_reduce([float(total_local)])[0])
        return Progress(what, total, enabled=self.rank == 0, every_s=self.cfg.progress_s, scale=self.world, unit=unit)

    # ----- evaluation ------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, src: Source, tta: int = 0, what: str = "") -> Preds:
        """Class probabilities of every row of ``src`` (eval mode, centre crop)."""
        predictor = Predictor(self.model, self.cfg.image_size, self.mean, self.std, self.device, tta=tta, amp_dtype=self.amp_dtype)
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
        out = [self.model.head(feats[i : i + 4096].float().to(self.device)).float().softmax(1).cpu().numpy()
               for i in range(0, len(feats), 4096)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def validate(self, y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
        """(valid_loss, accuracy) over all ranks."""
        y = np.asarray(y)
        p = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0) if len(y) else np.zeros(0)
        correct = float((probs.argmax(1) == y).sum()) if len(y) else 0.0
        loss_sum, correct, n = _all_reduce([float(-np.log(p).sum()), correct, float(len(y))])
        return loss_sum / max(n, 1), correct / max(n, 1)

    # ----- precompute ------------------------------------------------------------
    @torch.inference_mode()
    def features(self, src: Source, views: int = 0, what: str = "", spill_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
                view = (eval_batch(x, self.cfg.image_size, self.mean, self.std) if k == 0
                        else train_batch(x, self.cfg.image_size, self.mean, self.std, self.preset, self.gen))
                with self.autocast():
                    feats[k * n + done : k * n + done + b] = self.model.body(view).float().cpu().half()
                labels[k * n + done : k * n + done + b] = y
            done += b
            if prog:
                prog.update(b)
        if prog:
            prog.finish()
        return feats, labels

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _head_steps(self, n: int) -> int:
        n_min = int(_all_reduce([float(n)], op="min")[0])
        return max(1, n_min // self.cfg.batch_size)

    def fit_head(self, feats: torch.Tensor, labels: torch.Tensor, lr: float, epochs: int,
                 valid: tuple[torch.Tensor, np.ndarray] | None = None) -> tuple[float, list[dict[str, float]]]:
        """Fit the head on cached features with one cycle.

        Returns the last pass's mean train loss and, with ``valid`` (cached valid
        features and their labels), each pass's train loss, valid loss and
        accuracy: the head's training curve costs one matrix product per pass.
        """
        head = self._wrap(self.model.head)
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
                curve.append({"train_loss": _mean_all(float(np.mean(losses[-steps:])), self.world), "valid_loss": vloss, "accuracy": vacc})
                self.model.head.train()
        return (float(np.mean(losses[-steps:])) if losses else float("nan")), curve

    def lr_find(self, feats: torch.Tensor, labels: torch.Tensor, start: float = 1e-6, end: float = 1.0, steps: int = 100) -> dict[str, Any]:
        """Exponential sweep on a throw-away copy of the head; the real head is untouched."""
        saved = {k: v.clone() for k, v in self.model.head.state_dict().items()}
        head = self._wrap(self.model.head)
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
            value = _all_reduce([loss.item()])[0] / self.world
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

    def unfrozen_optimizer(self, lr: float, total_steps: int, start_step: int = 0) -> tuple[torch.optim.Optimizer, Any, list[float]]:
        """fastai ``fine_tune`` after the freeze: half the base rate, spread over
        the layer groups (early body lr/2/lr_mult ... head lr/2), one cycle with a
        short warm-up from max/5. Returns (optimizer, scheduler, max rates)."""
        max_lrs = discriminative_lrs(lr / 2, self.cfg.lr_mult, 3)
        params = [{"params": [p for p in g if p.requires_grad], "lr": r} for g, r in zip(self.model.layer_groups(), max_lrs)]
        params = [g for g in params if g["params"]]  # a frozen early group has nothing to step
        max_lrs = [g["lr"] for g in params]
        opt = torch.optim.AdamW(params, weight_decay=self.cfg.weight_decay)
        sched = one_cycle(opt, max_lrs, total_steps, pct_start=0.3, div=5.0, start_step=start_step)
        return opt, sched, max_lrs

    def steps_per_epoch(self, src: Source) -> int:
        """Optimiser steps of one image epoch: every image once, the same count on every rank."""
        return num_steps(len(src), self.cfg.batch_size)

    def train_images(self, src: Source, opt: torch.optim.Optimizer, sched: Any, frozen: bool, net: nn.Module,
                     epoch: int = 0, what: str = "") -> float:
        """One epoch over every image of the shard (a new seeded order each epoch)."""
        self.train_mode(frozen)
        total, count = 0.0, 0
        prog = self.progress(what, len(src)) if what else None
        for x, y, _ in src.batches(self.cfg.batch_size, shuffle=True, epoch=epoch):
            if len(y):
                x = train_batch(x.to(self.device), self.cfg.image_size, self.mean, self.std, self.preset, self.gen)
            else:
                x = torch.zeros(0, 3, self.cfg.image_size, self.cfg.image_size, device=self.device).contiguous(memory_format=torch.channels_last)
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


def _quiet_train_reports() -> None:
    """Ray Train logs "Reporting training result N: TrainingReport(...)" from every
    worker for every epoch, at INFO, on a logger named after its *file*, so the
    "ray.train" level above misses it. Our epoch table says the same once."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without Train V2's module layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def latest_checkpoint(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """(uri, state) of the newest ``checkpoint_<timestamp>`` of a run whose state loads.

    Checkpoint folder names sort by time. One cut short by a failure (its state
    file missing or truncated) is passed over for the one before it.
    """
    import io

    import torch

    from dragons import storage

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


def _save_checkpoint(worker: Worker, state: dict[str, Any], metrics: dict[str, Any], preds: tuple[np.ndarray, np.ndarray] | None) -> None:
    """All ranks call report (it is a barrier); only rank 0 attaches files."""
    import ray.train

    if worker.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({**state, "model": {k: v.cpu() for k, v in worker.model.state_dict().items()}}, os.path.join(tmp, STATE_FILE))
        if preds is not None:
            np.savez(os.path.join(tmp, PREDS_FILE), idx=preds[0], probs=preds[1])
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _row(history: list[dict[str, Any]], rank: int) -> None:
    if rank != 0:
        return
    h = history[-1]
    if len(history) == 1 or history[-2].get("_header"):
        print(f"{'epoch':>5}  {'phase':<9}{'train_loss':>11}{'valid_loss':>11}{'accuracy':>10}{'time':>8}", flush=True)
    mins, secs = divmod(int(round(h["time"])), 60)
    print(f"{h['epoch']:>5}  {h['phase']:<9}{h['train_loss']:>11.4f}{h['valid_loss']:>11.4f}{h['accuracy']:>10.4f}{mins:>5}:{secs:02d}", flush=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` carries the TrainConfig and data facts."""
    import ray.train
    import ray.train.torch

    import logging

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # our table is the progress display
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-execution banners would drown the progress lines
    _quiet_train_reports()
    cfg = TrainConfig.from_dict(config["cfg"])
    classes: list[str] = config["classes"]
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    worker = Worker(cfg, classes, config.get("class_weights"), device)
    rank, world_size = worker.rank, worker.world
    pid_dir = os.environ.get("DRAGONS_WORKER_PID_DIR")
    if pid_dir:  # lets the fault-tolerance test find and kill a worker process
        os.makedirs(pid_dir, exist_ok=True)
        with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))

    import ray

    rows = config["rows"]
    rows = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in rows.items()}
    decode_actors = int(config.get("decode_actors", 1))
    cap = -(-cfg.max_images // world_size) if cfg.max_images else 0
    train = StreamShard(rows["train"], rank, world_size, config["base_size"], cfg.max_pixels, cfg.seed, decode_actors, cap)
    valid = StreamShard(rows["valid"], rank, world_size, config["base_size"], cfg.max_pixels, cfg.seed, decode_actors, cap)
    spill_dir = os.path.join(tempfile.gettempdir(), "dragons-features")

    history: list[dict[str, Any]] = []
    lr_info: dict[str, Any] | None = None
    done = 0
    resumes = 0
    lr = cfg.lr
    # Where to resume from, after a worker failure (--max-failures) or with
    # --resume: the run's own newest complete checkpoint on storage. The driver
    # deletes the run folder before a fresh run, so whatever is there belongs to
    # this run. Not ray.train.get_checkpoint() alone: Ray's controller registers
    # a checkpoint only when it next polls the workers, so a worker killed just
    # after writing one restarts from an older checkpoint, or from nothing.
    found = latest_checkpoint(config["run_dir"]) if config.get("run_dir") else None
    state = found[1] if found else None
    if state is None and (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    if state is not None:
        worker.model.load_state_dict(state["model"])
        done, history = int(state["epochs_done"]), list(state["history"])
        lr_info, lr = state.get("lr_find"), float(state["lr"])
        resumes = int(state.get("resumes", 0)) + 1
        if rank == 0:
            print(f"resumed from checkpoint after epoch {done} (restart #{resumes})", flush=True)

    plan: list[str] = (["head"] if cfg.precompute else ["frozen"] * cfg.freeze_epochs) + ["unfrozen"] * cfg.epochs
    need_features = (cfg.precompute and done == 0) or cfg.lr_find_only or (lr == 0 and done == 0)
    valid_feats = valid_y = None
    if need_features:
        # Augmented views give the head the variety fine-tuning would see, at the
        # price of a forward pass each (no backward): cheap augmentation.
        views = cfg.head_views if cfg.precompute and not cfg.lr_find_only else 0
        shown = f" (+{views} augmented views each)" if views else ""
        feats, head_labels = worker.features(train, views, what=f"precompute train{shown}", spill_dir=spill_dir)
        if cfg.precompute and not cfg.lr_find_only:
            valid_feats, valid_y = worker.features(valid, 0, what="precompute valid", spill_dir=spill_dir)
            valid_y = valid_y.numpy()
        if lr == 0 or cfg.lr_find_only:
            lr_info = worker.lr_find(feats, head_labels)
            lr = float(lr_info["suggestion"])
            if rank == 0:
                print(f"lr_find suggests lr={lr:.2e}", flush=True)
            if cfg.lr_find_only:
                _save_checkpoint(worker, {"epochs_done": 0, "history": [], "lr": lr, "lr_find": lr_info}, {"lr": lr}, None)
                return

    for epoch in range(done, len(plan)):
        phase = plan[epoch]
        t0 = time.perf_counter()
        curve: list[dict[str, float]] = []
        is_last = epoch == len(plan) - 1
        if phase == "head":
            # feats exists: need_features is true whenever the head phase is not yet done.
            train_loss, curve = worker.fit_head(feats, head_labels, lr * cfg.head_lr_scale, max(1, cfg.head_epochs),
                                                valid=(valid_feats, valid_y) if valid_feats is not None else None)
            epoch_lr = lr * cfg.head_lr_scale
            if not is_last:
                del feats, head_labels  # the features are not needed again: free them before fine-tuning
        else:
            frozen = phase == "frozen"
            worker.set_frozen(frozen)
            net = worker._wrap(worker.model)
            phase_epochs = plan.count(phase)
            phase_start = plan.index(phase)
            steps = worker.steps_per_epoch(train)
            if frozen:
                params = [{"params": list(worker.model.head.parameters()), "lr": lr}]
                opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
                sched = one_cycle(opt, [lr], steps * phase_epochs, pct_start=0.99, div=25.0, start_step=(epoch - phase_start) * steps)
                max_lrs = [lr]
            else:
                opt, sched, max_lrs = worker.unfrozen_optimizer(lr, steps * phase_epochs, (epoch - phase_start) * steps)
            train_loss = worker.train_images(train, opt, sched, frozen, net, epoch=epoch, what=f"epoch {epoch} {phase}")
            epoch_lr = max_lrs[-1]
        if phase == "head" and valid_feats is not None and not (is_last and cfg.tta):
            # The body is frozen: the valid features are cached.
            preds = Preds(valid_rows(valid), valid_y, worker.predict_features(valid_feats))  # type: ignore[arg-type]
        else:
            preds = worker.predict(valid, what=f"epoch {epoch} validate")
        valid_loss, acc = worker.validate(preds.y, preds.probs)
        history.append({"epoch": epoch, "phase": phase, "train_loss": _mean_all(train_loss, world_size), "valid_loss": valid_loss,
                        "accuracy": acc, "time": time.perf_counter() - t0, "lr": epoch_lr})
        if curve:
            history[-1]["head_curve"] = curve  # one point per pass over the cached features, for the report
        metrics: dict[str, Any] = {"epoch": epoch, "valid_loss": valid_loss, "accuracy": acc, "train_loss": history[-1]["train_loss"]}
        # Only (row id, probabilities) travel to rank 0, for the report.
        valid_probs: Any = (_gather(preds.idx), _gather(preds.probs))
        if is_last and cfg.tta:
            tpreds = worker.predict(valid, tta=cfg.tta, what=f"TTA x{cfg.tta}")
            tloss, tacc = worker.validate(tpreds.y, tpreds.probs)
            metrics.update({"valid_loss_tta": tloss, "accuracy_tta": tacc})
            order = _gather(tpreds.idx)
            tprobs = _gather(tpreds.probs)
            # The same rows in the same order as the plain pass (streams are reproducible, but say so).
            pos = {int(i): k for k, i in enumerate(order)}
            valid_probs = (valid_probs[0], valid_probs[1], tprobs[[pos[int(i)] for i in valid_probs[0]]])
        _row(history, rank)
        if is_last and cfg.tta and rank == 0:
            print(f"TTA x{cfg.tta}: valid_loss {metrics['valid_loss_tta']:.4f} accuracy {metrics['accuracy_tta']:.4f}", flush=True)
        state = {"epochs_done": epoch + 1, "history": history, "lr": lr, "lr_find": lr_info, "resumes": resumes}
        if is_last and cfg.tta:
            state["tta"] = {"accuracy": metrics["accuracy_tta"], "valid_loss": metrics["valid_loss_tta"]}
        _save_checkpoint(worker, state, metrics, _pack_preds(valid_probs))
    if not plan and rank == 0:
        print("nothing to train: every epoch count is 0", flush=True)


def valid_rows(src: Source) -> np.ndarray:
    """Row ids of an unshuffled pass over ``src``, without decoding an image."""
    if isinstance(src, Shard):
        return src.idx.numpy().astype(np.int64)
    positions = src.positions(0, False)
    return np.asarray(src.rows["idx"])[positions].astype(np.int64)


def _pack_preds(vp: Any) -> tuple[np.ndarray, np.ndarray] | None:
    if vp is None:
        return None
    if len(vp) == 3:  # with TTA: store plain and TTA probabilities side by side
        return vp[0], np.stack([vp[1], vp[2]])
    return vp[0], vp[1][None]


def _mean_all(value: float, world: int) -> float:
    return _all_reduce([value])[0] / world
