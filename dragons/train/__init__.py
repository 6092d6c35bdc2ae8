"""Distributed fine-tuning on Ray Train, in Ray Train's shape.

``config`` (TrainConfig) -> ``plan.prepare`` (checks, the decode check, the
recipe: a Plan) -> ``run.fit`` (GPUs asked for, workers sized, TorchTrainer)
-> ``run.save`` (calibration, the artifact, the report). On every worker,
``loop.train_loop_per_worker`` builds a ``worker.Worker`` (the model's steps)
and a ``trainer.Trainer`` (the phases, epoch by epoch) over ``stream`` shards;
``checkpoint`` owns a run's saved state. Modules are imported by their full
names: importing the package starts nothing heavy.
"""
