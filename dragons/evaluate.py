"""``dragons evaluate``: validation metrics and the interpretation report.

The report is written locally with matplotlib, then copied to the destination
(local or S3), so every plot is a PNG linked from one ``index.html``.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from dragons import artifact, storage
from dragons.data import discover
from dragons.errors import DragonsError
from dragons.images import ImageError
from dragons.predictor import Predictor
from dragons.train.config import TrainConfig
from dragons.preprocess import decode_to_base


def _loader(uris: list[str], side: int) -> Any:
    def load(i: int) -> np.ndarray:
        try:
            return decode_to_base(storage.read_bytes(uris[i]), side)
        except (ImageError, DragonsError):
            return np.zeros((side, side, 3), dtype=np.uint8)

    return load


PREDICTIONS_FILE = "predictions.csv"


def require_plotting(what: str) -> None:
    """matplotlib is the optional ``report`` extra (cluster nodes do without it)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise DragonsError(f"{what} needs matplotlib, which is not installed: pip install 'dragons[report]'")


def _write_predictions(path: str, uris: list[str], labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    """Every image's probabilities beside the report, for a person's own analysis."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from dragons.columns import prob_column

    cols: dict[str, Any] = {"uri": uris, "label": [classes[int(y)] for y in labels],
                            "predicted": [classes[int(k)] for k in probs.argmax(1)] if len(probs) else []}
    for j, c in enumerate(classes):
        cols[prob_column(c)] = probs[:, j].astype(np.float64)
    pcsv.write_csv(pa.table(cols), path)


def report_from_predictions(
    report_uri: str, meta: dict[str, Any], uris: list[str], labels: np.ndarray, probs: np.ndarray,
    history: list[dict[str, Any]] | None = None, lr_find: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
) -> str:
    """Write the HTML report for given predictions; returns the index.html URI."""
    require_plotting("the report")
    from dragons.report import write_report

    names = [u.rsplit("/", 1)[-1] for u in uris]
    info = {"model_version": meta.get("version"), "arch": meta.get("arch"), **(extra or {})}
    with tempfile.TemporaryDirectory() as tmp:
        _write_predictions(os.path.join(tmp, PREDICTIONS_FILE), uris, labels, probs, list(meta["classes"]))
        write_report(tmp, probs=probs, labels=labels, classes=list(meta["classes"]), names=names,
                     image_loader=_loader(uris, 192), history=history, lr_find=lr_find,
                     title=f"dragons: {meta.get('arch')} on {len(uris)} validation images", extra=info)
        storage.upload_dir(tmp, report_uri)
    return storage.join(report_uri, "index.html")


def predict_uris(art: artifact.Artifact, uris: list[str], tta: int = 0, batch_size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Class probabilities for each URI in-process (no Ray); errors are returned per row."""
    predictor = Predictor.from_artifact(art, tta=tta)
    probs = np.full((len(uris), len(art.classes)), np.nan, dtype=np.float32)
    errors = [""] * len(uris)

    def load(i: int) -> np.ndarray | None:
        try:
            return decode_to_base(storage.read_bytes(uris[i]), art.base_size)
        except (ImageError, DragonsError) as exc:
            errors[i] = str(exc)
            return None

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes without the GIL
        for start in range(0, len(uris), batch_size):
            ids = list(range(start, min(len(uris), start + batch_size)))
            imgs = list(pool.map(load, ids))
            ok = [i for i, im in zip(ids, imgs) if im is not None]
            if ok:
                probs[ok] = predictor.numpy(np.stack([im for im in imgs if im is not None]))
    return probs, errors


# valid_pct / seed: take the value the model was trained with (its model.json),
# so a folder without valid/ is split exactly as training split it.
AS_TRAINED = -1


@dataclass
class EvaluateConfig:
    model: str = ""  # model artifact (path or s3://)
    data: str = ""  # image folder whose valid/ split is evaluated (path or s3://)
    report: str = ""  # report directory (path or s3://); "" = <model>/report
    tta: int = 0  # test-time augmentation views (0 = off)
    valid_pct: float = AS_TRAINED  # held-out share when the folder has no valid/; -1 = the model's own (its model.json)
    seed: int = AS_TRAINED  # seeds that split; -1 = the model's own, so no image it trained on is evaluated


@dataclass
class PredictConfig:
    model: str = ""  # model artifact (path or s3://)
    tta: int = 0  # test-time augmentation views (0 = off)
    format: str = "text"  # text (tab-separated) or json (one object per line)


def evaluate(model_uri: str, data_uri: str, report_uri: str | None, tta: int = 0,
             valid_pct: float = EvaluateConfig.valid_pct, seed: int = EvaluateConfig.seed) -> dict[str, Any]:
    """Score the validation split of ``data_uri`` and write the report."""
    from dragons.metrics import classification_metrics

    art = artifact.load(model_uri)
    trained = art.meta.get("config") or {}
    valid_pct = float(trained.get("valid_pct", TrainConfig.valid_pct)) if valid_pct == AS_TRAINED else valid_pct
    seed = int(trained.get("seed", TrainConfig.seed)) if seed == AS_TRAINED else seed
    if (valid_pct, seed) != (trained.get("valid_pct", valid_pct), trained.get("seed", seed)):
        print(f"note: --valid-pct {valid_pct} --seed {seed} differ from the model's training ({trained.get('valid_pct')}, "
              f"{trained.get('seed')}): a folder without valid/ is split differently, and the split may hold images "
              "the model trained on", flush=True)
    folder = discover(data_uri, valid_pct, seed)
    if folder.classes != art.classes:
        raise DragonsError(f"{data_uri} has classes {folder.classes} but the model was trained on {art.classes}")
    uris = [s.uri for s in folder.valid]
    probs, errors = predict_uris(art, uris, tta=tta)
    ok = np.array([e == "" for e in errors])
    labels = np.array([s.label for s in folder.valid])
    for u, e in zip(uris, errors):
        if e:
            print(f"skipped unreadable image {u}: {e}")
    metrics = classification_metrics(probs[ok], labels[ok], art.classes)
    metrics["skipped"] = int((~ok).sum())
    if report_uri:
        page = report_from_predictions(report_uri, art.meta, [u for u, k in zip(uris, ok) if k], labels[ok], probs[ok],
                                       history=art.meta.get("history"), lr_find=art.meta.get("lr_find"), extra={"tta": tta})
        metrics["report"] = page
    return metrics
