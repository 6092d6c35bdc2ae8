"""Driver side of training: data set, Ray Data decode, TorchTrainer, artifact, report."""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from dragons import artifact, storage
from dragons.data import DecodeBatch, ImageFolder, discover
from dragons.errors import DragonsError
from dragons.models.registry import build_model, get_spec
from dragons.preprocess import base_size_for
from dragons.raycluster import cluster, ensure_ray, size_workers
from dragons.table import check_classes
from dragons.train.config import TrainConfig
from dragons.train.loop import PREDS_FILE, STATE_FILE, latest_checkpoint, train_loop_per_worker

log = logging.getLogger("dragons")


def _run_name(cfg: TrainConfig) -> str:
    if cfg.name:
        return cfg.name
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", storage.parse(cfg.out or cfg.data).uri.strip("/")).strip("-")
    return ("lr-find-" if cfg.lr_find_only else "") + slug[-80:]


def _storage_uri(cfg: TrainConfig) -> str:
    return cfg.storage or storage.join(cfg.out or os.path.expanduser("~/dragons_results"), "_runs")


def decode_folder(folder: ImageFolder, base_size: int, max_pixels: int) -> tuple[Any, Any, list[tuple[str, str]]]:
    """Decode every image once in Ray Data tasks; returns (train_ds, valid_ds, bad).

    Bad images are reported by name and dropped: they never stop training.
    """
    import ray.data

    rows = [{"uri": s.uri, "label": s.label, "idx": i, "split": "train"} for i, s in enumerate(folder.train)]
    rows += [{"uri": s.uri, "label": s.label, "idx": i, "split": "valid"} for i, s in enumerate(folder.valid)]
    res = cluster()
    # Enough blocks to keep every CPU decoding, few enough to keep task overhead low.
    blocks = max(2, min(len(rows) // 8, int(res.cpus) * 4))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    # A callable instance runs as plain tasks; few of them (each overlaps its reads
    # on threads), since every extra worker process costs seconds of imports.
    ds = ds.map_batches(DecodeBatch(base_size, max_pixels), batch_size=16, num_cpus=0.25,
                        compute=ray.data.TaskPoolStrategy(size=max(2, int(res.cpus)))).materialize()
    # Select first: finding the bad rows must not drag 196 KB images through a filter.
    bad_rows = ds.select_columns(["uri", "error"]).filter(expr="error != ''").take_all()
    bad = [(str(r["uri"]), str(r["error"])) for r in bad_rows]
    train_ds = ds.filter(expr="split == 'train' and error == ''").drop_columns(["split", "error", "uri"]).materialize()
    valid_ds = ds.filter(expr="split == 'valid' and error == ''").drop_columns(["split", "error", "uri"]).materialize()
    return train_ds, valid_ds, bad


def _latest_checkpoint_state(result: Any) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
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


def run_trainer(cfg: TrainConfig, folder: ImageFolder) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    """Decode, size the workers, run TorchTrainer; returns the last checkpoint's state."""
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    facts: dict[str, Any] = {}
    t0 = time.perf_counter()
    train_ds, valid_ds, bad = decode_folder(folder, base_size_for(cfg.image_size, cfg.crop_pct), cfg.max_pixels)
    facts["decode_s"] = round(time.perf_counter() - t0, 2)
    facts["bad_images"] = [{"uri": u, "error": e} for u, e in bad]
    for uri, err in bad:
        print(f"skipped unreadable image {uri}: {err}", flush=True)
    n_train, n_valid = train_ds.count(), valid_ds.count()
    facts.update({"n_train": n_train, "n_valid": n_valid})
    if n_train == 0 or n_valid == 0:
        raise DragonsError(f"{folder.root}: no decodable images left in the {'train' if n_train == 0 else 'valid'} split")

    workers, cpu_per_worker, use_gpu = size_workers(cfg.workers, cluster())
    facts.update({"workers": workers, "cpu_per_worker": cpu_per_worker, "use_gpu": use_gpu})
    print(f"training {cfg.arch} on {n_train} images ({n_valid} valid) with {workers} worker(s), "
          f"{'1 GPU' if use_gpu else f'{cpu_per_worker:g} CPU'} each", flush=True)

    counts = Counter(s.label for s in folder.train)
    class_weights = None
    if cfg.class_weights:
        total = sum(counts.values())
        class_weights = [total / (len(folder.classes) * max(1, counts.get(i, 0))) for i in range(len(folder.classes))]

    fs, path = storage.filesystem(_storage_uri(cfg))
    name = _run_name(cfg)
    run_dir = storage.join(_storage_uri(cfg), name)
    if not cfg.resume and storage.exists(run_dir):
        # A fresh run must not pick up an old run's checkpoints (Ray resumes by name).
        storage.delete(run_dir)
    elif cfg.resume and not storage.exists(run_dir):
        raise DragonsError(f"--resume: no earlier run at {run_dir}; run without --resume first (same --out/--name)")
    if cfg.resume:
        found = latest_checkpoint(run_dir)
        print(f"resuming from {found[0]}" if found else f"--resume: {run_dir} has no checkpoint yet; starting over", flush=True)

    env_vars = {"OMP_NUM_THREADS": str(max(1, int(round(cpu_per_worker))))}
    if os.environ.get("DRAGONS_WORKER_PID_DIR"):  # the fault-tolerance test kills a worker by pid
        env_vars["DRAGONS_WORKER_PID_DIR"] = os.environ["DRAGONS_WORKER_PID_DIR"]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "classes": folder.classes, "class_weights": class_weights,
                           "run_dir": run_dir},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpu_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env_vars},
        ),
        datasets={"train": train_ds, "valid": valid_ds},
        # Neither is split by Ray: every worker reads both whole and keeps rows
        # rank::world by row id. Ray's streaming split hands blocks to whichever
        # worker asks first (the same seed gave 5 or 6 val errors from run to run)
        # and its equal split can drop rows. Each worker holds its shard in memory
        # anyway, so reading the decoded set twice on 2 workers is cheap.
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    t1 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError wraps the worker's exception
        raise DragonsError(f"training failed: {storage.redact(str(exc))[:2000]}") from None
    facts["train_s"] = round(time.perf_counter() - t1, 2)
    state, idx, probs = _latest_checkpoint_state(result)
    return state, idx, probs, facts


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train and write the artifact at ``cfg.out``; returns its model.json contents."""
    cfg.validate()
    t_start = time.perf_counter()
    spec = get_spec(cfg.arch)
    if cfg.weights == "imagenet" and not spec.offline:
        build_model(cfg.arch, 2, cfg.weights)  # fail early (before Ray work) if the download is impossible
    folder = discover(cfg.data, cfg.valid_pct, cfg.seed, cfg.ignore_valid)  # bad input fails before Ray starts
    check_classes(folder.classes)  # p_<class> table columns must not collide; refuse before any training
    for flag, uri in (("--out", cfg.out), ("--storage", cfg.storage)):
        if uri and not cfg.lr_find_only:
            storage.check_writable(uri, flag)  # a missing or read-only output fails before any image is read
    print(folder.summary(), flush=True)
    ensure_ray(cfg.no_progress_timeout_s)
    state, idx, probs, facts = run_trainer(cfg, folder)

    if cfg.lr_find_only:
        return {"lr_find": state.get("lr_find"), "facts": facts}

    model = build_model(cfg.arch, len(folder.classes), weights="none")
    model.load_state_dict(state["model"])
    history = state["history"]
    last = history[-1] if history else {}
    metrics: dict[str, Any] = {"valid_accuracy": last.get("accuracy"), "valid_loss": last.get("valid_loss")}
    if state.get("tta"):
        metrics.update({"valid_accuracy_tta": state["tta"]["accuracy"], "valid_loss_tta": state["tta"]["valid_loss"], "tta": cfg.tta})
    wall = time.perf_counter() - t_start
    meta = {
        "arch": cfg.arch,
        "classes": folder.classes,
        "image_size": cfg.image_size,
        "base_size": base_size_for(cfg.image_size, cfg.crop_pct),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "metrics": metrics,
        "history": history,
        "lr_find": state.get("lr_find"),
        "lr": state.get("lr"),
        "resumes": int(state.get("resumes", 0)),
        "config": cfg.to_dict(),
        "data": {"root": folder.root, "split": folder.split, "n_train": facts["n_train"], "n_valid": facts["n_valid"],
                 "skipped_non_images": len(folder.skipped), "bad_images": facts["bad_images"]},
        "timing": {"wall_s": round(wall, 2), "decode_s": facts["decode_s"], "train_s": facts["train_s"]},
        "resources": {k: facts[k] for k in ("workers", "cpu_per_worker", "use_gpu")},
    }
    saved = artifact.save(cfg.out, model, meta)
    print(f"valid accuracy {metrics['valid_accuracy']:.4f}, loss {metrics['valid_loss']:.4f}"
          + (f"; with TTA x{cfg.tta}: {metrics['valid_accuracy_tta']:.4f}" if state.get("tta") else "")
          + f"; wall {wall:.1f}s", flush=True)
    print(f"model artifact {cfg.out} (version {saved['version']})", flush=True)
    if cfg.report and idx is not None and probs is not None:
        from dragons.evaluate import report_from_predictions

        samples = [folder.valid[int(i)] for i in idx]  # idx: position in folder.valid
        report_uri = storage.join(cfg.out, "report")
        report_from_predictions(report_uri, saved, [s.uri for s in samples], np.array([s.label for s in samples]),
                                probs[-1], history=history, lr_find=state.get("lr_find"),
                                # probs[-1] is the TTA pass when there is one: say so in the report.
                                extra={"tta": cfg.tta if state.get("tta") else 0})
        print(f"report {storage.join(report_uri, 'index.html')}", flush=True)
    return saved
