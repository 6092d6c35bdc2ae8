"""Training, driver side, in Ray Train's shape: prepare, fit, save.

    plan = prepare(cfg)                # dragons.train.plan: validation, checks; pure (no Ray, no writes)
    fitted = fit(plan)                 # Ray up, decode check, recipe, run folder readied; GPUs asked for,
                                       # workers sized, TorchTrainer.fit
    meta = save(plan, fitted, wall_s)  # calibration, model.json + weights (and a registry version), the report

:func:`train` runs the three (fit and save inside the run's log, dragons.runlog) and
returns a :class:`TrainResult`; :func:`find_lr` (``dragons lr-find``) prepares and fits
the learning-rate sweep alone and returns an :class:`LrFindResult`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ray

from dragons import artifact, raycompat, storage
from dragons.calibration import Calibration, apply_temperature, calibrate
from dragons.capacity import GpuRequest, Grant, decode_beside_model, span_from_count
from dragons.errors import DragonsError
from dragons.loop import versions
from dragons.models.registry import build_model
from dragons.raycluster import DATA_CPU_SHARE, Resources, cluster, embedded, ensure_ray, model_device, size_workers
from dragons.runlog import run_log, say
from dragons.train.checkpoint import final_state
from dragons.train.config import TrainConfig
from dragons.train.loop import WorkerContext, train_loop_per_worker
from dragons.train.plan import Plan, Resolved, prepare, ready, resolve, scan
from dragons.train.stream import decode_actors_per_worker

log = logging.getLogger("dragons")


@dataclass(frozen=True)
class Sizing:
    """The worker group, sized from what the cluster has (or its autoscaler brought)."""

    workers: int
    cpu_per_worker: float
    use_gpu: bool
    device: Literal["cuda", "cpu"]  # where the model runs (raycluster.model_device: a GPU without CUDA, its CPU)
    decode_actors: int  # Ray Data decode actors per worker; 0 = the workers decode their own rows

    def facts(self) -> dict[str, Any]:
        decode = "model" if not self.decode_actors else f"separate ({self.decode_actors} Ray Data actor(s) per worker)"
        return {
            "workers": self.workers,
            "cpu_per_worker": self.cpu_per_worker,
            "use_gpu": self.use_gpu,
            "decode": decode,
        }


@dataclass(frozen=True)
class Fitted:
    """What the workers left: the last checkpoint's state, and its validation predictions."""

    resolved: Resolved  # the plan with its recipe decided: what the workers were handed
    state: dict[str, Any]  # weights ("model"), history, lr, lr_find, tta, resumes
    idx: np.ndarray | None  # row ids (positions in plan.folder.valid)
    probs: np.ndarray | None  # (passes, rows, classes): the plain pass, then TTA
    sizing: Sizing
    train_s: float


def size(resolved: Resolved, grant: Grant) -> Sizing:
    """One worker per granted GPU (or CPU workers), never more than training images."""
    cfg, n_train = resolved.cfg, resolved.n_train
    workers, cpu, use_gpu = size_workers(cfg.workers, Resources(cluster().cpus, grant.gpus))
    if workers > n_train:  # every worker needs a training image: each fits on its own shard
        say(f"{n_train} training image(s): {n_train} worker(s) instead of {workers}")
        workers = n_train
    in_workers = decode_beside_model(cfg.decode, use_gpu)  # else Ray Data decode actors per worker
    actors = 0 if in_workers else decode_actors_per_worker(cluster().cpus, workers, DATA_CPU_SHARE)
    say(
        f"training {cfg.arch} on {n_train} images ({resolved.n_valid} valid) with {workers} worker(s), "
        f"{'1 GPU' if use_gpu else f'{cpu:g} CPU'} each, decoding {'in the workers' if in_workers else 'in Ray Data actors'}"
    )
    return Sizing(workers, cpu, use_gpu, model_device(use_gpu, grant.cuda), actors)


