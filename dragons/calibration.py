"""Temperature scaling: one scalar that makes a model's probabilities mean what they say.

Guo et al. 2017, "On Calibration of Modern Neural Networks": divide the logits
by a temperature T fitted on held-out data by minimising the negative
log-likelihood. A scalar T > 0 never changes the argmax, so accuracy is
untouched; only the confidence moves (T > 1 softens an over-confident model).

Probabilities are all we keep (checkpoints hold softmax outputs), and
``log p`` equals the logits up to a per-row constant, which softmax ignores:
``softmax(log p / T) == softmax(logits / T)``. So T is fitted, and applied,
on probabilities, with numpy only.

Fitted and scored on the same validation images, T over-fits: when the model
gets every image right the NLL keeps falling as T shrinks, and T runs to
whatever floor the search has (a 0.6 / 0.4 image then reads 0.9997). So
:func:`calibrate`, what training calls, decides by cross-validation:

* **too_small**: fewer than ``MIN_SAMPLES`` (50) validation images, fewer than
  two classes, or a class present with fewer than ``MIN_PER_CLASS`` (5, one per
  fold) images: T = 1, nothing is fitted.
* Otherwise ``FOLDS`` (5) stratified folds, seeded: T is fitted on four, the
  fifth is scored at it, so every image gets an out-of-fold probability.
* **separable**: every fold's fit runs to the lower bound ``T_MIN`` (its
  training part is all, or nearly all, right: the NLL has no interior minimum):
  T = 1.
* **no_gain**: the out-of-fold NLL does not fall, or the out-of-fold ECE rises:
  T = 1.
* **applied** (method ``cv5``): T is fitted once more on all the images and used.

T is always within [``T_MIN``, ``T_MAX``] = [0.5, 5]. 0.5 squares a class's
odds ratio (0.6 / 0.4 becomes 0.69 / 0.31, 0.9 becomes 0.988): sharper than any
honest correction of a trained network (label smoothing's under-confidence
gave 0.8 on flowers5). 5 turns 0.99 / 0.01 into 0.72 / 0.28: a model that needs
more than that carries almost no confidence worth scaling. Guo et al. report
1.1 to 3 for modern networks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dragons.metrics import expected_calibration_error

T_MIN, T_MAX = 0.5, 5.0
# T is searched as beta = 1 / T: the NLL is convex in beta (a log-sum-exp of
# lines minus a line), so a golden-section search finds its minimum without a
# gradient or an optimiser library.
BETA_MIN, BETA_MAX = 1 / T_MAX, 1 / T_MIN
FOLDS = 5
MIN_SAMPLES = 50
MIN_PER_CLASS = FOLDS  # stratified: every held-out fold holds each class present
SEED = 0
# Probabilities are floored here before the log: a float32 softmax can be exactly 0.
PROB_FLOOR = 1e-12
# A fold's fit "runs to the bound" when its beta ends this close to BETA_MAX
# (golden section converges to an edge geometrically: 100 steps leave ~1e-20).
_AT_BOUND = 1e-6

METHOD_CV = f"cv{FOLDS}"
METHOD_FALLBACK = "fallback"


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


def _fit_beta(probs: np.ndarray, y: np.ndarray, iters: int = 100) -> float:
    """The beta = 1 / T in [BETA_MIN, BETA_MAX] that minimises the NLL (golden section, unrounded)."""
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
    return (lo + hi) / 2


def fit_temperature(probs: np.ndarray, labels: np.ndarray, iters: int = 100) -> float:
    """The T in [T_MIN, T_MAX] that minimises the NLL of ``labels`` under ``softmax(log(probs) / T)``.

    In-sample: :func:`calibrate` is what decides whether to use it. Fewer than
    two samples, or a single class present, leave nothing to fit: T = 1.
    """
    y = np.asarray(labels, dtype=np.int64)
    if len(y) < 2 or len(np.unique(y)) < 2:
        return 1.0
    beta = _fit_beta(probs, y, iters)
    # Never worse than leaving the model alone (a flat NLL near beta = 1 rounds either way).
    return round(1 / beta, 4) if nll(probs, y, 1 / beta) < nll(probs, y, 1.0) else 1.0


def stratified_folds(labels: np.ndarray, folds: int = FOLDS, seed: int = SEED) -> np.ndarray:
    """Each row's fold (0..folds-1): every class spread evenly over the folds, shuffled by ``seed``.

    Deterministic for the same labels in the same order. The next class starts
    where the last one stopped, so fold sizes differ by at most one overall.
    """
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    start = 0
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        fold[rows] = (start + np.arange(len(rows))) % folds
        start += len(rows)
    return fold


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` decided and the figures it decided on; ``to_meta`` is model.json's ``calibration``."""

    temperature: float
    method: str  # "cv5" (METHOD_CV; "cv<folds>"): T fitted and applied; METHOD_FALLBACK: T = 1
    reason: str  # "applied" | "too_small" | "separable" | "no_gain"
    n: int
    ece_before: float | None  # the raw ECE: out-of-fold too, since nothing was fitted to get it
    nll_before: float | None
    oof_ece_after: float | None = None  # None: the cross-validation did not run (too_small)
    oof_nll_after: float | None = None
    fold_temperatures: list[float] = field(default_factory=list)
    folds: int = FOLDS
    seed: int = SEED
    smallest_class: int = 0  # images of the rarest class present (the too_small rule's second half)

    @property
    def valid_ece(self) -> float | None:
        """The ECE at the T in use, held out: the out-of-fold figure when applied, else the raw one."""
        return self.oof_ece_after if self.reason == "applied" else self.ece_before

    def to_meta(self) -> dict[str, Any]:
        d = asdict(self)
        # The names the brief and the docs use: "before" is out-of-fold as well (no fit involved).
        d["oof_ece_before"], d["oof_nll_before"] = d.pop("ece_before"), d.pop("nll_before")
        d["bounds"] = [T_MIN, T_MAX]
        d["min_samples"], d["min_per_class"] = MIN_SAMPLES, max(MIN_PER_CLASS, self.folds)
        return d

    def sentence(self) -> str:
        return describe(self.to_meta())


