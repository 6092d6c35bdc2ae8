"""The whole loop in one test (issue 30): a training folder with 20% wrong labels,
a night, the least sure and the novel images out to labelling, the answers back
in Label Studio's own export format, a retrain with the corrections, the
challenger against the champion on held-out images, a promotion, the next night.

The wrong labels are a misfiled folder, the way they happen: 15 of rhaegal's 25
training images sit in ``train/viserion/`` (15 of 75 = 20%). The champion learns
that rhaegal-looking dragons are mostly viserion (15 against 10). The night
scores the archive's new arrivals (40 new dragons of each kind, 5 flower photos):
the champion is torn on the new rhaegals, exactly the images the least-sure
export sends to people, and the flowers are the most novel. People label the
dragons and skip the flowers; the challenger trains on the same folders plus
those labels, tells the three apart, and wins on a held-out set drawn apart
(another seed) by the margin asserted below.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dragons import storage
from dragons.cli import main as dragons

CLASSES = ["drogon", "viserion", "rhaegal"]
MOVED = 15  # rhaegal training images filed under viserion/: 20% of 75


def _truth(uri: str) -> str | None:
    """The true class is the file name's prefix (``rhaegal_0003.jpg``); flowers have none of ours."""
    name = uri.rsplit("/", 1)[-1].split("_", 1)[0]
    return name if name in CLASSES else None


def _answer(tasks: list[dict[str, Any]], start_id: int) -> list[dict[str, Any]]:
    """What a person does in Label Studio, as its JSON export writes it: the true class
    for our dragons; a skip (``was_cancelled``) for an image that is none of them."""
    out = []
    for i, t in enumerate(tasks):
        tid, uri = start_id + i, t["data"]["image"]
        truth = _truth(uri)
        ann = {
            "id": 1000 + tid,
            "completed_by": 7,
            "was_cancelled": truth is None,
            "ground_truth": False,
            "lead_time": 3.2,
            "created_at": "2026-12-08T09:00:00.000000Z",
            "updated_at": "2026-12-08T09:00:00.000000Z",
            "task": tid,
            "origin": "prediction-changed",
            "parent_prediction": 500 + tid,
            "parent_annotation": None,
            "result": []
            if truth is None
            else [
                {
                    "id": f"r{tid}",
                    "type": "choices",
                    "from_name": "label",
                    "to_name": "image",
                    "value": {"choices": [truth]},
                }
            ],
        }
        out.append(
            {
                "id": tid,
                "data": t["data"],
                "annotations": [ann],
                "predictions": t.get("predictions", []),
                "meta": {},
                "created_at": "2026-12-07T20:00:00.000000Z",
                "updated_at": "2026-12-08T09:00:00.000000Z",
                "inner_id": tid,
                "total_annotations": 1,
                "cancelled_annotations": int(truth is None),
                "total_predictions": 1,
                "project": 3,
                "file_upload": None,
            }
        )
    return out


def _night_versions(table: str, run_id: str) -> set[str]:
    from helpers_hardening import rows_of

    return {r["model_version"] for r in rows_of(table, run_id)}