def fit(plan: Plan) -> Fitted:
    """Run the plan, step by step: start Ray (or join its cluster), decode every image
    once, decide the recipe from what the decode saw, ready the run's folder, then run
    the workers on the GPUs the cluster has or its autoscaler brings (the request is
    withdrawn when training ends), else on CPUs. Returns the last checkpoint."""
    say(plan.folder.summary())
    ensure_ray(plan.cfg.no_progress_timeout_s)
    resolved = resolve(plan, scan(plan))
    ready(plan, resolved)
    cfg = resolved.cfg
    with GpuRequest(
        "training worker",
        cfg.use_gpu,
        span_from_count(cfg.workers),
        cfg.gpu_wait_s,
        max(cfg.progress_s, 10.0),
        local=embedded(),
    ) as grant:
        sizing = size(resolved, grant)
        trainer = _trainer(plan, resolved, sizing)
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as exc:  # TrainingFailedError wraps the worker's exception
            raise DragonsError(f"training failed: {storage.redact(str(exc))[:2000]}") from None
    state, idx, probs = final_state(result)
    return Fitted(resolved, state, idx, probs, sizing, round(time.perf_counter() - t0, 2))


def _trainer(plan: Plan, resolved: Resolved, sizing: Sizing) -> Any:
    """Ray's TorchTrainer for the plan; the workers run dragons.train.loop."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, path = storage.filesystem(plan.run.storage)
    context = WorkerContext(
        cfg=resolved.cfg,
        classes=resolved.folder.classes,
        class_weights=plan.class_weights,
        run_dir=plan.run.uri,
        data=resolved.data,
        decode_actors=sizing.decode_actors,
        # Row tables go through the object store once, not pickled per worker.
        rows={"train": ray.put(resolved.rows("train")), "valid": ray.put(resolved.rows("valid"))},
        lr_find_only=plan.lr_find,
    )
    # MALLOC_ARENA_MAX: Ray Data's prefetch threads and torch allocate from
    # different threads, and glibc's per-thread arenas can keep freed batches
    # mapped. (Most of a worker's ~1.4 GB is torch itself and the backward
    # pass's activations, ~0.5 GB at 128 px and batch 16: docs/training.md.)
    env_vars = {"OMP_NUM_THREADS": str(max(1, int(round(sizing.cpu_per_worker)))), "MALLOC_ARENA_MAX": "2"}
    # Callbacks a run does not use (dragons.raycompat.lean_trainer says why).
    unused = {"PlacementGroupCleanerCallback"} if embedded() else set()
    if not sizing.decode_actors:
        unused.add("DatasetsCallback")
    cls = raycompat.lean_trainer(TorchTrainer, unused)
    return cls(
        train_loop_per_worker,
        train_loop_config={"context": context},
        # A GPU resource without CUDA: the model runs on the node's CPU, where NCCL would not start.
        torch_config=TorchConfig(backend="nccl" if sizing.device == "cuda" else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=sizing.workers,
            use_gpu=sizing.use_gpu,
            resources_per_worker={"CPU": sizing.cpu_per_worker, **({"GPU": 1} if sizing.use_gpu else {})},
        ),
        # Ray 2.58's RunConfig annotations lack worker_runtime_env, which it accepts.
        run_config=RunConfig(  # type: ignore[call-arg]
            name=plan.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=resolved.cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env_vars},
        ),
        # No Ray Train datasets: each worker streams its own rows through Ray Data
        # (dragons.train.stream explains why not Ray's streaming split).
    )


def save(plan: Plan, fitted: Fitted, wall_s: float) -> dict[str, Any]:
    """Calibrate on the validation predictions, write the artifact (and its report); returns model.json."""
    resolved = fitted.resolved
    cfg, folder, state = resolved.cfg, plan.folder, fitted.state
    model = build_model(cfg.arch, len(folder.classes), weights="none")
    model.load_state_dict(state["model"])
    history = state["history"]
    last = history[-1] if history else {}
    metrics: dict[str, Any] = {"valid_accuracy": last.get("accuracy"), "valid_loss": last.get("valid_loss")}
    if state.get("tta"):
        metrics.update(
            {
                "valid_accuracy_tta": state["tta"]["accuracy"],
                "valid_loss_tta": state["tta"]["valid_loss"],
                "tta": cfg.tta,
            }
        )
    temperature, raw, idx, probs = 1.0, None, fitted.idx, fitted.probs
    cal: Calibration | None = None
    if idx is not None and probs is not None and len(idx):
        # One temperature for the validation predictions (the plain pass), chosen by
        # cross-validation so it holds beyond them, else T = 1 (dragons.calibration
        # says when): every later probability (evaluate, predict, score) is divided by it.
        y = np.array([folder.valid[int(i)].label for i in idx])
        cal = calibrate(probs[0], y)
        temperature = cal.temperature
        say(cal.sentence())
        metrics["valid_ece_uncalibrated"] = cal.ece_before  # the raw ECE (15 bins), as calibrate measured it
        # Held out: the out-of-fold ECE when T is applied; the raw one (nothing fitted) when it fell back.
        metrics["valid_ece"] = cal.valid_ece
        raw = probs[-1]
    facts = resolved.facts
    meta = {
        "arch": cfg.arch,
        "classes": folder.classes,
        "data_config": resolved.data.to_dict(),  # how an image becomes this model's input
        "temperature": temperature,  # calibration (dragons.calibration): probabilities are softmax(log p / T)
        # How T was chosen (method, reason, out-of-fold ECE / NLL before and after); None: no validation predictions.
        "calibration": cal.to_meta() if cal is not None else None,
        "metrics": metrics,
        "history": history,
        "lr_find": state.get("lr_find"),
        "lr": state.get("lr"),
        "resumes": int(state.get("resumes", 0)),
        "novelty": state.get("novelty"),  # dragons.novelty: what the model does not know (None: not fitted)
        "config": cfg.to_dict(),
        "data": {
            "root": folder.root,
            "split": folder.split,
            "n_train": resolved.n_train,
            "n_valid": resolved.n_valid,
            # The training set's class mix, for drift reports of scoring runs (dragons report).
            "train_class_counts": facts["train_class_counts"],
            "skipped_non_images": len(folder.skipped),
            "bad_images": facts["bad_images"],
            # --labels: where they came from, how many folder labels they overrode and images they added.
            "labels": facts.get("labels"),
        },
        "timing": {"wall_s": round(wall_s, 2), "decode_s": facts["decode_s"], "train_s": fitted.train_s},
        "recipe": facts["recipe"],  # what auto chose, and the n_train / median side it chose from
        "resources": fitted.sizing.facts(),
    }
    # --out is a registry too: the version's own immutable copy, and alias latest (dragons.loop.versions).
    saved = artifact.save(cfg.out, model, meta, register=True)
    say(
        f"valid accuracy {metrics['valid_accuracy']:.4f}, loss {metrics['valid_loss']:.4f}"
        + (f"; with TTA x{cfg.tta}: {metrics['valid_accuracy_tta']:.4f}" if state.get("tta") else "")
        + (
            ""
            if cal is None
            else f"; out-of-fold ECE {metrics['valid_ece_uncalibrated']:.4f} -> {metrics['valid_ece']:.4f} at temperature "
            f"{temperature:.3g} ({cal.method})"
            if cal.reason == "applied"
            else f"; ECE {metrics['valid_ece']:.4f} at temperature 1 ({cal.method}: {cal.reason})"
        )
        + f"; wall {wall_s:.1f}s"
    )
    kept = versions.version_dir(cfg.out, saved["version"])
    say(f"model artifact {cfg.out} (version {saved['version']}; kept as {kept}, {cfg.out}@{versions.LATEST})")
    if cfg.report and idx is not None and probs is not None:
        _report(fitted, saved, temperature, raw)
    return saved


def _report(fitted: Fitted, saved: dict[str, Any], temperature: float, raw: np.ndarray | None) -> None:
    if importlib.util.find_spec("matplotlib") is None:  # the `report` extra is optional
        say("report skipped: matplotlib is not installed (pip install 'dragons[report]')")
        return
    from dragons.report import report_from_predictions

    assert fitted.idx is not None and fitted.probs is not None
    cfg = fitted.resolved.cfg
    samples = [fitted.resolved.folder.valid[int(i)] for i in fitted.idx]  # idx: position in folder.valid
    uri = storage.join(cfg.out, "report")
    report_from_predictions(
        uri,
        saved,
        [s.uri for s in samples],
        np.array([s.label for s in samples]),
        apply_temperature(fitted.probs[-1], temperature),
        raw_probs=raw,
        history=fitted.state["history"],
        lr_find=fitted.state.get("lr_find"),
        # probs[-1] is the TTA pass when there is one: say so in the report.
        extra={"tta": cfg.tta if fitted.state.get("tta") else 0},
    )
    say(f"report {storage.join(uri, 'index.html')}")


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` made: a model artifact, one more version of its registry."""

    uri: str  # the artifact (--out), a registry: its alias latest is this version
    version: str  # the model's version (the weights' content hash), kept at versions.version_dir(uri, version)
    meta: dict[str, Any]  # its model.json
    log: str  # the run's log on this machine (copied to <uri>/train.log)


