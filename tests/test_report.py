"""Tests for dragons.metrics and dragons.report (pure numpy + matplotlib, no Ray)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragons.metrics import (
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
    select_grids,
)
from dragons.report import plot_image_grid, write_report

# ---------------------------------------------------------------------------
# hand-built fixtures with answers worked out on paper
# ---------------------------------------------------------------------------

# Binary: preds = 0,0,1,1,1,0,1 ; correct = T,T,F,T,T,F,T
BIN_PROBS = np.array(
    [
        [0.90, 0.10],  # 0 true ants, right, p(true)=.90, margin .8
        [0.60, 0.40],  # 1 true ants, right, p(true)=.60, margin .2
        [0.30, 0.70],  # 2 true ants, wrong, p(true)=.30, margin .4
        [0.20, 0.80],  # 3 true bees, right, p(true)=.80, margin .6
        [0.45, 0.55],  # 4 true bees, right, p(true)=.55, margin .1
        [0.95, 0.05],  # 5 true bees, wrong, p(true)=.05, margin .9
        [0.10, 0.90],  # 6 true bees, right, p(true)=.90, margin .8
    ]
)
BIN_LABELS = np.array([0, 0, 0, 1, 1, 1, 1])
BIN_CLASSES = ["ants", "bees"]

# 3-class: preds = 0,0,1,2,1,1,0,2,0
TRI_PROBS = np.array(
    [
        [0.70, 0.20, 0.10],  # 0 true a, right, p(true)=.70, margin .50
        [0.40, 0.35, 0.25],  # 1 true a, right, p(true)=.40, margin .05
        [0.10, 0.60, 0.30],  # 2 true a, wrong, p(true)=.10, margin .30
        [0.20, 0.30, 0.50],  # 3 true a, wrong, p(true)=.20, margin .20
        [0.05, 0.90, 0.05],  # 4 true b, right, p(true)=.90, margin .85
        [0.30, 0.45, 0.25],  # 5 true b, right, p(true)=.45, margin .15
        [0.60, 0.30, 0.10],  # 6 true b, wrong, p(true)=.30, margin .30
        [0.10, 0.10, 0.80],  # 7 true c, right, p(true)=.80, margin .70
        [0.34, 0.33, 0.33],  # 8 true c, wrong, p(true)=.33, margin .01
    ]
)
TRI_LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
TRI_CLASSES = ["a", "b", "c"]


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


def test_binary_metrics_known_values() -> None:
    m = classification_metrics(BIN_PROBS, BIN_LABELS, BIN_CLASSES)
    assert m["n"] == 7
    assert m["errors"] == 2
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    p_true = [0.9, 0.6, 0.3, 0.8, 0.55, 0.05, 0.9]
    assert m["log_loss"] == pytest.approx(float(np.mean(-np.log(p_true))))
    assert m["per_class"]["ants"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["bees"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "support": 4})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    # Must survive a strict JSON round trip unchanged (plain Python types only).
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_three_class_metrics_known_values() -> None:
    m = classification_metrics(TRI_PROBS, TRI_LABELS, TRI_CLASSES)
    assert m["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(5 / 9)
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 4)
    assert m["per_class"]["a"]["recall"] == pytest.approx(2 / 4)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["precision"] == pytest.approx(1 / 2)
    assert m["per_class"]["c"]["recall"] == pytest.approx(1 / 2)
    assert [m["per_class"][c]["support"] for c in TRI_CLASSES] == [4, 3, 2]


def test_precision_is_zero_for_never_predicted_class() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    m = classification_metrics(probs, np.array([0, 1, 1]), ["x", "y"])
    assert m["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["per_class"]["x"]["precision"] == pytest.approx(1 / 3)
    assert m["per_class"]["x"]["recall"] == pytest.approx(1.0)


def test_ece_perfectly_calibrated_is_zero() -> None:
    # Always 80 % confident and right 4 times out of 5.
    probs = np.tile([0.8, 0.2], (5, 1))
    labels = np.array([0, 0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_and_log_loss_of_overconfident_model() -> None:
    # Always 100 % sure of class 0 but only right 60 % of the time.
    probs = np.tile([1.0, 0.0], (10, 1))
    labels = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    m = classification_metrics(probs, labels, ["x", "y"])
    assert m["ece"] == pytest.approx(0.4)
    # p(true)=0 is clipped at 1e-7, so the loss is large but finite.
    assert m["log_loss"] == pytest.approx(0.4 * -math.log(1e-7))


def test_ece_weights_bins_by_count() -> None:
    # Bin around 0.9: acc 1.0 (gap .1); bin around 0.7: acc 0.5 (gap .2).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.7, 0.3], [0.7, 0.3]])
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx((2 * 0.1 + 2 * 0.2) / 4)
    bins = reliability_bins(probs, labels, n_bins=10)
    assert len(bins["edges"]) == 11
    assert sum(bins["count"]) == 4
    filled = [i for i, c in enumerate(bins["count"]) if c]
    assert [bins["count"][i] for i in filled] == [2, 2]
    assert [bins["accuracy"][i] for i in filled] == pytest.approx([0.5, 1.0])
    assert [bins["confidence"][i] for i in filled] == pytest.approx([0.7, 0.9])


def test_metrics_reject_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        classification_metrics(BIN_PROBS, BIN_LABELS[:-1], BIN_CLASSES)
    with pytest.raises(ValueError):
        classification_metrics(BIN_PROBS, BIN_LABELS, ["only-one"])
    with pytest.raises(ValueError):
        classification_metrics(BIN_PROBS, BIN_LABELS + 5, BIN_CLASSES)


# ---------------------------------------------------------------------------
# select_grids
# ---------------------------------------------------------------------------


def test_select_grids_binary() -> None:
    g = select_grids(BIN_PROBS, BIN_LABELS, k=4)
    assert g["most_correct_0"] == [0, 1]
    assert g["most_incorrect_0"] == [2]
    assert g["most_correct_1"] == [6, 3, 4]
    assert g["most_incorrect_1"] == [5]
    assert g["most_uncertain"] == [4, 1, 2, 3]
    assert g["top_losses"] == [5, 2, 4, 1]
    correct = {0, 1, 3, 4, 6}
    assert len(g["random_correct"]) == 4
    assert set(g["random_correct"]) <= correct
    assert len(set(g["random_correct"])) == 4
    # Seeded: same seed, same pick.
    assert select_grids(BIN_PROBS, BIN_LABELS, k=4)["random_correct"] == g["random_correct"]
    # Asking for more than exist returns them all.
    assert sorted(select_grids(BIN_PROBS, BIN_LABELS, k=10)["random_correct"]) == sorted(correct)
    assert set(g) == {
        "random_correct",
        "most_correct_0",
        "most_incorrect_0",
        "most_correct_1",
        "most_incorrect_1",
        "most_uncertain",
        "top_losses",
    }


def test_select_grids_three_class() -> None:
    g = select_grids(TRI_PROBS, TRI_LABELS, k=4)
    assert g["most_correct_0"] == [0, 1]
    assert g["most_incorrect_0"] == [2, 3]
    assert g["most_correct_1"] == [4, 5]
    assert g["most_incorrect_1"] == [6]
    assert g["most_correct_2"] == [7]
    assert g["most_incorrect_2"] == [8]
    assert g["most_uncertain"] == [8, 1, 5, 3]
    assert g["top_losses"] == [2, 3, 6, 8]
    assert set(g["random_correct"]) <= {0, 1, 4, 5, 7}


def test_select_grids_truncates_and_breaks_ties_by_index() -> None:
    probs = np.tile([0.8, 0.2], (3, 1))
    labels = np.zeros(3, dtype=int)
    g = select_grids(probs, labels, k=2)
    assert g["most_correct_0"] == [0, 1]
    assert g["most_uncertain"] == [0, 1]
    assert g["top_losses"] == [0, 1]
    assert g["most_incorrect_0"] == []
    assert g["most_correct_1"] == [] and g["most_incorrect_1"] == []
    assert all(v == [] for v in select_grids(probs, labels, k=0).values())


def test_select_grids_with_nothing_correct() -> None:
    probs = np.array([[0.2, 0.8], [0.9, 0.1]])
    g = select_grids(probs, np.array([0, 1]), k=3)
    assert g["random_correct"] == []
    assert g["most_incorrect_0"] == [0]
    assert g["most_incorrect_1"] == [1]


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8) for _ in range(n)]


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 0 and im.size[1] > 0


def test_write_report_writes_everything(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    imgs = _images(len(TRI_LABELS))
    names = [f"s3://bucket/train/{c}/img_{i}.jpg" for i, c in enumerate("aaaabbbcc")]
    names[3] = "dir/<script>alert&1.jpg"  # must be escaped in the HTML
    history = [
        {"epoch": 0, "phase": "frozen", "train_loss": 0.9, "valid_loss": 0.7, "accuracy": 0.6, "time": 3.0, "lr": 1e-3},
        {
            "epoch": 0,
            "phase": "unfrozen",
            "train_loss": 0.6,
            "valid_loss": 0.5,
            "accuracy": 0.7,
            "time": 4.0,
            "lr": 1e-4,
        },
        {
            "epoch": 1,
            "phase": "unfrozen",
            "train_loss": 0.4,
            "valid_loss": 0.45,
            "accuracy": 0.8,
            "time": 4.0,
            "lr": 1e-4,
        },
    ]
    lrs = np.geomspace(1e-7, 10, 50)
    lr_find = {"lrs": lrs.tolist(), "losses": (1 + np.sin(np.log10(lrs))).tolist(), "suggestion": 3e-3}
    out = tmp_path / "nested" / "report"
    calls: list[int] = []

    def loader(i: int) -> np.ndarray:
        calls.append(i)
        return imgs[i]

    index = write_report(
        out,
        probs=TRI_PROBS,
        labels=TRI_LABELS,
        classes=TRI_CLASSES,
        names=names,
        image_loader=loader,
        history=history,
        lr_find=lr_find,
        title="t <1>",
        extra={"model": "effnet", "epochs": np.int64(2)},
        k=3,
    )

    assert index == out / "index.html"
    pngs = [
        "confusion_matrix.png",
        "reliability.png",
        "grid_random_correct.png",
        "grid_most_correct.png",
        "grid_most_incorrect.png",
        "grid_most_uncertain.png",
        "top_losses.png",
        "training_curves.png",
        "lr_find.png",
    ]
    page = index.read_text(encoding="utf-8")
    for name in pngs:
        _assert_png(out / name)
        assert f'src="{name}"' in page
    assert sorted(p.name for p in out.glob("*.png")) == sorted(pngs)

    # Escaping: the raw tag never reaches the page, the escaped form does.
    assert "<script>" not in page
    assert html.escape("dir/<script>alert&1.jpg") in page
    assert "t &lt;1&gt;" in page
    # Per-class precision/recall appear in the metrics table.
    assert "precision" in page and "recall" in page

    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["extra"] == {"model": "effnet", "epochs": 2}
    assert metrics["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [1, 0, 1]]
    assert set(metrics["per_class"]) == set(TRI_CLASSES)

    # Only grid images are loaded, and every figure was closed.
    assert calls and set(calls) <= set(range(len(TRI_LABELS)))
    assert plt.get_fignums() == []


def test_write_report_without_optional_plots(tmp_path: Path) -> None:
    imgs = _images(len(BIN_LABELS), seed=1)
    index = write_report(
        tmp_path,
        probs=BIN_PROBS,
        labels=BIN_LABELS,
        classes=BIN_CLASSES,
        names=[f"{i}.png" for i in range(len(BIN_LABELS))],
        image_loader=imgs.__getitem__,
        k=2,
    )
    page = index.read_text(encoding="utf-8")
    assert not (tmp_path / "training_curves.png").exists()
    assert not (tmp_path / "lr_find.png").exists()
    assert "training_curves.png" not in page and "lr_find.png" not in page
    assert json.loads((tmp_path / "metrics.json").read_text())["extra"] == {}


def test_write_report_rejects_remote_dir_and_bad_names(tmp_path: Path) -> None:
    kwargs = dict(probs=BIN_PROBS, labels=BIN_LABELS, classes=BIN_CLASSES, image_loader=lambda i: _images(1)[0])
    with pytest.raises(ValueError):
        write_report("s3://bucket/report", names=[str(i) for i in range(7)], **kwargs)
    with pytest.raises(ValueError):
        write_report(tmp_path, names=["too-few"], **kwargs)


def test_empty_image_grid_still_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    plot_image_grid([], lambda i: _images(1)[0], [], path, "nothing here")
    _assert_png(path)


def test_head_curve_spreads_over_the_head_epoch(tmp_path: Path) -> None:
    from dragons.report import _expand_head_curve, plot_training_curves

    curve = [{"train_loss": 1.0 / (i + 1), "valid_loss": 0.5 / (i + 1), "accuracy": 0.5 + i / 10} for i in range(4)]
    history = [
        {"epoch": 0, "phase": "head", "train_loss": 0.25, "valid_loss": 0.125, "accuracy": 0.8, "head_curve": curve},
        {"epoch": 1, "phase": "unfrozen", "train_loss": 0.2, "valid_loss": 0.1, "accuracy": 0.9},
    ]
    rows, xs = _expand_head_curve(history)
    assert xs is not None and xs.tolist() == [-0.75, -0.5, -0.25, 0.0, 1.0]
    assert [r["phase"] for r in rows] == ["head"] * 4 + ["unfrozen"]
    assert [r["accuracy"] for r in rows[:4]] == [p["accuracy"] for p in curve]
    assert _expand_head_curve(history[1:]) == (history[1:], None)  # no curve: rows as they are
    plot_training_curves(history, tmp_path / "curves.png")
    _assert_png(tmp_path / "curves.png")