@pytest.mark.slow
def test_the_loop_corrects_labels_and_promotes_a_better_model(ray_session: None, bucket: str, tmp_path: Path) -> None:
    from dragons.local.synth import write_dataset

    local, arrivals = tmp_path / "data", tmp_path / "arrivals"
    write_dataset(str(local), CLASSES, n_train=25, n_valid=20, seed=5, size=(96, 72))
    for f in sorted((local / "train" / "rhaegal").iterdir())[:MOVED]:  # the misfiled folder
        shutil.move(str(f), local / "train" / "viserion" / f.name)
    write_dataset(str(arrivals), CLASSES, n_train=40, n_valid=0, seed=7, size=(96, 72))
    archive = tmp_path / "archive"
    archive.mkdir()
    for f in (arrivals / "train").rglob("*.jpg"):
        shutil.copy(f, archive / f.name)
    flowers = sorted((Path(__file__).resolve().parents[2] / "shared/data/flowers5/valid").rglob("*.jpg"))[::170][:5]
    assert len(flowers) == 5, "../shared/data/flowers5 is missing"
    for i, f in enumerate(flowers):  # the archive starts holding something new
        shutil.copy(f, archive / f"flower_{i}.jpg")
    data, night = f"s3://{bucket}/loop/data", f"s3://{bucket}/loop/archive"
    storage.upload_dir(local, data)
    storage.upload_dir(archive, night)
    holdout = tmp_path / "holdout"  # labelled images neither model trained on
    write_dataset(str(holdout), CLASSES, n_train=0, n_valid=20, seed=99, size=(96, 72))

    registry, table, labels = f"s3://{bucket}/loop/models", f"s3://{bucket}/loop/scores", f"s3://{bucket}/loop/labels"
    recipe = ["--workers", "1", "--image-size", "64", "--batch-size", "8", "--no-report"]

    # Night 1 with the champion, promoted to prod.
    assert dragons(["train", "--data", data, "--out", registry, *recipe]) == 0
    champion = json.loads(storage.read_bytes(f"{registry}/model.json"))["version"]
    assert dragons(["model", "promote", "--registry", registry, "--alias", "prod", champion]) == 0
    assert (
        dragons(["score", "--model", f"{registry}@prod", "--input", night, "--output", table, "--run-id", "night1"])
        == 0
    )
    assert _night_versions(table, "night1") == {champion}

    # The least sure and the novel images go to people.
    unsure, novel = tmp_path / "unsure.json", tmp_path / "novel.json"
    assert dragons(["export", "--table", table, "--run-id", "night1", "--uncertain", "60", "--out", str(unsure)]) == 0
    assert dragons(["export", "--table", table, "--run-id", "night1", "--novel", "5", "--out", str(novel)]) == 0
    novel_uris = {t["data"]["image"] for t in json.loads(novel.read_text())}
    assert novel_uris == {f"{night}/flower_{i}.jpg" for i in range(5)}, novel_uris
    tasks = json.loads(unsure.read_text()) + json.loads(novel.read_text())
    sent = [_truth(t["data"]["image"]) for t in tasks]
    assert sent.count("rhaegal") >= 10, f"the least sure are not where the champion is wrong: {sent}"

    # Answered in Label Studio, exported in its JSON format, imported (twice: the second changes nothing).
    answers = tmp_path / "project-3-at-2026-12-08.json"
    answers.write_text(json.dumps(_answer(tasks, start_id=1)))
    assert dragons(["labels", "import", "--labels", labels, "--from", str(answers), "--model", f"{registry}@prod"]) == 0
    from deltalake import DeltaTable

    version = DeltaTable(labels, storage_options=storage.delta_options(labels)).version()
    assert dragons(["labels", "import", "--labels", labels, "--from", str(answers), "--model", f"{registry}@prod"]) == 0
    assert DeltaTable(labels, storage_options=storage.delta_options(labels)).version() == version

    # The challenger: the same folders, the corrections on top.
    assert dragons(["train", "--data", data, "--labels", labels, "--out", registry, *recipe]) == 0
    challenger = json.loads(storage.read_bytes(f"{registry}/model.json"))["version"]
    assert challenger != champion
    meta = json.loads(storage.read_bytes(f"{registry}/versions/{champion}/model.json"))
    assert meta["version"] == champion  # the champion's version is kept, untouched

    report = tmp_path / "compare"
    assert (
        dragons(
            [
                "compare",
                "--model",
                f"{registry}@prod",
                "--model",
                f"{registry}@{challenger}",
                "--data",
                str(holdout),
                "--out",
                str(report),
                "--min-gain",
                "0.04",
            ]
        )
        == 0
    )
    summary = json.loads((report / "summary.json").read_text())
    a, b = summary["a"]["accuracy"], summary["b"]["accuracy"]
    # Measured (2026-12-07): A 45/60, B 48/60; rhaegal recall 0.35 -> 0.6. A model trained on
    # clean folders gets 53/60 here (64 px features), the ceiling of what labels can buy.
    rhaegal = (
        summary["model_b"]["per_class"]["rhaegal"]["recall"] - summary["model_a"]["per_class"]["rhaegal"]["recall"]
    )
    assert b - a >= 0.04 and rhaegal >= 0.2, summary
    assert summary["mcnemar"]["c"] > summary["mcnemar"]["b"]
    assert (report / "index.html").exists()
    # The other way round the gate stays shut.
    assert (
        dragons(
            [
                "compare",
                "--model",
                f"{registry}@{challenger}",
                "--model",
                f"{registry}@prod",
                "--data",
                str(holdout),
                "--out",
                str(tmp_path / "compare-rev"),
                "--min-gain",
                "0.0",
            ]
        )
        == 3
    )

    # Promoted; the next night scores with it, and its rows say so.
    assert dragons(["model", "promote", "--registry", registry, "--alias", "prod", challenger]) == 0
    assert (
        dragons(["score", "--model", f"{registry}@prod", "--input", night, "--output", table, "--run-id", "night2"])
        == 0
    )
    assert _night_versions(table, "night2") == {challenger}
    assert _night_versions(table, "night1") == {champion}
