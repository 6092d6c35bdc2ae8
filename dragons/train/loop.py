"""The per-worker training function that Ray Train runs on every worker.

fastai's ``fine_tune`` recipe, data-parallel (dragons.train.phases):

1. (``precompute``) compute the frozen body's features once, each worker for its
   shard, and fit the head on them for many cheap epochs (the learning-rate
   finder runs here too: on cached features it costs seconds, not minutes);
   without precompute, ``freeze_epochs`` epochs train the head on augmented images;
2. unfreeze and fine-tune the whole network with a one-cycle schedule and
   discriminative learning rates over layer groups.

Every epoch ends with a checkpoint through ``ray.train.report``; a restarted
worker group (``max_failures``) or a ``--resume`` continues from the last one
(dragons.train.checkpoint).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dragons.train import checkpoint, phases
from dragons.train.checkpoint import RunState
from dragons.train.config import TrainConfig
from dragons.train.stream import StreamShard
from dragons.train.worker import Worker


@dataclass(frozen=True)
class WorkerContext:
    """Everything a training worker is handed (``train_loop_config={"context": ...}``)."""

    cfg: TrainConfig  # resolved: no "auto" left
    classes: list[str]
    class_weights: list[float] | None  # None = unweighted loss
    run_dir: str  # the run's storage folder: checkpoints to resume from
    base_size: int  # side of the decoded squares (the model's DataConfig)
    rows: dict[str, Any]  # "train" / "valid": row tables (uri, label, row id), as object refs
    decode_actors: int  # Ray Data decode actors per worker (0 = the worker decodes its own rows)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["context"]`` is the run's :class:`WorkerContext`."""
    import ray.train.torch

    _quiet_logs()
    ctx: WorkerContext = config["context"]
    cfg = ctx.cfg
    if cfg.unresolved():  # run.train resolves every "auto" from the data before the workers start
        raise ValueError(f"TrainConfig fields still 'auto' in a training worker: {cfg.unresolved()}")
    device = ray.train.torch.get_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        # A GPU resource on a node without CUDA (a fake node, a broken driver):
        # the driver has said so once; the model runs on this node's CPU.
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    worker = Worker(cfg, ctx.classes, ctx.class_weights, device)
    train, valid = _shards(ctx, worker.rank, worker.world)
    run = checkpoint.restore(ctx.run_dir, worker.model) or RunState(lr=cfg.lr)
    if run.resumes and worker.rank == 0:
        print(f"resumed from checkpoint after epoch {run.epochs_done} (restart #{run.resumes})", flush=True)
    plan = phases.plan(cfg)
    feats = phases.precompute(worker, run, train, valid)
    if cfg.lr_find_only:  # dragons lr-find: the sweep is the whole result
        state = {"epochs_done": 0, "history": [], "lr": run.lr, "lr_find": run.lr_find}
        checkpoint.save(worker.rank, worker.model, state, {"lr": run.lr}, None)
        return
    if plan and run.epochs_done >= len(plan) and worker.rank == 0:
        print(f"nothing left to train: the run had done {run.epochs_done} of its {len(plan)} epochs; "
              "its last checkpoint is the result", flush=True)
    for epoch in range(run.epochs_done, len(plan)):
        t0 = time.perf_counter()
        if plan[epoch] == "head":
            fit = phases.head(worker, run, feats, epoch)
        else:
            fit = phases.images(worker, run, train, plan, epoch)
        scores = phases.validate(worker, run, valid, fit, feats, t0, tta=cfg.tta if epoch == len(plan) - 1 else 0)
        feats = None  # only the head phase (epoch 0) uses them: free them before fine-tuning
        run.epochs_done = epoch + 1
        checkpoint.save(worker.rank, worker.model, run.state(scores.tta), scores.metrics, scores.preds)
    if not plan and worker.rank == 0:
        print("nothing to train: every epoch count is 0", flush=True)


def _quiet_logs() -> None:
    """Our epoch table and progress lines are the display: Ray's INFO lines would repeat or drown them."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-execution banners
    # Ray Train logs "Reporting training result N: TrainingReport(...)" from every
    # worker for every epoch, at INFO, on a logger named after its *file*, so the
    # "ray.train" level above misses it.
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without Train V2's module layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _shards(ctx: WorkerContext, rank: int, world_size: int) -> tuple[StreamShard, StreamShard]:
    """This rank's train and valid rows, decoded by Ray Data as the worker goes."""
    import ray

    cfg = ctx.cfg
    rows: dict[str, dict[str, np.ndarray]] = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v
                                               for k, v in ctx.rows.items()}
    cap = -(-cfg.max_images // world_size) if cfg.max_images else 0  # --max-images in all: a share per rank

    def shard(split: str) -> StreamShard:
        return StreamShard(rows[split], rank, world_size, ctx.base_size, cfg.max_pixels, cfg.seed, ctx.decode_actors, cap)

    return shard("train"), shard("valid")
