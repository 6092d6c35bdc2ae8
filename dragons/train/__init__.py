"""Distributed fine-tuning on Ray Train, in Ray Train's shape.

``run.train``: ``config`` (TrainConfig) -> ``plan.prepare`` (validation and
checks, no Ray and no writes: a Plan) -> ``run.fit`` (Ray, the decode check,
the recipe, the run's folder; GPUs asked for, workers sized, TorchTrainer) ->
``run.save`` (calibration, the artifact, the report); ``run.find_lr``: lr-find's
sweep, prepared and fitted alone. On every worker, ``loop.train_loop_per_worker``
builds a ``worker.Worker`` (the model's steps) and a ``trainer.Trainer`` (the
phases, epoch by epoch) over ``stream`` shards;
``checkpoint`` owns a run's saved state. Modules are imported by their full
names: importing the package starts nothing heavy.
"""
