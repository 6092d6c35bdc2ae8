"""Temperature scaling: one scalar that makes a model's probabilities mean what they say.

Guo et al. 2017, "On Calibration of Modern Neural Networks": divide the logits
by a temperature T fitted on held-out data by minimising the negative
log-likelihood. A scalar T > 0 never changes the argmax, so accuracy is
untouched; only the confidence moves (T > 1 softens an over-confident model).

Probabilities are all we keep (checkpoints hold softmax outputs), and
``log p`` equals the logits up to a per-row constant, which softmax ignores:
``softmax(log p / T) == softmax(logits / T)``. So T is fitted, and applied,
on probabilities, with numpy only.
"""

from __future__ import annotations

import math

import numpy as np

# T is searched as beta = 1 / T on [BETA_MIN, BETA_MAX] (T from 0.05 to 50): the
# NLL is convex in beta (a log-sum-exp of lines minus a line), so a golden-section
# search finds its minimum without a gradient or an optimiser library.
BETA_MIN, BETA_MAX = 0.02, 20.0
# Probabilities are floored here before the log: a float32 softmax can be exactly 0.
PROB_FLOOR = 1e-12


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), PROB_FLOOR, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / T)`` row by row; T = 1 returns the input unchanged."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or p.size == 0:
        return p
    z = _log_probs(p) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def nll(probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes at temperature T."""
    z = _log_probs(probs) / temperature
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    y = np.asarray(labels, dtype=np.int64)
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, iters: int = 100) -> float:
    """The T that minimises the NLL of ``labels`` under ``softmax(log(probs) / T)``.

    Fewer than two samples, or a single class present, leave nothing to fit: T = 1.
    """
    y = np.asarray(labels, dtype=np.int64)
    if len(y) < 2 or len(np.unique(y)) < 2:
        return 1.0
    lo, hi = BETA_MIN, BETA_MAX
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(probs, y, 1 / a), nll(probs, y, 1 / b)
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(probs, y, 1 / a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(probs, y, 1 / b)
    beta = (lo + hi) / 2
    # Never worse than leaving the model alone (a flat NLL near beta = 1 rounds either way).
    return round(1 / beta, 4) if nll(probs, y, 1 / beta) < nll(probs, y, 1.0) else 1.0