@dataclass(frozen=True)
class LrFindResult:
    """What :func:`find_lr` measured: the sweep's losses by rate, and the rate it suggests."""

    lrs: list[float]
    losses: list[float]  # smoothed, as fastai's lr_find plots them
    suggestion: float
    facts: dict[str, Any]  # measured on the way: decode time, bad images, class counts, the recipe's inputs
    log: str  # the run's log on this machine


@contextlib.contextmanager
def _logged(plan: Plan) -> Iterator[str]:
    """While inside, the run says everything into its log too: ``cfg.log_file`` or
    ``logs/train-<run name>.log``. Opened after prepare, so a wrong flag leaves no log."""
    with run_log(plan.cfg.log_file or os.path.join("logs", f"train-{plan.run.name}.log")) as path:
        say(f"run log {path}")
        yield path


def train(cfg: TrainConfig) -> TrainResult:
    """Train and write the artifact at ``cfg.out`` (a new version of its registry).

    The run's log (the workers' progress and epoch table included) is
    ``cfg.log_file`` or ``logs/train-<run name>.log``, copied to ``<out>/train.log``.
    """
    t0 = time.perf_counter()
    plan = prepare(cfg)
    with _logged(plan) as path:
        meta = save(plan, fit(plan), time.perf_counter() - t0)
    try:  # the log beside the artifact: for S3 outputs the only copy that travels with the model
        with open(path, "rb") as f:
            text = f.read()
        storage.write_bytes(storage.join(cfg.out, "train.log"), text)
        versions.add_file(cfg.out, meta["version"], "train.log", text)  # once: a version's folder is never rewritten
    except Exception as exc:  # the model is saved; a log that cannot be copied must not fail the run
        log.warning("could not copy the run log to %s: %s", cfg.out, storage.shorten(str(exc), 200))
    return TrainResult(cfg.out, meta["version"], meta, path)


def find_lr(cfg: TrainConfig) -> LrFindResult:
    """``dragons lr-find``: the learning-rate sweep alone, on the workers, over the
    frozen body's features (as the head phase computes them). It runs in its own
    run folder (``lr-find-<name>``: never a training run's checkpoints) and writes
    no artifact, so ``cfg.out`` may be empty. The run's log as :func:`train`'s."""
    plan = prepare(cfg, lr_find=True)
    with _logged(plan) as path:
        fitted = fit(plan)
    sweep = fitted.state["lr_find"]
    return LrFindResult(
        [float(x) for x in sweep["lrs"]],
        [float(x) for x in sweep["losses"]],
        float(sweep["suggestion"]),
        fitted.resolved.facts,
        path,
    )
