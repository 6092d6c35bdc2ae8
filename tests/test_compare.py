"""dragons compare: a challenger against its champion on the same labelled images.

The models are tiny untrained Lite0 artifacts whose predictions are set by hand,
so every figure has a known value: a "constant" model (zero head weights, one
large bias) predicts one class on every image; a "probe" model gets its
BatchNorm statistics from the test images (so its features vary with the image)
and a least-squares head that makes it predict exactly the classes asked for.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragons import storage
from dragons.errors import DragonsError
from dragons.loop.compare import CompareResult, binom_cdf_half, compare, mcnemar_exact
from dragons.loop.comparereport import write

ODD = "bees <&>"  # a class name the page must escape
CLASSES = ("ants", ODD)  # sorted, as the folder's classes come
IMAGE_SIZE = 64


def _image(path: Path, colour: tuple[int, int, int], seed: int) -> str:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (72, 88, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)
    return str(path)


def _meta(classes: tuple[str, ...], temperature: float = 1.0) -> dict:
    from dragons.dataconfig import DataConfig
    from dragons.models.registry import get_spec

    spec = get_spec("efficientnet_lite0")
    data = DataConfig.create(IMAGE_SIZE, 0.875, spec.mean, spec.std)
    return {
        "arch": "efficientnet_lite0",
        "classes": list(classes),
        "data_config": data.to_dict(),
        "metrics": {},
        "temperature": temperature,
    }


def _constant_model(out: Path, classes: tuple[str, ...], predicts: str, temperature: float = 1.0) -> str:
    """Predicts ``predicts`` on every image with raw probability softmax([4, 0, ...])."""
    import torch

    from dragons import artifact
    from dragons.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", len(classes), weights="none").eval()
    head = model.head[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[classes.index(predicts)] = 4.0
    artifact.save(str(out), model, _meta(classes, temperature))
    return str(out)


def _probe_model(out: Path, classes: tuple[str, ...], uris: list[str], predicts: list[str]) -> str:
    """Predicts ``predicts[i]`` on ``uris[i]``: BatchNorm statistics from these images (an
    untrained body's features are otherwise near constant), then a least-squares head."""
    import torch

    from dragons import artifact
    from dragons.dataconfig import DataConfig
    from dragons.images import decode_to_base
    from dragons.models.registry import build_model
    from dragons.preprocess import eval_batch, to_tensor

    torch.manual_seed(0)
    meta = _meta(classes)
    data = DataConfig.from_meta(meta)
    model = build_model("efficientnet_lite0", len(classes), weights="none")
    squares = np.stack([decode_to_base(Path(u).read_bytes(), data.base_size) for u in uris])
    x = eval_batch(to_tensor(squares, torch.device("cpu")), data.image_size, data.mean, data.std)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative: one pass sets the statistics to this batch's
    model.train()
    with torch.no_grad():
        model.body(x)
    model.eval()
    with torch.no_grad():
        feats = model.body(x).double().numpy()
    targets = np.full((len(uris), len(classes)), -3.0)
    targets[np.arange(len(uris)), [classes.index(p) for p in predicts]] = 3.0
    w, *_ = np.linalg.lstsq(np.hstack([feats, np.ones((len(uris), 1))]), targets, rcond=None)
    head = model.head[-1]
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w[:-1].T))
        head.bias.copy_(torch.from_numpy(w[-1]))
    artifact.save(str(out), model, _meta(classes))
    return str(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """valid/: 6 ants + 6 odd-named bees + 1 broken file; A says ants always (T = 2);
    B is right on every bee and on 4 of the 6 ants."""
    root = tmp_path_factory.mktemp("compare")
    data = root / "data"
    colours = {"ants": (200, 60, 40), ODD: (40, 90, 210)}
    valid: dict[str, list[str]] = {
        c: [_image(data / "valid" / c / f"{c[:4]}_{i}.jpg", colours[c], 10 * j + i) for i in range(6)]
        for j, c in enumerate(CLASSES)
    }
    train = [_image(data / "train" / c / f"t{i}.jpg", colours[c], 100 + i) for c in CLASSES for i in range(2)]
    (data / "valid" / "ants" / "broken.jpg").write_bytes(b"not a jpeg at all")
    uris = valid["ants"] + valid[ODD]
    b_predicts = ["ants"] * 4 + [ODD] * 2 + [ODD] * 6
    return {
        "root": root,
        "data": str(data),
        "valid": valid,
        "train": train,
        "a": _constant_model(root / "A", CLASSES, "ants", temperature=2.0),
        "b": _probe_model(root / "B", CLASSES, uris, b_predicts),
        "c": _constant_model(root / "C", CLASSES, ODD),
    }


def test_mcnemar_exact_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mcnemar_exact(0, 10) == pytest.approx(2 * 0.5**10, abs=1e-15)
    assert mcnemar_exact(2, 6) == pytest.approx(2 * (1 + 8 + 28) / 2**8, abs=1e-15)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0  # capped at 1; nothing discordant
    assert mcnemar_exact(7, 3) == mcnemar_exact(3, 7)
    # The log-space sum above the exact-integer limit agrees with the exact one.
    exact = binom_cdf_half(1_450, 3_000)
    assert exact == pytest.approx(sum(math.comb(3_000, i) for i in range(1_451)) / 2**3_000, rel=1e-12)
    monkeypatch.setattr("dragons.loop.compare.EXACT_INTEGER_LIMIT", 100)
    assert binom_cdf_half(1_450, 3_000) == pytest.approx(exact, rel=1e-9)


def test_challenger_beats_champion_on_the_valid_split(setup: dict) -> None:
    out = setup["root"] / "out"
    r = compare(setup["a"], setup["b"], setup["data"], min_gain=0.3)
    write(r, str(out))
    assert r.source == "valid/ split" and r.n == 12  # the train/ images are not compared
    assert [u for u, _ in r.unreadable] == [str(Path(setup["data"]) / "valid" / "ants" / "broken.jpg")]
    assert r.classes == list(CLASSES)
    a, b = r.model_a, r.model_b
    assert (a.correct, b.correct) == (6, 10)
    assert a.accuracy == pytest.approx(0.5) and b.accuracy == pytest.approx(10 / 12)
    assert a.per_class["ants"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 6})
    assert a.per_class[ODD]["precision"] == 0.0 and a.per_class[ODD]["recall"] == 0.0
    assert b.per_class["ants"]["precision"] == 1.0 and b.per_class["ants"]["recall"] == pytest.approx(4 / 6)
    assert b.per_class[ODD]["precision"] == pytest.approx(6 / 8) and b.per_class[ODD]["recall"] == 1.0
    # A's temperature (2) is applied: softmax([4, 0] / 2), the same top-1 confidence on every image.
    p_a = math.exp(2) / (math.exp(2) + 1)
    assert a.ece == pytest.approx(abs(p_a - 0.5), abs=1e-5)
    assert (r.mcnemar.b, r.mcnemar.c, r.mcnemar.both_right, r.mcnemar.both_wrong) == (2, 6, 4, 0)
    assert r.mcnemar.p_value == pytest.approx(74 / 256, abs=1e-12)
    assert r.gain == pytest.approx(4 / 12) and r.beats and r.exit_code == 0
    kinds = sorted(d.kind for d in r.disagreements)
    assert kinds == ["a_right"] * 2 + ["b_right"] * 6
    assert all(d.p_a == pytest.approx(p_a, abs=1e-5) and d.pred_a == "ants" for d in r.disagreements)
    assert any(line.startswith("B beats A") and line.endswith("exit 0") for line in r.lines())

    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_a"]["version"] == a.version and summary["model_b"]["uri"] == b.uri
    assert summary["b"] == {"given": setup["b"], "uri": b.uri, "version": b.version, "accuracy": b.accuracy}
    assert summary["mcnemar"] == {
        "b": 2,
        "c": 6,
        "both_right": 4,
        "both_wrong": 0,
        "n_discordant": 8,
        "p_value": pytest.approx(74 / 256),
    }
    assert (summary["n"], summary["min_gain"], summary["exit_code"], summary["beats"]) == (12, 0.3, 0, True)
    assert summary["data"] == setup["data"] and len(summary["disagreements"]) == 8
    assert summary["model_b"]["per_class"][ODD]["support"] == 6

    page = (out / "index.html").read_text()
    thumbs = sorted(p.name for p in (out / "thumbs").iterdir())
    assert len(thumbs) == 8
    for name in thumbs:
        assert f'src="thumbs/{name}"' in page
    with Image.open(out / "thumbs" / thumbs[0]) as im:
        assert im.size == (160, 160)
    assert "bees &lt;&amp;&gt;" in page and ODD not in page
    assert "B right, A wrong (6)" in page and "A right, B wrong (2)" in page
    assert "b = 2" in page and "c = 6" in page and "p = 0.2891" in page