def _r(x: float) -> float:
    return round(float(x), 5)


def calibrate(probs: np.ndarray, labels: np.ndarray, folds: int = FOLDS, seed: int = SEED) -> Calibration:
    """Choose the temperature by ``folds``-fold cross-validation (the module docstring has the rule)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    if n == 0:
        return Calibration(1.0, METHOD_FALLBACK, "too_small", 0, None, None, folds=folds, seed=seed)
    ece0, nll0 = _r(expected_calibration_error(p, y)), _r(nll(p, y))
    counts = np.bincount(y)
    present = counts[counts > 0]
    # One class present counts as a smallest class of 0: nothing to tell apart.
    smallest = int(present.min()) if len(present) >= 2 else 0
    if n < MIN_SAMPLES or smallest < max(MIN_PER_CLASS, folds):
        return Calibration(
            1.0, METHOD_FALLBACK, "too_small", n, ece0, nll0, folds=folds, seed=seed, smallest_class=smallest
        )
    fold = stratified_folds(y, folds, seed)
    oof = np.empty_like(p)
    betas = []
    for k in range(folds):
        held = fold == k
        beta = _fit_beta(p[~held], y[~held])
        betas.append(beta)
        oof[held] = apply_temperature(p[held], 1 / beta)
    ece1, nll1 = _r(expected_calibration_error(oof, y)), _r(nll(oof, y))
    fold_ts = [round(1 / b, 4) for b in betas]

    def decided(reason: str, t: float = 1.0) -> Calibration:
        method = f"cv{folds}" if reason == "applied" else METHOD_FALLBACK
        return Calibration(t, method, reason, n, ece0, nll0, ece1, nll1, fold_ts, folds, seed, smallest)

    # Separable first: its out-of-fold NLL often *does* fall (sharpening held-out
    # images that are all right too), yet the T it would give is the bound, not a fit.
    if all(b >= BETA_MAX * (1 - _AT_BOUND) for b in betas):
        return decided("separable")
    # NLL is the proper score T minimises; ECE is the figure everyone reads: T must
    # help the first on held-out images and not hurt the second.
    if not (nll1 < nll0 and ece1 <= ece0):
        return decided("no_gain")
    t = fit_temperature(p, y)
    return decided("applied", t) if t != 1.0 else decided("no_gain")


def describe(cal: dict[str, Any] | None, temperature: float | None = None) -> str:
    """One sentence on how a model.json's temperature was chosen (training's log line, the report).

    ``cal`` is model.json's ``calibration`` block; an older artifact has none,
    only ``temperature`` (fitted in-sample, before cross-validation).
    """
    if not cal:
        t = 1.0 if temperature is None else float(temperature)
        if t == 1.0:
            return "Calibration: none recorded (T = 1, raw softmax probabilities)."
        return (
            f"Calibration: T = {t:.3g}, fitted in-sample on the validation predictions by an older "
            "dragons (no cross-validation: its ECE after calibration is not a held-out figure)."
        )
    t, n, reason = float(cal["temperature"]), int(cal.get("n", 0)), str(cal.get("reason", ""))
    k = int(cal.get("folds", FOLDS))
    lo, hi = cal.get("bounds", [T_MIN, T_MAX])

    def f(key: str) -> str:
        v = cal.get(key)
        return "n/a" if v is None else f"{float(v):.4f}"

    oof = (
        f"out-of-fold ECE {f('oof_ece_before')} -> {f('oof_ece_after')}, "
        f"NLL {f('oof_nll_before')} -> {f('oof_nll_after')}"
    )
    folds_t = ", ".join(f"{x:.3g}" for x in cal.get("fold_temperatures") or [])
    if reason == "applied":
        return (
            f"Calibration: T = {t:.3g}, chosen by {k}-fold cross-validation on the {n} validation images "
            f"({oof}; fold temperatures {folds_t}; bounds [{lo:g}, {hi:g}])."
        )
    if reason == "too_small":
        return (
            f"Calibration: T = 1 (fallback, too_small): {n} validation images, smallest class "
            f"{cal.get('smallest_class', 'n/a')}; a temperature that generalises needs at least "
            f"{cal.get('min_samples', MIN_SAMPLES)} images, two classes or more, and "
            f"{cal.get('min_per_class', MIN_PER_CLASS)} of every class present (ECE {f('oof_ece_before')})."
        )
    if reason == "separable":
        return (
            f"Calibration: T = 1 (fallback, separable): every fold's fit on the {n} validation images ran to the "
            f"lower bound T = {lo:g} (fold temperatures {folds_t}): with (nearly) every image right the NLL keeps "
            f"falling as T shrinks, so the data support no temperature (at the bound, {oof}: better only "
            "because the held-out images are right too)."
        )

    def worse(before: str, after: str, strict: bool) -> bool:
        b, a = cal.get(before), cal.get(after)
        if b is None or a is None:  # no figures (an odd model.json): cannot tell, so not named
            return False
        return float(a) > float(b) if strict else float(a) >= float(b)

    # Which half of the rule failed (both can).
    failed = [
        what
        for what, bad in (
            ("the held-out NLL did not fall", worse("oof_nll_before", "oof_nll_after", False)),
            ("the held-out ECE rose", worse("oof_ece_before", "oof_ece_after", True)),
        )
        if bad
    ]
    return (
        f"Calibration: T = 1 (fallback, no_gain): in {k}-fold cross-validation on the {n} validation images "
        f"{' and '.join(failed) or 'the in-sample fit came back at T = 1'} ({oof}; fold temperatures {folds_t})."
    )
