"""``dragons report`` and ``dragons export``: the morning after a night.

Two nights score into one table: night 1 the hymenoptera val/ photos, night 2
val/bees plus 60 flower photos the ants/bees model has never seen plus three
bad files. Night 2's report must see the drift, name night 1 as the previous
run, count the bad files by kind and show its thumbnails in a real browser
(headless Chromium, installed by `make test`); ``--fail-on-drift`` must fail it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from dragons import storage

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "data" / "flowers5" / "valid"
FLOWERS_PER_CLASS = 12  # x 5 classes = 60 photos the ants/bees model was never trained on
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m dragons.cli ...`` with this session's S3 endpoint (the s3 fixture's os.environ)."""
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "dragons.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _night2_input(bucket: str, hymenoptera_s3: str) -> str:
    """val/bees, 60 flowers and 3 bad files under a prefix of their own."""
    prefix = f"s3://{bucket}/night2"
    fs, _ = storage.filesystem(prefix)
    for f in storage.list_files(f"{hymenoptera_s3}/val/bees"):
        storage.write_bytes(f"{prefix}/bees/{f.uri.rsplit('/', 1)[-1]}", storage.read_bytes(f.uri, fs))
    for cls in sorted(os.listdir(FLOWERS)):
        for name in sorted(os.listdir(FLOWERS / cls))[:FLOWERS_PER_CLASS]:
            storage.write_bytes(f"{prefix}/flowers/{cls}/{name}", (FLOWERS / cls / name).read_bytes())
    jpeg = (FLOWERS / "daisy" / min(os.listdir(FLOWERS / "daisy"))).read_bytes()
    storage.write_bytes(f"{prefix}/bad/empty.jpg", b"")
    storage.write_bytes(f"{prefix}/bad/notes.jpg", b"this is a text file, not a photo\n")
    storage.write_bytes(f"{prefix}/bad/truncated.jpg", jpeg[: len(jpeg) // 2])
    return prefix


@pytest.fixture(scope="module")
def nights(hymenoptera_model: dict, hymenoptera_s3: str, bucket: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One table, two nights scored once for every test here."""
    from dragons.score.cli import run_score as score
    from dragons.score.config import ScoreConfig

    root = tmp_path_factory.mktemp("nights")
    table = str(root / "scores")
    night2 = _night2_input(bucket, hymenoptera_s3)
    for run_id, source in (("n1", f"{hymenoptera_s3}/val"), ("n2", night2)):
        # Night 2 writes its own report as it completes (`dragons score --report DIR`).
        score(
            ScoreConfig(
                model=hymenoptera_model["uri"],
                input=source,
                output=table,
                run_id=run_id,
                report=str(root / "score-report-n2") if run_id == "n2" else "",
                log_file=str(root / f"score-{run_id}.log"),
            )
        )
    return {"table": table, "root": root, "night2": night2, "model": hymenoptera_model}


def _chromium(page: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: `make test` installs it (make browser), or apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="dragons-chromium-") as profile:
        return subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _check_in_browser(index: Path, shot: Path) -> int:
    """The page renders (a screenshot that is not blank) and every <img> loaded; returns their count."""
    import numpy as np
    from PIL import Image

    p = _chromium(index, f"--screenshot={shot}", "--window-size=1280,4000")
    assert shot.exists(), p.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 20 and pixels.min() < 100, (pixels.std(), pixels.min())  # not blank, not all white
    dom = _chromium(index, "--dump-dom", "--virtual-time-budget=5000").stdout
    states = [chunk.split('"', 1)[0] for chunk in dom.split('data-state="')[1:]]
    assert dom.count("<img") == len(states)
    assert states and set(states) == {"ok"}, {s: states.count(s) for s in set(states)}
    return len(states)


def test_night2_report_sees_the_drift_and_fails_the_gate(nights: dict, tmp_path: Path) -> None:
    out = tmp_path / "report-n2"
    t0 = time.monotonic()
    p = _cli(
        "report",
        "--table",
        nights["table"],
        "--run-id",
        "n2",
        "--out",
        str(out),
        "--top",
        "16",
        "--fail-on-drift",
        "0.05",
    )
    seconds = time.monotonic() - t0
    assert p.returncode == 3, p.stdout + p.stderr[-3000:]
    assert "error: run n2 drifted from n1" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    print(
        f"\nnight 2: report {seconds:.1f}s, js {s['drift']['js_distance']:.3f}, errors {s['errors_by_kind']}, "
        f"mix {s['class_mix']} (was {s['previous_class_mix']}), thumbnails {s['thumbnails']['written']}"
    )
    assert s["run_id"] == "n2" and s["previous_run_id"] == "n1"
    assert s["drift"]["js_distance"] > 0.1
    assert s["counts"] == {"listed": 83 + 60 + 3, "skipped": 0, "scored": 83 + 60, "errors": 3}
    assert sum(s["errors_by_kind"].values()) == 3 and len(s["errors_by_kind"]) >= 2, s["errors_by_kind"]
    examples = [e["uri"] for ex in s["error_examples"].values() for e in ex]
    assert sorted(u.rsplit("/", 1)[-1] for u in examples) == ["empty.jpg", "notes.jpg", "truncated.jpg"]
    assert abs(sum(s["class_mix"].values()) - 1) < 1e-9 and set(s["class_mix"]) <= {"ants", "bees"}
    assert set(s["drift"]["per_class"]) == set(s["class_mix"]) | set(s["previous_class_mix"])
    # Histograms count every row without error, now and before.
    assert sum(s["confidence"]["now"]) == 143 and sum(s["confidence"]["previous"]) == 153
    # The least sure: --top of them, lowest score first, ties by margin.
    keys = [(u["score"], u["margin"]) for u in s["uncertain"]]
    assert len(keys) == 16 and keys == sorted(keys)
    assert all(u["uri"].startswith(nights["night2"] + "/") for u in s["uncertain"])
    assert all(0.5 <= u["score"] <= 1 and 0 <= u["margin"] <= 1 for u in s["uncertain"])
    surest = [e for items in s["surest"].values() for e in items]
    assert min(e["score"] for e in surest) >= max(u["score"] for u in s["uncertain"])
    _check_training_mix(s, nights["model"]["meta"])
    # In a browser: a real page, every thumbnail and plot loaded.
    shot = tmp_path / "night2.png"
    images = _check_in_browser(out / "index.html", shot)
    assert images >= 10 and s["thumbnails"]["written"] >= 10 and not s["thumbnails"]["failed"]
    html = (out / "index.html").read_text()
    assert "empty.jpg" in html and "truncated.jpg" in html and "n1" in html
    _save_trimmed(shot, REPO / "docs" / "report-night2.png")  # the picture docs/reports.md shows


def _save_trimmed(shot: Path, dest: Path) -> None:
    """The screenshot without the blank window below the page, small enough for the repository."""
    from PIL import Image, ImageOps

    img = Image.open(shot).convert("RGB")
    box = ImageOps.invert(img.convert("L")).getbbox()
    if box:
        img = img.crop((0, 0, img.width, min(img.height, box[3] + 24)))
    img.quantize(256).save(dest, optimize=True)  # 256 colours: a third of the bytes, fine for a page


def _check_training_mix(s: dict[str, Any], meta: dict[str, Any]) -> None:
    """Artifacts that record ``data.train_class_counts`` give the training mix; older ones null."""
    counts = (meta.get("data") or {}).get("train_class_counts")
    if not counts:
        assert s["training_class_mix"] is None and s["drift"]["vs_training"] is None
        return
    total = sum(counts.values())
    assert s["training_class_mix"] == pytest.approx({k: v / total for k, v in counts.items()})
    assert s["drift"]["vs_training"]["js_distance"] >= 0


def test_night1_has_no_previous_run_and_passes_the_gate(nights: dict, tmp_path: Path) -> None:
    p = _cli(
        "report",
        "--table",
        nights["table"],
        "--run-id",
        "n1",
        "--out",
        str(tmp_path / "r1"),
        "--top",
        "4",
        "--fail-on-drift",
        "0.05",
    )
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "no previous complete run" in p.stderr
    s = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert s["previous_run_id"] is None and s["previous_class_mix"] is None
    assert s["drift"]["js_distance"] is None and s["confidence"]["previous"] is None
    assert s["counts"]["scored"] == 153 and s["errors_by_kind"] == {}


def test_library_default_run_and_s3_out(nights: dict) -> None:
    """No run id: the newest complete run; a report folder on S3 lands there whole."""
    from dragons.score.runreport import write_run_report

    out = "s3://dragons-test/reports/latest"
    s = write_run_report(nights["table"], out, top=2, surest=1)
    assert s["run_id"] == "n2" and s["previous_run_id"] == "n1" and s["report"] == f"{out}/index.html"
    assert json.loads(storage.read_bytes(f"{out}/summary.json"))["run_id"] == "n2"
    thumbs = [f.uri for f in storage.list_files(f"{out}/thumbs")]
    assert len(thumbs) == s["thumbnails"]["written"] >= 2


def test_export_least_sure_for_labelling(nights: dict, tmp_path: Path) -> None:
    out = tmp_path / "tasks.json"
    p = _cli(
        "export",
        "--table",
        nights["table"],
        "--run-id",
        "n2",
        "--uncertain",
        "20",
        "--format",
        "label-studio",
        "--out",
        str(out),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    tasks = json.loads(out.read_text())
    assert len(tasks) == 20
    assert all(t["data"]["image"].startswith(nights["night2"] + "/") for t in tasks)
    version = nights["model"]["meta"]["version"]
    for t in tasks:
        pred = t["predictions"][0]
        assert pred["model_version"] == version and pred["score"] == t["data"]["model_score"]
        assert pred["result"] == [
            {
                "from_name": "label",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [t["data"]["model_label"]]},
            }
        ]
    scores = [t["data"]["model_score"] for t in tasks]
    assert scores == sorted(scores)

    from dragons.score.labelling import select, write_export

    # --per-class: N // classes from each predicted class, the rest least sure overall.
    balanced = select(nights["table"], "n2", 7, per_class_=True)
    by_label = {label: sum(r["label"] == label for r in balanced) for label in {r["label"] for r in balanced}}
    assert len(balanced) == 7 and len({r["uri"] for r in balanced}) == 7
    classes = json.loads(
        _cli(
            "query",
            "--table",
            nights["table"],
            "--format",
            "json",
            "SELECT count(DISTINCT label) AS n FROM scores WHERE run_id = 'n2' AND error IS NULL",
        ).stdout
    )["n"]
    assert len(by_label) == classes and min(by_label.values()) >= 7 // classes
    # CSV: uri,label,score,margin, the same rows as the tasks.
    rows = write_export(nights["table"], "n2", 20, "csv", str(tmp_path / "batch.csv"))
    with open(tmp_path / "batch.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert rows == 20 and list(got[0]) == ["uri", "label", "score", "margin"]
    assert [r["uri"] for r in got] == [t["data"]["image"] for t in tasks]


def test_errors_name_the_input(nights: dict, tmp_path: Path) -> None:
    p = _cli("report", "--table", nights["table"], "--run-id", "n9", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "error: run 'n9' is not in the table" in p.stderr and "n1, n2" in p.stderr, p.stderr
    p = _cli("export", "--table", nights["table"], "--run-id", "n2", "--uncertain", "0")
    assert p.returncode == 2 and "error: --uncertain 0" in p.stderr, p.stderr


def test_js_distance_matches_scipys_definition() -> None:
    from dragons.score.runreport import compare, js_distance

    assert js_distance({"a": 1.0}, {"a": 1.0}) == 0.0
    assert js_distance({"a": 1.0}, {"b": 1.0}) == pytest.approx(1.0)
    # scipy.spatial.distance.jensenshannon([1, 0], [0.5, 0.5], base=2)
    assert js_distance({"a": 1.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.5579230452841438)
    assert compare({"a": 0.25, "b": 0.75}, None) is None
    assert compare({"a": 0.25, "b": 0.75}, {"a": 0.5, "c": 0.5})["per_class"] == {"a": -0.25, "b": 0.75, "c": -0.5}


def test_training_mix_from_the_artifact_and_unreadable_thumbnails(tmp_path: Path) -> None:
    """New artifacts record their training class counts, old ones do not; an image that
    cannot be read is named on the page, never a crash or a broken <img>."""
    from dragons.score.runreport import _thumb, _Thumbnailer, training_mix

    art = tmp_path / "model"
    art.mkdir()
    (art / "model.json").write_text(json.dumps({"data": {"train_class_counts": {"ants": 124, "bees": 121}}}))
    mix, note = training_mix(str(art))
    assert note is None and mix == pytest.approx({"ants": 124 / 245, "bees": 121 / 245})
    (art / "model.json").write_text(json.dumps({"data": {"n_train": 245}}))
    assert training_mix(str(art)) == (None, f"the model artifact {art} does not record its training class counts")
    assert training_mix(str(tmp_path / "gone"))[0] is None

    (tmp_path / "text.jpg").write_text("not a photo")
    failed = _Thumbnailer(tmp_path / "thumbs", 64).all([str(tmp_path / "text.jpg"), str(tmp_path / "missing.jpg")])
    assert failed[str(tmp_path / "text.jpg")].startswith("not_an_image")
    assert failed[str(tmp_path / "missing.jpg")].startswith("not_found")
    entry = {"uri": str(tmp_path / "text.jpg"), "label": "ants", "score": 0.6, "margin": 0.2}
    shown = _thumb(entry, failed)
    assert "unreadable: not_an_image" in shown and "<img" not in shown


def test_score_writes_the_report_of_the_run_it_completes(nights: dict) -> None:
    """`dragons score --report DIR`: the night's report, beside the table, as `dragons report` writes it."""
    out = nights["root"] / "score-report-n2"
    s = json.loads((out / "summary.json").read_text())
    assert (s["run_id"], s["previous_run_id"]) == ("n2", "n1") and s["drift"]["js_distance"] > 0.1
    assert (out / "index.html").is_file()
    log = (nights["root"] / "score-n2.log").read_text()
    assert "run n2: report " in log and "previous run n1" in log, log[-2000:]
