"""Evaluation metrics and "interpretation" selections for a classifier.

Everything here is pure numpy and returns plain Python values so results can
be written straight to JSON or shipped between Ray workers without pickling
numpy objects.

Conventions shared by every function:

* ``probs`` is an ``(N, C)`` array of per-class probabilities (rows should sum
  to one, but nothing here renormalises: we report what the model said).
* ``labels`` is an ``(N,)`` array of integer true-class indices in ``[0, C)``.
* The predicted class is ``argmax`` over the row; numpy resolves ties to the
  lowest class index, which keeps every result deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Probabilities are clipped before taking logs so a single confidently-wrong
# prediction (p == 0) gives a large but finite loss instead of ``inf``.
LOG_CLIP = 1e-7


def _validate(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coerce inputs to float64 / int64 arrays and check their shapes agree.

    Failing loudly here beats a confusing broadcasting error (or, worse, a
    silently wrong metric) deep inside one of the computations.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"labels must have shape ({p.shape[0]},), got {y.shape}")
    if p.shape[1] == 0:
        raise ValueError("probs must have at least one class column")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        # Accept float arrays holding whole numbers (common after a JSON round
        # trip) but refuse anything that would silently truncate.
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("labels must be integer class indices")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got range [{y.min()}, {y.max()}]")
    return p, y


def _require_nonempty(p: np.ndarray) -> None:
    # Accuracy, log loss and ECE are all means over samples: undefined for N=0.
    if p.shape[0] == 0:
        raise ValueError("cannot compute metrics on an empty set of predictions")


def _true_class_probs(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Probability each sample assigned to its true class."""
    return p[np.arange(p.shape[0]), y]


def _per_sample_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy of each sample, with the probability clipped at LOG_CLIP."""
    return -np.log(np.clip(_true_class_probs(p, y), LOG_CLIP, 1.0))


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Assign confidences to equal-width bins ``(i/n, (i+1)/n]`` over [0, 1].

    Bins are right-closed so a confidence of exactly 1.0 lands in the last bin
    (the usual convention); a confidence of exactly 0 is folded into bin 0.
    Using ``searchsorted`` on the same edges the plot draws keeps the two
    consistent at the boundaries.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges, confidence, side="left") - 1
    return np.clip(idx, 0, n_bins - 1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Per-bin statistics of top-1 confidence versus accuracy.

    Returns a dict of plain lists, each of length ``n_bins``:

    * ``edges`` (length ``n_bins + 1``): bin boundaries in [0, 1].
    * ``confidence``: mean top-1 probability of the samples in the bin.
    * ``accuracy``: fraction of those samples whose top-1 class was right.
    * ``count``: number of samples in the bin.

    Empty bins report ``confidence == accuracy == 0.0`` with ``count == 0``;
    callers should mask on ``count`` rather than on the values (NaN would
    make the result awkward to serialise).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _validate(probs, labels)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = _bin_index(confidence, n_bins)

    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    # Divide only where the bin is populated to avoid 0/0 warnings.
    safe = np.maximum(count, 1)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "confidence": np.where(count > 0, conf_sum / safe, 0.0).tolist(),
        "accuracy": np.where(count > 0, acc_sum / safe, 0.0).tolist(),
        "count": count.astype(int).tolist(),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction (equal-width bins).

    ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|. A perfectly
    calibrated model scores 0; a model that is always 100 % sure but right
    only 60 % of the time scores 0.4.
    """
    p, _ = _validate(probs, labels)
    _require_nonempty(p)
    bins = reliability_bins(probs, labels, n_bins)
    count = np.asarray(bins["count"], dtype=np.float64)
    gap = np.abs(np.asarray(bins["accuracy"]) - np.asarray(bins["confidence"]))
    return float(np.sum(count * gap) / p.shape[0])


def _confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    flat = y_true * n_classes + y_pred
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _safe_ratio(num: float, den: float) -> float:
    # sklearn's "zero_division=0" convention: an undefined ratio counts as 0.
    return float(num / den) if den > 0 else 0.0