def test_min_gain_and_max_p_decide_the_exit_code(setup: dict) -> None:
    r = compare(setup["a"], setup["b"], setup["data"])  # gain 1/3, p = 0.289
    assert r.exit_code == 0 and r.min_gain == 0.0 and r.max_p == 1.0
    assert replace(r, min_gain=1 / 3).exit_code == 0  # exactly the gain still beats
    assert replace(r, min_gain=0.34).exit_code == 3
    strict = replace(r, max_p=0.05)
    assert not strict.beats and strict.exit_code == 3 and strict.verdict().endswith("p 0.2891 > max p 0.05")
    back = compare(setup["b"], setup["a"], setup["data"])  # the other way round: a loss
    assert (back.mcnemar.b, back.mcnemar.c) == (6, 2) and back.gain == pytest.approx(-4 / 12)
    assert back.exit_code == 3
    assert "B does not beat A: gain -0.3333 < min gain 0.0000 -> exit 3" in back.lines()
    with pytest.raises(DragonsError, match="--min-gain 2"):
        compare(setup["a"], setup["b"], setup["data"], min_gain=2)
    with pytest.raises(DragonsError, match="--max-p 0"):
        compare(setup["a"], setup["b"], setup["data"], max_p=0)


def test_table_of_uri_label_with_relative_uris_and_unlabelled_rows(setup: dict) -> None:
    """b = 0, c = 8: C (always the odd class) against A on eight of its images."""
    root: Path = setup["root"]
    bees = setup["valid"][ODD] + [u for u in setup["train"] if f"/{ODD}/" in u]
    table = root / "data" / "labels.csv"
    rows = [f'"{Path(u).relative_to(root / "data")}","{ODD}",0.5' for u in bees[:6]]  # relative to the table
    rows += [f'{u},"{ODD}",0.5' for u in bees[6:]]
    rows += [f"{bees[0]},,0.5", f'{bees[1]},"{ODD}",0.5']  # one row nobody labelled; one image twice
    table.write_text("uri,label,score\n" + "\n".join(rows) + "\n")
    r = compare(setup["a"], setup["c"], str(table))
    assert (r.n, r.unlabelled, r.source) == (8, 1, "table (uri,label)")
    assert (r.mcnemar.b, r.mcnemar.c) == (0, 8) and r.mcnemar.p_value == pytest.approx(2 * 0.5**8, abs=1e-15)
    assert r.exit_code == 0 and r.model_b.accuracy == 1.0

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uri": bees[:5] + setup["valid"]["ants"][:5], "label": [ODD] * 10}), root / "ten.parquet")
    r = compare(setup["a"], setup["c"], str(root / "ten.parquet"))
    # C always says the odd class, so the 5 ants labelled so count as right for it: b = 0, c = 10.
    assert (r.mcnemar.b, r.mcnemar.c) == (0, 10) and r.mcnemar.p_value == pytest.approx(2 * 0.5**10, abs=1e-15)


