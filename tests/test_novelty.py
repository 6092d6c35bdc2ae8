"""Novelty (dragons.novelty): the statistics' math, the artifact round trip, the one
inference path, the scores table's column, the report's section and gate, and
``dragons export --novel``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from dragons import artifact, novelty
from dragons.errors import DragonsError


def _clusters(rng: np.random.Generator, n: int, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(centers), n)
    # Features that vary in a few directions (as a network's do), with small noise elsewhere.
    mix = np.random.default_rng(99).normal(size=(8, centers.shape[1]))  # the same directions for every call
    f = centers[y] + rng.normal(size=(n, 8)) @ mix * 0.5 + rng.normal(size=(n, centers.shape[1])) * 0.05
    return f, y


def test_fit_separates_far_points_and_sums_like_one_rank() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 64)) * 3
    f, y = _clusters(rng, 600, centers)
    held, _ = _clusters(rng, 200, centers)
    # Far: the same spread around points no class is near, and points off the training directions.
    far = np.concatenate(
        [_clusters(rng, 100, rng.normal(size=(3, 64)) * 3)[0], held[:100] + rng.normal(size=(100, 64)) * 1.0]
    )
    # Data-parallel ranks add their statistics: the same fit as one rank over every row.
    one = novelty.Stats.of(f, y, 3)
    two = novelty.Stats.of(f[:250], y[:250], 3) + novelty.Stats.of(f[250:], y[250:], 3)
    np.testing.assert_allclose(two.outer, one.outer, rtol=1e-9)
    nov = novelty.fit(two, dim=16)
    assert nov.proj.shape == (64, 16) and nov.centers.shape == (3, 16) and nov.fitted_on == 600
    inside, outside = nov.score(held), nov.score(far)
    assert novelty.auroc(inside, outside) > 0.99
    # Whitened: a held-out in-distribution point is about sqrt(k) from its class mean, not 10x that.
    assert 0.5 * np.sqrt(16) < np.median(inside) < 2 * np.sqrt(16)
    # The threshold: the held-out rows' 95th percentile, so about 5% of new in-distribution rows exceed it.
    nov = novelty.with_threshold(nov, inside, nov.score(f))
    assert nov.threshold_from == "valid" and nov.share_above(inside) == pytest.approx(0.05, abs=0.01)
    assert nov.share_above(outside) > 0.9
    # A class with no training image gets no center (it would be the mean of nothing).
    nov3 = novelty.fit(novelty.Stats.of(f[y < 2], y[y < 2], 3), dim=16)
    assert nov3.centers.shape == (2, 16)


def test_auroc_counts_ties_half() -> None:
    assert novelty.auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert novelty.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert novelty.auroc(np.array([1.0]), np.array([1.0])) == 0.5


def test_meta_round_trip_is_compact_and_checked() -> None:
    rng = np.random.default_rng(1)
    f, y = _clusters(rng, 400, rng.normal(size=(2, 1280)))
    nov = novelty.with_threshold(novelty.fit(novelty.Stats.of(f, y, 2)), None, np.arange(100.0))
    meta = json.loads(json.dumps({"novelty": nov.to_meta()}, indent=2))
    # Lite0's 1280 features x 128 directions as base64 float32: under 1 MB of model.json.
    assert len(json.dumps(meta, indent=2)) < 1_000_000
    back = novelty.Novelty.from_meta(meta)
    assert back is not None and back.threshold_p95 == pytest.approx(np.percentile(np.arange(100.0), 95))
    np.testing.assert_allclose(back.score(f[:20]), nov.score(f[:20]), rtol=1e-5)
    assert novelty.Novelty.from_meta({}) is None and novelty.Novelty.from_meta({"novelty": None}) is None
    with pytest.raises(DragonsError, match="novelty method 'knn'"):
        novelty.Novelty.from_meta({"novelty": {**meta["novelty"], "method": "knn"}})
    with pytest.raises(DragonsError, match="novelty.proj is malformed"):
        novelty.Novelty.from_meta({"novelty": {**meta["novelty"], "proj": {"shape": [3], "float32_b64": "AAAA"}}})


def _images(root: Path, n: int, seed: int = 0) -> list[Path]:
    from helpers_hardening import jpeg

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"{i:03d}.jpg"
        p.write_bytes(jpeg(seed + i))
        paths.append(p)
    return paths


def _model_with_stats(tmp_path: Path, fit_on: list[Path], threshold_at: float = 50) -> str:
    """A tiny untrained Lite0 artifact at 64 px with novelty statistics fitted here on ``fit_on``
    (what training does with its training images); its threshold at that percentile of them."""
    from helpers_hardening import save_tiny_model

    from dragons.images import decode_to_base
    from dragons.predictor import Predictor

    out = str(tmp_path / "model")
    save_tiny_model(out)
    art = artifact.load(out)
    feats = Predictor.from_artifact(art).features(
        np.stack([decode_to_base(p.read_bytes(), art.data.base_size) for p in fit_on])
    )
    nov = novelty.fit(novelty.Stats.of(feats, np.arange(len(fit_on)) % 2, 2), dim=8)
    nov.threshold_p95, nov.threshold_from = float(np.percentile(nov.score(feats), threshold_at)), "train"
    artifact.save(out, art.model, {**art.meta, "novelty": nov.to_meta()})
    return out


def test_predictor_scores_novelty_only_with_statistics(tmp_path: Path) -> None:
    from helpers_hardening import save_tiny_model

    from dragons.predictor import Predictor, predict_rows

    imgs = _images(tmp_path / "imgs", 12)
    with_stats = artifact.load(_model_with_stats(tmp_path, imgs))
    save_tiny_model(str(tmp_path / "plain"))
    plain = artifact.load(str(tmp_path / "plain"))
    uris = [str(p) for p in imgs] + [str(tmp_path / "missing.jpg")]
    probs, nov, errors = predict_rows(with_stats, uris)
    assert nov is not None and np.isfinite(nov[:-1]).all() and (nov[:-1] >= 0).all() and np.isnan(nov[-1])
    assert errors[-1] and not any(errors[:-1])
    # The same weights without statistics: the same probabilities, and no novelty at all.
    probs2, nov2, _ = predict_rows(plain, uris)
    assert nov2 is None
    np.testing.assert_allclose(probs[:-1], probs2[:-1], atol=1e-6)
    # Novelty is the stored statistics applied to the predictor's own features.
    pred = Predictor.from_artifact(with_stats)
    from dragons.images import decode_to_base

    batch = np.stack([decode_to_base(p.read_bytes(), with_stats.data.base_size) for p in imgs])
    stats = novelty.Novelty.from_meta(with_stats.meta)
    assert stats is not None
    np.testing.assert_allclose(nov[:-1], stats.score(pred.features(batch)), rtol=1e-4, atol=1e-4)
    p, n = pred.numpy_with_novelty(batch[:0])
    assert p.shape == (0, 2) and n is not None and n.shape == (0,)


def _write_run(
    root: str, run_id: str, model: str, novelty_values: list[float] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A complete run written without Ray or a model (rows made up): ``novelty_values`` None
    writes it as a dragons before novelty did, in a schema without the column."""
    from datetime import datetime, timezone

    import pyarrow as pa

    import dragons.score.table as table_mod
    from dragons.score import schema as schema_mod

    if novelty_values is None:

        def old_schema(classes: list[str]) -> pa.Schema:
            s = schema_mod.schema(classes)
            return s.remove(s.get_field_index("novelty"))

        monkeypatch.setattr(table_mod, "schema", old_schema)
    w = table_mod.RunWriter(
        root, run_id, datetime.now(timezone.utc), ["ants", "bees"], model_version="v0", info={"model": model}
    )
    monkeypatch.undo()
    n = len(novelty_values) if novelty_values is not None else 5
    rows = {
        "uri": [f"s3://x/{run_id}/{i}.jpg" for i in range(n)],
        "label": ["ants"] * n,
        "score": [0.75] * n,
        "p_ants": [0.75] * n,
        "p_bees": [0.25] * n,
        "error": pa.nulls(n, pa.string()),
    }
    if novelty_values is not None:
        rows["novelty"] = novelty_values
    w.begin()
    w.add(pa.table(rows))
    w.finish({"listed": n})


