"""Temperature scaling (dragons.calibration) and its one place of use, the Predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dragons.calibration import apply_temperature, fit_temperature, nll
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
    meta = {"classes": ["a", "b", "c"], "data_config": {"image_size": 64, "base_size": 73, "crop_pct": 64 / 73,
                                                         "mean": [0.5] * 3, "std": [0.5] * 3}}
    images = np.random.default_rng(1).integers(0, 255, size=(4, 73, 73, 3), dtype=np.uint8)
    old = Artifact(model=model, meta=dict(meta), uri="old")  # an artifact from before calibration: T = 1
    assert old.temperature == 1.0
    raw = Predictor.from_artifact(old, tta=tta).numpy(images)
    hot = Predictor.from_artifact(Artifact(model=model, meta={**meta, "temperature": 0.5}, uri="new"), tta=tta)
    got = hot.numpy(images)
    assert np.allclose(got, apply_temperature(raw, 0.5), atol=1e-5)
    assert (got.argmax(1) == raw.argmax(1)).all()
