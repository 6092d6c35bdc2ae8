"""lr-find, evaluate and the HTML report on real artifacts (slow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

REPORT_PNGS = [
    "confusion_matrix.png",
    "reliability.png",
    "grid_random_correct.png",
    "grid_most_correct.png",
    "grid_most_incorrect.png",
    "grid_most_uncertain.png",
    "top_losses.png",
    "training_curves.png",
]


def test_lr_find_plots_and_suggests(
    ray_session: None,
    workdir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dragons.cli import get_lr_find_parser, lr_find_main
    from dragons.local.synth import write_dataset
    from dragons.train import run

    found: list[run.LrFindResult] = []
    real = run.find_lr
    monkeypatch.setattr(run, "find_lr", lambda cfg: found.append(real(cfg)) or found[-1])  # what the CLI got

    data = workdir / "lrf"
    write_dataset(str(data), ["drogon", "viserion"], n_train=16, n_valid=4, seed=5, size=(160, 120))
    args = get_lr_find_parser().parse_args(
        ["--data", str(data), "--image-size", "64", "--plot", str(tmp_path / "lr.png")]
    )
    assert lr_find_main(args) == 0
    out = capsys.readouterr().out
    lr = float(re.search(r"suggested lr: ([0-9.e+-]+)", out).group(1))  # type: ignore[union-attr]
    assert 1e-6 < lr < 1.0
    with Image.open(tmp_path / "lr.png") as im:
        assert im.size[0] > 100
    (result,) = found
    assert isinstance(result, run.LrFindResult) and f"{result.suggestion:.2e}" == f"{lr:.2e}"
    assert len(result.lrs) == len(result.losses) > 10 and result.lrs == sorted(result.lrs)
    assert result.facts["n_train"] == 32 and result.facts["n_valid"] == 8 and not result.facts["bad_images"]
    # The sweep's own run folder (and so its log's name): never a training run's checkpoints.
    assert os.path.basename(result.log).startswith("train-lr-find-"), result.log


def test_evaluate_cli_writes_report(hymenoptera_model: dict, hymenoptera_s3: str, tmp_path: Path) -> None:
    report = tmp_path / "report"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dragons.cli",
            "evaluate",
            "--model",
            hymenoptera_model["uri"],
            "--data",
            hymenoptera_s3,
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    acc = float(re.search(r"accuracy ([0-9.]+)", p.stdout).group(1))  # type: ignore[union-attr]
    assert abs(acc - hymenoptera_model["meta"]["metrics"]["valid_accuracy"]) <= 1.5 / 153
    assert "precision" in p.stdout and "ants" in p.stdout
    html = (report / "index.html").read_text()
    for name in REPORT_PNGS:
        assert name in html, name
        with Image.open(report / name) as im:
            im.load()
            assert im.size[0] > 50 and im.size[1] > 50


def test_train_writes_report_beside_artifact(hymenoptera_model: dict) -> None:
    from dragons import storage

    base = hymenoptera_model["uri"] + "/report"
    html = storage.read_bytes(base + "/index.html").decode()
    for name in REPORT_PNGS:
        assert name in html
        assert len(storage.read_bytes(f"{base}/{name}")) > 1000


def test_evaluate_splits_a_folder_without_valid_as_the_model_was_trained(tmp_path: Path) -> None:
    """A folder with no valid/ is split by --valid-pct and --seed: evaluate takes the
    model's own (model.json) unless told otherwise, so it never scores images the
    model trained on because its defaults differ from the training run's."""
    import shutil

    from dragons import artifact
    from dragons.data import discover
    from dragons.dataconfig import DataConfig
    from dragons.evaluate import EvaluateResult, evaluate
    from dragons.local.synth import write_dataset
    from dragons.models.registry import build_model, get_spec

    data = tmp_path / "data"
    write_dataset(str(data), ["drogon", "viserion"], n_train=10, n_valid=0, seed=2, size=(96, 80))
    shutil.rmtree(data / "valid")
    spec = get_spec("efficientnet_lite0")
    meta = {
        "arch": "efficientnet_lite0",
        "classes": ["drogon", "viserion"],
        "metrics": {},
        "data_config": DataConfig.create(64, 0.875, spec.mean, spec.std).to_dict(),
        "config": {"valid_pct": 0.5, "seed": 7},
    }
    artifact.save(str(tmp_path / "model"), build_model("efficientnet_lite0", 2, "none"), meta)
    trained_split = discover(str(data), 0.5, 7).valid
    assert len(trained_split) != len(discover(str(data), 0.2, 42).valid)  # the defaults would split otherwise
    result = evaluate(str(tmp_path / "model"), str(data), None)
    assert isinstance(result, EvaluateResult) and result.report is None and result.skipped == 0
    assert result.metrics["n"] == len(trained_split)
    result = evaluate(str(tmp_path / "model"), str(data), None, valid_pct=0.2, seed=42)  # explicit values still win
    assert result.metrics["n"] == len(discover(str(data), 0.2, 42).valid)