def test_models_with_different_classes_compare_on_the_labels(setup: dict) -> None:
    root: Path = setup["root"]
    three = ("ants", ODD, "wasps")
    d = _constant_model(root / "D", three, "wasps")
    wasps = [_image(root / "wasps" / f"w{i}.jpg", (230, 220, 40), 500 + i) for i in range(2)]
    table = root / "mixed.csv"
    table.write_text(
        "uri,label\n"
        + "".join(f"{u},wasps\n" for u in wasps)
        + "".join(f"{u},ants\n" for u in setup["valid"]["ants"][:2])
    )
    r = compare(setup["a"], d, str(table))
    assert r.classes == list(three) and r.n == 4
    assert (r.model_a.correct, r.model_b.correct) == (2, 2)  # A lacks wasps: wrong on both wasps
    assert r.model_a.per_class["wasps"]["support"] == 2 and r.model_a.per_class["wasps"]["recall"] == 0.0
    assert r.gain == 0 and not r.beats and r.exit_code == 3  # a tie never beats
    assert any("A lacks ['wasps']" in n for n in r.notes)

    table.write_text("uri,label\n" + f"{wasps[0]},moths\n{wasps[1]},wasps\n")
    with pytest.raises(DragonsError, match=r"mixed.csv has label\(s\) \['moths'\] that neither model knows"):
        compare(setup["a"], d, str(table))