def test_scored_table_report_gate_and_export(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A table written before novelty takes a run with it; the report shows the share above
    the threshold against the previous run; --fail-on-novelty exits 3; export --novel picks the most novel."""
    from dragons.cli import main
    from dragons.score.cli import run_score
    from dragons.score.config import ScoreConfig
    from dragons.score.labelling import select
    from dragons.score.query import run_sql

    imgs = _images(tmp_path / "in", 10)
    (tmp_path / "in" / "bad.jpg").write_bytes(b"not an image")
    model = _model_with_stats(tmp_path, imgs[:6], threshold_at=50)
    threshold = artifact.read_meta(model)["novelty"]["threshold_p95"]
    out = str(tmp_path / "table")
    # Night 0 by a dragons before novelty: no novelty column in the table.
    _write_run(out, "n0", model, None, monkeypatch)
    assert "novelty" not in run_sql(out, "SELECT * FROM scores LIMIT 0").schema.names
    with pytest.raises(DragonsError, match="no novelty column"):
        select(out, "n0", None, novel=3)
    # Night 1 (written here): 3 of its 10 rows above the threshold. Night 2: scored.
    _write_run(out, "n1", model, [threshold + 1] * 3 + [threshold - 1] * 7, monkeypatch)
    run_score(
        ScoreConfig(model=model, input=str(tmp_path / "in"), output=out, run_id="n2", log_file=str(tmp_path / "n2.log"))
    )
    rows = run_sql(out, "SELECT run_id, uri, error, novelty FROM scores ORDER BY run_id, uri").to_pylist()
    assert {r["run_id"] for r in rows} == {"n0", "n1", "n2"}
    assert all(r["novelty"] is None for r in rows if r["run_id"] == "n0")  # older rows read NULL
    new = [r for r in rows if r["run_id"] == "n2"]
    assert len(new) == 11 and [r["uri"].endswith("bad.jpg") for r in new if r["error"]] == [True]
    assert all((r["novelty"] is None) == (r["error"] is not None) for r in new)  # error rows: NULL novelty

    capsys.readouterr()
    assert (
        main(
            [
                "report",
                "--table",
                out,
                "--run-id",
                "n2",
                "--out",
                str(tmp_path / "rep"),
                "--novel",
                "4",
                "--fail-on-novelty",
                "0.99",
            ]
        )
        == 0
    )
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    nov = s["novelty"]
    scored = sorted((r["novelty"] for r in new if r["novelty"] is not None), reverse=True)
    assert nov["rows"] == 10 and nov["above"] == sum(v > nov["threshold_p95"] for v in scored)
    assert 0 < nov["share"] < 1 and nov["previous_share"] == pytest.approx(0.3) and s["previous_run_id"] == "n1"
    assert [e["novelty"] for e in nov["most_novel"]] == pytest.approx(scored[:4])
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Novelty: what the model does not know" in page and "novelty " in page
    assert all((tmp_path / "rep" / "thumbs").iterdir())
    assert (
        main(["report", "--table", out, "--run-id", "n2", "--out", str(tmp_path / "rep2"), "--fail-on-novelty", "0.05"])
        == 3
    )
    err = capsys.readouterr().err
    assert "error: run n2:" in err and "above the model's novelty threshold" in err and "--fail-on-novelty 0.05" in err
    assert (
        main(["report", "--table", out, "--run-id", "n2", "--out", str(tmp_path / "rep3"), "--fail-on-novelty", "2"])
        == 2
    )

    # export --novel: the most novel rows, with the least sure ones too, none twice.
    csv_out = tmp_path / "novel.csv"
    assert (
        main(["export", "--table", out, "--run-id", "n2", "--novel", "3", "--format", "csv", "--out", str(csv_out)])
        == 0
    )
    with open(csv_out, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["uri", "label", "score", "margin", "novelty"]
    assert [float(r["novelty"]) for r in got] == pytest.approx(scored[:3], abs=2e-6)  # 6 decimals
    both = select(out, "n2", 4, novel=3)
    assert len(both) == 7 and len({r["uri"] for r in both}) == 7
    tasks_out = tmp_path / "tasks.json"
    assert (
        main(["export", "--table", out, "--run-id", "n2", "--uncertain", "2", "--novel", "2", "--out", str(tasks_out)])
        == 0
    )
    tasks = json.loads(tasks_out.read_text())
    assert len(tasks) == 4 and sum("novelty" in t["data"] for t in tasks) >= 2
    assert main(["export", "--table", out, "--run-id", "n2", "--novel", "0"]) == 2
    assert "error: --novel 0" in capsys.readouterr().err


def test_training_fits_statistics_of_the_final_model() -> None:
    """A trainer's last epoch: statistics from the cached eval-view features when the body never
    trained, from a fresh pass otherwise (the same numbers for the same weights), and the
    predictor built on them scores what the statistics say (one rank, no Ray)."""
    import torch
    from helpers_hardening import Shard, head_only_settings

    from dragons.predictor import Predictor
    from dragons.train.checkpoint import RunState
    from dragons.train.config import TrainConfig
    from dragons.train.trainer import Features, Trainer
    from dragons.train.worker import Worker

    torch.manual_seed(0)
    cfg = TrainConfig(data="x", out="y", image_size=64, batch_size=4, seed=3, **head_only_settings())  # type: ignore[arg-type]
    w = Worker(cfg, ["a", "b"], None, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    train = Shard(
        torch.randint(0, 256, (12, 3, 80, 80), dtype=torch.uint8, generator=g), torch.arange(12) % 2, torch.arange(12)
    )
    valid = Shard(
        torch.randint(0, 256, (8, 3, 80, 80), dtype=torch.uint8, generator=g), torch.arange(8) % 2, torch.arange(8)
    )
    t = Trainer(w, RunState(lr=1e-3), train, valid)
    t.phases = ["head"]
    t.feats = Features(*w.features(train, views=1))  # eval view + one augmented view, as precompute keeps them
    vf, vy = w.features(valid, 0)
    t.feats.valid = (vf, vy.numpy())
    cached = novelty.Novelty.from_meta({"novelty": t.novelty()})
    t.phases, t.feats = ["head", "unfrozen"], None
    fresh = novelty.Novelty.from_meta({"novelty": t.novelty()})
    assert cached is not None and fresh is not None
    assert cached.fitted_on == 12 and cached.threshold_from == "valid"
    np.testing.assert_allclose(cached.proj, fresh.proj, atol=1e-3)  # fp16 cache vs the same fp16 pass
    assert cached.threshold_p95 == pytest.approx(fresh.threshold_p95, rel=1e-3)
    pred = Predictor(w.model, cfg.image_size, w.mean, w.std, torch.device("cpu"), novelty=cached)
    _, nov = pred.numpy_with_novelty(valid.x)  # NCHW uint8, as the shard holds them
    assert nov is not None
    np.testing.assert_allclose(nov, cached.score(vf.float().numpy()), rtol=1e-2)  # fp32 vs the fp16 cache