def _per_class_scores(cm: np.ndarray, classes: list[str]) -> dict[str, dict[str, float | int]]:
    """Precision / recall / F1 / support for every class from a confusion matrix."""
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    out: dict[str, dict[str, float | int]] = {}
    for c, name in enumerate(classes):
        precision = _safe_ratio(tp[c], predicted[c])
        recall = _safe_ratio(tp[c], support[c])
        f1 = _safe_ratio(2 * precision * recall, precision + recall)
        out[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(support[c]),
        }
    return out


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Headline metrics for a set of predictions, as JSON-serialisable values.

    Keys: ``n``, ``accuracy``, ``log_loss``, ``ece``, ``errors``,
    ``confusion_matrix`` (rows = true, cols = predicted), ``per_class``
    ({name: {precision, recall, f1, support}}) and ``macro_f1``.
    """
    p, y = _validate(probs, labels)
    _require_nonempty(p)
    if len(classes) != p.shape[1]:
        raise ValueError(f"got {len(classes)} class names for {p.shape[1]} probability columns")
    if len(set(classes)) != len(classes):
        # per_class is keyed by name, so duplicates would silently overwrite.
        raise ValueError(f"class names must be unique, got {classes}")

    pred = p.argmax(axis=1)
    n_classes = p.shape[1]
    cm = _confusion_matrix(y, pred, n_classes)
    per_class = _per_class_scores(cm, classes)
    n_correct = int(np.sum(pred == y))
    return {
        "n": int(p.shape[0]),
        "accuracy": n_correct / p.shape[0],
        "log_loss": float(np.mean(_per_sample_loss(p, y))),
        "ece": expected_calibration_error(p, y),
        "errors": int(p.shape[0] - n_correct),
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": per_class,
        "macro_f1": float(np.mean([s["f1"] for s in per_class.values()])),
    }


def _ranked(candidates: np.ndarray, key: np.ndarray, k: int) -> list[int]:
    """The ``k`` candidate indices with the smallest ``key``, ties by index.

    ``np.lexsort`` sorts by its *last* key first, so passing the index as the
    first key makes it the tie-breaker and the order fully deterministic.
    """
    if candidates.size == 0 or k == 0:
        return []
    order = np.lexsort((candidates, key[candidates]))
    return [int(i) for i in candidates[order[:k]]]


def _top2_margin(p: np.ndarray) -> np.ndarray:
    """Gap between the two largest probabilities of every row.

    With a single class there is no runner-up, so the margin is the top
    probability itself (i.e. "certainty" is whatever the model reported).
    """
    if p.shape[1] < 2:
        return p[:, 0].copy()
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def select_grids(probs: np.ndarray, labels: np.ndarray, k: int = 4, seed: int = 0) -> dict[str, list[int]]:
    """Pick sample indices for the fastai "dragons"-notebook style image grids.

    Keys (each list has at most ``k`` indices and may be empty):

    * ``random_correct``: correctly classified samples drawn with a seeded RNG
      (returned in ascending index order).
    * ``most_correct_{c}``: true class ``c`` predicted ``c``, highest ``p[c]``
      first.
    * ``most_incorrect_{c}``: true class ``c`` predicted otherwise, lowest
      ``p[c]`` first (the most confidently wrong).
    * ``most_uncertain``: smallest gap between the top-2 probabilities first.
    * ``top_losses``: highest ``-log p[true]`` first.

    Ties are always broken by ascending sample index.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    p, y = _validate(probs, labels)
    pred = p.argmax(axis=1) if p.shape[0] else np.zeros(0, dtype=np.int64)
    correct = pred == y

    out: dict[str, list[int]] = {}
    correct_idx = np.flatnonzero(correct)
    take = min(k, correct_idx.size)
    rng = np.random.default_rng(seed)
    out["random_correct"] = sorted(int(i) for i in rng.choice(correct_idx, size=take, replace=False))

    for c in range(p.shape[1]):
        is_c = y == c
        # Negate so that "smallest key first" means "highest probability first".
        out[f"most_correct_{c}"] = _ranked(np.flatnonzero(is_c & correct), -p[:, c], k)
        out[f"most_incorrect_{c}"] = _ranked(np.flatnonzero(is_c & ~correct), p[:, c], k)

    everything = np.arange(p.shape[0])
    out["most_uncertain"] = _ranked(everything, _top2_margin(p), k)
    out["top_losses"] = _ranked(everything, -_per_sample_loss(p, y), k)
    return out