def test_bad_data_is_an_error_naming_it(setup: dict, tmp_path: Path) -> None:
    a, b = setup["a"], setup["b"]
    with pytest.raises(DragonsError, match="nowhere does not exist"):
        compare(a, b, str(tmp_path / "nowhere"))
    with pytest.raises(DragonsError, match="nowhere.csv does not exist"):
        compare(a, b, str(tmp_path / "nowhere.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("path,class\nx.jpg,ants\n")
    with pytest.raises(DragonsError, match=r"bad.csv lacks the column\(s\) \['uri', 'label'\]"):
        compare(a, b, str(bad))
    trainonly = tmp_path / "trainonly"
    for c in CLASSES:
        _image(trainonly / "train" / c / "x.jpg", (9, 9, 9), 1)
    with pytest.raises(DragonsError, match="trainonly has train/ but no valid/ folder"):
        compare(a, b, str(trainonly))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DragonsError, match="empty has no images in <class>/ or valid/<class>/ folders"):
        compare(a, b, str(tmp_path / "empty"))
    broken = tmp_path / "broken.csv"
    (tmp_path / "b.jpg").write_bytes(b"nope")
    broken.write_text("uri,label\nb.jpg,ants\n")
    with pytest.raises(DragonsError, match="none of the 1 images in .*broken.csv could be decoded"):
        compare(a, b, str(broken))


def test_bare_class_folders_and_an_s3_report(setup: dict, bucket: str) -> None:
    """Every image of a <class>/ folder (no split); the report written to S3."""
    bare = setup["root"] / "bare"
    for c in CLASSES:
        for i, u in enumerate(setup["valid"][c][:3]):
            (bare / c).mkdir(parents=True, exist_ok=True)
            (bare / c / f"{i}.jpg").write_bytes(Path(u).read_bytes())
    out = f"s3://{bucket}/compare/run1"
    r: CompareResult = compare(setup["a"], setup["c"], str(bare))
    write(r, out)
    assert (r.source, r.n, r.mcnemar.b, r.mcnemar.c) == ("all class folders", 6, 3, 3)
    assert r.report == f"{out}/index.html" and r.exit_code == 3
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert summary["report"] == r.report and summary["mcnemar"]["p_value"] == 1.0
    page = storage.read_bytes(r.report).decode()
    assert page.count('class="card"') == 6 and storage.exists(f"{out}/thumbs/00005.jpg")
