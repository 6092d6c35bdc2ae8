"""``dragons evaluate``: a model's metrics on a folder's validation split, and its
report (dragons.report writes it; the one inference path is dragons.predictor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dragons import artifact
from dragons.data import discover
from dragons.errors import DragonsError, require_plotting
from dragons.metrics import classification_metrics
from dragons.predictor import predict_uris
from dragons.train.config import TrainConfig

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


@dataclass(frozen=True)
class EvaluateResult:
    """A model's figures on a folder's validation split."""

    # dragons.metrics.classification_metrics over the readable images: n, accuracy,
    # log_loss, ece, errors, confusion_matrix, per_class, macro_f1
    metrics: dict[str, Any]
    skipped: int  # unreadable images, left out of the figures (each named on stdout)
    report: str | None  # the report's page; None when no report was asked for


def evaluate(
    model_uri: str,
    data_uri: str,
    report_uri: str | None,
    tta: int = 0,
    valid_pct: float = EvaluateConfig.valid_pct,
    seed: int = EvaluateConfig.seed,
) -> EvaluateResult:
    """Score the validation split of ``data_uri`` and write the report (``report_uri``; None: none)."""
    art = artifact.load(model_uri)
    trained = art.meta.get("config") or {}
    valid_pct = float(trained.get("valid_pct", TrainConfig.valid_pct)) if valid_pct == AS_TRAINED else valid_pct
    seed = int(trained.get("seed", TrainConfig.seed)) if seed == AS_TRAINED else seed
    if (valid_pct, seed) != (trained.get("valid_pct", valid_pct), trained.get("seed", seed)):
        print(
            f"note: --valid-pct {valid_pct} --seed {seed} differ from the model's training ({trained.get('valid_pct')}, "
            f"{trained.get('seed')}): a folder without valid/ is split differently, and the split may hold images "
            "the model trained on",
            flush=True,
        )
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
    page = None
    if report_uri:
        require_plotting("the report")
        from dragons.report import report_from_predictions

        page = report_from_predictions(
            report_uri,
            art.meta,
            [u for u, k in zip(uris, ok) if k],
            labels[ok],
            probs[ok],
            history=art.meta.get("history"),
            lr_find=art.meta.get("lr_find"),
            extra={"tta": tta},
        )
    return EvaluateResult(metrics, int((~ok).sum()), page)
