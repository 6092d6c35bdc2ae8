"""The per-worker training function that Ray Train runs on every worker.

fastai's ``fine_tune`` recipe, data-parallel (dragons.train.trainer):

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from dragons import runlog
from dragons.dataconfig import DataConfig
from dragons.raycluster import model_device
from dragons.train import checkpoint
from dragons.train.checkpoint import RunState
from dragons.train.config import TrainConfig
from dragons.train.stream import StreamShard
from dragons.train.trainer import Trainer
from dragons.train.worker import Worker


@dataclass(frozen=True)
class WorkerContext:
    """Everything a training worker is handed (``train_loop_config={"context": ...}``)."""

    cfg: TrainConfig  # resolved: no "auto" left
    classes: list[str]
    class_weights: list[float] | None  # None = unweighted loss
    run_dir: str  # the run's storage folder: checkpoints to resume from
    data: DataConfig  # how an image becomes the model's input (decoded to data.base_size squares)
    rows: dict[str, Any]  # "train" / "valid": row tables (uri, label, row id), as object refs
    decode_actors: int  # Ray Data decode actors per worker (0 = the worker decodes its own rows)
    lr_find_only: bool = False  # dragons lr-find (dragons.train.run.find_lr): the sweep, saved, and nothing else


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["context"]`` is the run's :class:`WorkerContext`."""
    ctx: WorkerContext = config["context"]
    if ctx.cfg.unresolved():  # dragons.train.plan resolves every "auto" from the data before the workers start
        raise ValueError(f"TrainConfig fields still 'auto' in a training worker: {ctx.cfg.unresolved()}")
    _quiet_logs()
    worker = Worker(ctx.cfg, ctx.classes, ctx.class_weights, _device())
    train, valid = _shards(ctx, worker.rank, worker.world)
    trainer = Trainer(worker, checkpoint.restore(ctx.run_dir, worker.model) or RunState(lr=ctx.cfg.lr), train, valid)
    if trainer.run.resumes:
        trainer.say(f"resumed from checkpoint after epoch {trainer.run.epochs_done} (restart #{trainer.run.resumes})")
    trainer.precompute(lr_find_only=ctx.lr_find_only)
    if ctx.lr_find_only:
        trainer.save_lr_find()
        return
    if not trainer.phases:
        trainer.say("nothing to train: every epoch count is 0")
    elif not trainer.epochs_left():
        trainer.say(
            f"nothing left to train: the run had done {trainer.run.epochs_done} of its "
            f"{len(trainer.phases)} epochs; its last checkpoint is the result"
        )
    for epoch in trainer.epochs_left():
        trainer.train_one_epoch(epoch)


def _device() -> torch.device:
    import ray.train.torch

    device = ray.train.torch.get_device()
    # A GPU resource on a node without CUDA (a fake node, a broken driver): the
    # driver has said so once; the model runs on this node's CPU.
    if model_device(device.type == "cuda") == "cpu":
        return torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    return device


class _DropReports(logging.Filter):
    """Ray Train logs "Reporting training result N: TrainingReport(...)" from every
    worker for every epoch, at INFO, on a logger named after its *file* (so the
    ``ray.train`` level misses it): a filter on the handlers drops it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Reporting training result")


def _quiet_logs() -> None:
    """Our epoch table and progress lines are the display: Ray's INFO lines would repeat or drown them."""
    runlog.worker_mode()  # say() to stdout: Ray forwards it to the driver's run log
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-execution banners
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropReports())


def _shards(ctx: WorkerContext, rank: int, world_size: int) -> tuple[StreamShard, StreamShard]:
    """This rank's train and valid rows, decoded by Ray Data as the worker goes."""
    cfg = ctx.cfg
    rows: dict[str, dict[str, np.ndarray]] = {
        k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in ctx.rows.items()
    }
    cap = -(-cfg.max_images // world_size) if cfg.max_images else 0  # --max-images in all: a share per rank

    def shard(split: str) -> StreamShard:
        return StreamShard(
            rows[split], rank, world_size, ctx.data.base_size, cfg.max_pixels, cfg.seed, ctx.decode_actors, cap
        )

    return shard("train"), shard("valid")
