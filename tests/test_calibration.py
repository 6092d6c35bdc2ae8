"""Temperature scaling (dragons.calibration) and its one place of use, the Predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dragons.calibration import (
    MIN_SAMPLES,
    T_MAX,
    T_MIN,
    apply_temperature,
    calibrate,
    describe,
    fit_temperature,
    nll,
    stratified_folds,
)
from dragons.metrics import expected_calibration_error


def _overconfident(n: int = 4000, k: int = 5, true_t: float = 2.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z / true_t); the model reports softmax(z): too sure by true_t."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3.0, size=(n, k))
    p_true = np.exp(z / true_t) / np.exp(z / true_t).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p_true])
    return np.exp(z) / np.exp(z).sum(1, keepdims=True), y


def test_fit_recovers_the_temperature_and_cuts_ece_without_moving_the_argmax():
    probs, y = _overconfident()
    t = fit_temperature(probs, y)
    assert abs(t - 2.5) < 0.25, t
    cal = apply_temperature(probs, t)
    assert (cal.argmax(1) == probs.argmax(1)).all()
    assert np.allclose(cal.sum(1), 1.0)
    assert nll(probs, y, t) < nll(probs, y, 1.0)
    assert expected_calibration_error(cal, y) < 0.03 < expected_calibration_error(probs, y)


# The issue-29 reproduction: every row right, so the in-sample NLL falls as T shrinks.
SEPARABLE_P = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.35, 0.65]])
SEPARABLE_Y = np.array([0, 1, 0, 1])


def test_the_separable_four_rows_fall_back_to_t_one():
    cal = calibrate(SEPARABLE_P, SEPARABLE_Y)
    assert (cal.temperature, cal.method, cal.reason, cal.n) == (1.0, "fallback", "too_small", 4)
    assert "too_small" in cal.sentence() and "4 validation images" in cal.sentence()
    # Before: an in-sample fit ran to the search's floor (0.05) and a 0.6 / 0.4 image read 0.9997.
    # The bounded fit stops at T_MIN, and calibrate() does not use it at all.
    assert fit_temperature(SEPARABLE_P, SEPARABLE_Y) == T_MIN


def test_the_separable_rows_at_a_size_past_the_threshold_fall_back_as_separable():
    # 25 copies: 100 images, 50 a class, still every one right: every fold's fit runs to the bound.
    cal = calibrate(np.tile(SEPARABLE_P, (25, 1)), np.tile(SEPARABLE_Y, 25))
    assert (cal.temperature, cal.method, cal.reason) == (1.0, "fallback", "separable")
    assert cal.fold_temperatures == [T_MIN] * 5
    assert cal.valid_ece == cal.ece_before  # T = 1: the raw ECE is the one that holds
    assert "separable" in cal.sentence() and "T = 0.5" in cal.sentence()


def _binary_overconfident(n: int, true_t: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n two-class rows, labels drawn from softmax(z / true_t), reported as softmax(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3.0, size=(n, 2))
    p_true = np.exp(z / true_t) / np.exp(z / true_t).sum(1, keepdims=True)
    y = (rng.random(n) > p_true[:, 0]).astype(np.int64)
    return np.exp(z) / np.exp(z).sum(1, keepdims=True), y


@pytest.mark.parametrize(("k", "true_t"), [(2, 2.0), (5, 2.0), (5, 0.7)])
def test_cross_validation_recovers_a_known_temperature_and_cuts_out_of_fold_ece(k: int, true_t: float):
    # 400 rows, over-confident (true_t 2) or under-confident (0.7, as label smoothing leaves a model).
    probs, y = _binary_overconfident(400, true_t, seed=3) if k == 2 else _overconfident(400, k, true_t, seed=3)
    cal = calibrate(probs, y)
    assert (cal.method, cal.reason, cal.n) == ("cv5", "applied", 400)
    assert abs(cal.temperature - true_t) < 0.15 * true_t, cal
    assert all(T_MIN < t < T_MAX for t in cal.fold_temperatures), cal
    assert cal.oof_ece_after is not None and cal.ece_before is not None
    assert cal.oof_nll_after is not None and cal.nll_before is not None
    assert cal.oof_ece_after < cal.ece_before and cal.oof_nll_after < cal.nll_before, cal
    assert cal.valid_ece == cal.oof_ece_after
    meta = cal.to_meta()
    assert {"temperature", "method", "reason", "oof_ece_before", "oof_ece_after", "n"} <= set(meta)
    assert meta["oof_ece_before"] == cal.ece_before and meta["bounds"] == [T_MIN, T_MAX]
    assert "5-fold cross-validation" in describe(meta)


def test_a_calibrated_model_gains_nothing_and_keeps_t_one():
    probs, y = _binary_overconfident(400, 1.0, seed=0)  # already honest
    cal = calibrate(probs, y)
    assert (cal.temperature, cal.method, cal.reason) == (1.0, "fallback", "no_gain")
    assert cal.oof_nll_after is not None and cal.oof_ece_after is not None
    assert cal.ece_before is not None and cal.nll_before is not None
    assert cal.oof_nll_after >= cal.nll_before or cal.oof_ece_after > cal.ece_before


@pytest.mark.parametrize("case", ["few_images", "rare_class", "one_class", "empty"])
def test_too_small_sets_fall_back(case: str):
    probs, y = _overconfident(400, 3, 2.5, seed=1)
    if case == "few_images":
        probs, y = probs[: MIN_SAMPLES - 1], y[: MIN_SAMPLES - 1]
    elif case == "rare_class":  # plenty of images, but class 2 has 4: a held-out fold would lack it
        keep = np.flatnonzero(y != 2).tolist() + np.flatnonzero(y == 2)[:4].tolist()
        probs, y = probs[keep], y[keep]
    elif case == "one_class":
        probs, y = probs[y == 0], y[y == 0]
    else:
        probs, y = probs[:0], y[:0]
    cal = calibrate(probs, y)
    assert (cal.temperature, cal.method, cal.reason) == (1.0, "fallback", "too_small"), cal
    assert cal.oof_ece_after is None and cal.fold_temperatures == []


def test_calibration_is_deterministic_and_folds_are_stratified():
    probs, y = _overconfident(400, 5, 2.0, seed=4)
    assert calibrate(probs, y) == calibrate(probs.copy(), y.copy())
    fold = stratified_folds(y)
    assert np.array_equal(fold, stratified_folds(y))
    assert sorted(np.bincount(fold).tolist()) == [80] * 5  # sizes differ by at most one overall
    for c in np.unique(y):  # each class spread evenly: per-fold counts differ by at most one
        per = np.bincount(fold[y == c], minlength=5)
        assert per.max() - per.min() <= 1
    assert not np.array_equal(fold, stratified_folds(y, seed=1))  # the seed is what shuffles


def test_describe_reads_old_artifacts():
    assert "none recorded" in describe(None, None)
    assert "in-sample" in describe(None, 1.22) and "1.22" in describe(None, 1.22)


def test_nothing_to_fit_leaves_t_at_one():
    assert fit_temperature(np.array([[0.9, 0.1]]), np.array([0])) == 1.0  # one sample
    assert fit_temperature(np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0, 0])) == 1.0  # one class
    p = np.array([[0.7, 0.3]])
    assert np.allclose(apply_temperature(p, 1.0), p)


@pytest.mark.parametrize("tta", [0, 2])
def test_the_predictor_applies_the_artifact_temperature(tta: int):
    from dragons.artifact import Artifact
    from dragons.models.registry import build_model
    from dragons.predictor import Predictor

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 3, weights="none").eval()
    meta = {
        "classes": ["a", "b", "c"],
        "data_config": {"image_size": 64, "base_size": 73, "crop_pct": 64 / 73, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    images = np.random.default_rng(1).integers(0, 255, size=(4, 73, 73, 3), dtype=np.uint8)
    old = Artifact(model=model, meta=dict(meta), uri="old")  # an artifact from before calibration: T = 1
    assert old.temperature == 1.0
    raw = Predictor.from_artifact(old, tta=tta).numpy(images)
    # A new artifact: T at the top (what every dragons reads) and how it was chosen beside it.
    chosen = {
        "temperature": 0.5,
        "method": "cv5",
        "reason": "applied",
        "n": 400,
        "oof_ece_before": 0.1,
        "oof_ece_after": 0.02,
    }
    new = Artifact(model=model, meta={**meta, "temperature": 0.5, "calibration": chosen}, uri="new")
    assert new.temperature == 0.5
    hot = Predictor.from_artifact(new, tta=tta)
    got = hot.numpy(images)
    assert np.allclose(got, apply_temperature(raw, 0.5), atol=1e-5)
    assert (got.argmax(1) == raw.argmax(1)).all()


def test_the_report_says_which_case_applied_beside_the_reliability_diagrams():
    pytest.importorskip("matplotlib")
    from dragons.report import _render_html

    metrics = {
        "n": 1,
        "accuracy": 1.0,
        "errors": 0,
        "log_loss": 0.1,
        "ece": 0.1,
        "macro_f1": 1.0,
        "per_class": {},
        "confusion_matrix": [],
    }
    note = calibrate(SEPARABLE_P, SEPARABLE_Y).sentence()
    images = [("confusion_matrix.png", "cm"), ("reliability_uncalibrated.png", "before"), ("reliability.png", "after")]
    page = _render_html("t", metrics, [], images, [], note)
    assert page.count("fallback, too_small") == 1
    assert page.index("fallback, too_small") < page.index("reliability_uncalibrated.png")
    assert page.index("confusion_matrix.png") < page.index("fallback, too_small")
