"""Labels back in: Label Studio exports into the Delta labels table, its latest view, and training data from labels."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dragons.data import discover, hash_valid, with_labels
from dragons.errors import DragonsError
from dragons.loop.labels import (
    disagreements,
    import_labels,
    latest,
    read_export,
    training_labels,
)

IMG = "s3://photos/img"


def _ann(
    aid: int, who: int, choice: str | list[str], created: str, updated: str | None = None, cancelled: bool = False
) -> dict:
    """One annotation exactly as Label Studio's JSON export writes it."""
    choices = choice if isinstance(choice, list) else [choice]
    return {
        "id": aid,
        "completed_by": who,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "lead_time": 3.2,
        "created_at": created,
        "updated_at": updated or created,
        "task": aid // 10,
        "origin": "manual",
        "parent_prediction": None,
        "parent_annotation": None,
        "result": []
        if cancelled
        else [
            {
                "id": f"r{aid}",
                "type": "choices",
                "from_name": "label",
                "to_name": "image",
                "origin": "manual",
                "value": {"choices": choices},
            }
        ],
    }


def _task(tid: int, annotations: list[dict]) -> dict:
    return {
        "id": tid,
        "data": {"image": f"{IMG}/{tid}.jpg", "label": "ants", "score": 0.51},
        "annotations": annotations,
        "predictions": [],
        "drafts": [],
        "meta": {},
        "created_at": "2024-01-01T09:00:00.000000Z",
        "updated_at": "2024-01-09T09:00:00.000000Z",
        "inner_id": tid,
        "total_annotations": len(annotations),
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": 3,
        "updated_by": 1,
        "comment_authors": [],
        "file_upload": None,
    }


def export_json(update_task4: bool = False) -> list[dict]:
    """Task 1: two annotators disagree (the later says bees); task 2: a cancelled skip, then bees;
    task 3: nobody annotated it; task 4: ants, later (in a newer export) changed to bees."""
    ann4 = (
        _ann(41, 1, "bees", "2024-01-01T10:00:00.000000Z", "2024-02-01T08:00:00.000000Z")
        if update_task4
        else _ann(41, 1, "ants", "2024-01-01T10:00:00.000000Z", "2024-01-05T10:00:00.000000Z")
    )
    return [
        _task(
            1, [_ann(11, 1, "ants", "2024-01-01T10:00:00.000000Z"), _ann(12, 2, "bees", "2024-01-02T10:00:00.000000Z")]
        ),
        _task(
            2,
            [
                _ann(21, 1, [], "2024-01-01T11:00:00.000000Z", cancelled=True),
                _ann(22, 1, "bees", "2024-01-01T12:00:00.000000Z"),
            ],
        ),
        _task(3, []),
        _task(4, [ann4]),
    ]


# Label Studio's JSON_MIN: one flat record per annotation, the task's data copied in; a bare string for one choice.
JSON_MIN = [
    {
        "image": f"{IMG}/5.jpg",
        "id": 5,
        "label": "ants",
        "annotator": 1,
        "annotation_id": 51,
        "created_at": "2024-03-01T10:00:00.000000Z",
        "updated_at": "2024-03-01T10:00:00.000000Z",
        "lead_time": 2.0,
    },
    {
        "image": f"{IMG}/5.jpg",
        "id": 5,
        "label": {"choices": ["bees"]},
        "annotator": 1,
        "annotation_id": 52,
        "created_at": "2024-03-02T10:00:00.000000Z",
        "updated_at": "2024-03-02T10:00:00.000000Z",
        "lead_time": 2.0,
    },
    {
        "image": f"{IMG}/6.jpg",
        "id": 6,
        "label": "ants",
        "annotator": 3,
        "annotation_id": 61,
        "created_at": "2024-03-01T10:00:00.000000Z",
        "updated_at": "2024-03-04T10:00:00.000000Z",
        "lead_time": 1.0,
    },
    {"image": f"{IMG}/7.jpg", "id": 7},  # a task without annotations
]


def _write(path: Path, doc: object) -> str:
    path.write_text(json.dumps(doc, indent=1))
    return str(path)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _log_entries(table: Path) -> int:
    return len(list((table / "_delta_log").glob("*.json")))


def test_json_export_rows(tmp_path: Path) -> None:
    ex = read_export(_write(tmp_path / "export.json", export_json()))
    assert (ex.format, ex.control, ex.cancelled, ex.unlabelled) == ("json", "label", 1, 1)
    rows = ex.table.to_pylist()
    got = [(r["uri"].rsplit("/", 1)[-1], r["label"], r["annotator"], r["task_id"], r["annotation_id"]) for r in rows]
    assert got == [
        ("1.jpg", "ants", "1", 1, 11),
        ("1.jpg", "bees", "2", 1, 12),
        ("2.jpg", "bees", "1", 2, 22),
        ("4.jpg", "ants", "1", 4, 41),
    ]
    assert rows[3]["annotated_at"] == _utc("2024-01-05T10:00:00")  # updated_at, not created_at


def test_json_min_rows_and_control(tmp_path: Path) -> None:
    ex = read_export(_write(tmp_path / "min.json", JSON_MIN))
    assert (ex.format, ex.control, ex.unlabelled) == ("json_min", "label", 1)
    assert [(r["uri"], r["label"], r["annotator"], r["task_id"], r["annotation_id"]) for r in ex.table.to_pylist()] == [
        (f"{IMG}/5.jpg", "ants", "1", 5, 51),
        (f"{IMG}/5.jpg", "bees", "1", 5, 52),
        (f"{IMG}/6.jpg", "ants", "3", 6, 61),
    ]
    # A control named otherwise, with another text column beside it: --control says which.
    renamed = [
        {("species" if k == "label" else k): v for k, v in r.items()} | {"note": "x"}
        for r in (JSON_MIN[0], JSON_MIN[2])
    ]
    with pytest.raises(DragonsError, match="--control"):
        read_export(_write(tmp_path / "min2.json", renamed))
    assert read_export(str(tmp_path / "min2.json"), control="species").table.column("label").to_pylist() == [
        "ants",
        "ants",
    ]
    # A {"choices": [...]} answer names its column by itself.
    one = [{"img": "s3://p/1.jpg", "id": 1, "annotation_id": 1, "note": "x", "species": {"choices": ["bees"]}}]
    assert read_export(_write(tmp_path / "min3.json", one)).control == "species"


def test_multi_choice_and_bad_control_refused(tmp_path: Path) -> None:
    doc = export_json() + [_task(9, [_ann(91, 1, ["ants", "bees"], "2024-01-01T10:00:00Z")])]
    with pytest.raises(DragonsError, match=r"task 9 has several choices \['ants', 'bees'\]"):
        read_export(_write(tmp_path / "multi.json", doc))
    with pytest.raises(DragonsError, match=r"no Choices control named 'kind'.*\['label'\]"):
        read_export(_write(tmp_path / "ok.json", export_json()), control="kind")
    with pytest.raises(DragonsError, match="task 6 has several choices"):
        read_export(_write(tmp_path / "multi_min.json", [JSON_MIN[2] | {"label": {"choices": ["ants", "bees"]}}]))


def test_plain_csv_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text(
        f"uri,label,annotator,annotated_at\n{IMG}/a.jpg,ants,ann,2024-05-01T00:00:00Z\n{IMG}/b.jpg,bees,,\n"
    )
    pq.write_table(
        pa.table({"uri": [f"{IMG}/a.jpg", f"{IMG}/b.jpg"], "label": ["ants", "bees"]}), tmp_path / "l.parquet"
    )
    csv_ex, pq_ex = read_export(str(tmp_path / "l.csv")), read_export(str(tmp_path / "l.parquet"))
    assert (csv_ex.format, pq_ex.format) == ("csv", "parquet")
    assert csv_ex.table.to_pylist()[0] == {
        "uri": f"{IMG}/a.jpg",
        "label": "ants",
        "annotator": "ann",
        "annotated_at": _utc("2024-05-01T00:00:00"),
        "task_id": None,
        "annotation_id": None,
    }
    assert csv_ex.table.column("label").to_pylist() == pq_ex.table.column("label").to_pylist() == ["ants", "bees"]
    (tmp_path / "bad.csv").write_text("path,class\nx.jpg,ants\n")
    with pytest.raises(DragonsError, match="cannot tell which column"):  # read as Label Studio's CSV: neither fits
        read_export(str(tmp_path / "bad.csv"))
    pq.write_table(pa.table({"path": ["x.jpg"], "class": ["ants"]}), tmp_path / "bad.parquet")
    with pytest.raises(DragonsError, match="expected the columns uri,label"):
        read_export(str(tmp_path / "bad.parquet"))


def test_import_latest_and_reimport_is_a_no_op(tmp_path: Path) -> None:
    from deltalake import DeltaTable

    table = tmp_path / "labels"
    src = _write(tmp_path / "export.json", export_json())
    first = import_labels(str(table), src, known_classes=["ants", "bees"])
    assert (first.rows, first.added, first.already_present) == (4, 4, 0)
    assert (first.skipped_cancelled, first.unlabelled) == (1, 1)
    assert (first.classes, first.version) == (["ants", "bees"], 0)
    stored = DeltaTable(str(table)).to_pyarrow_table().to_pylist()
    assert {r["source"] for r in stored} == {src} and all(len(r["source_sha256"]) == 64 for r in stored)
    entries = _log_entries(table)
    again = import_labels(str(table), src, known_classes=["ants", "bees"])
    assert (again.added, again.already_present, again.version) == (0, 4, 0)
    assert _log_entries(table) == entries and DeltaTable(str(table)).version() == 0  # no commit at all

    view = {r["uri"].rsplit("/", 1)[-1]: r for r in latest(str(table)).to_pylist()}
    assert {k: v["label"] for k, v in view.items()} == {"1.jpg": "bees", "2.jpg": "bees", "4.jpg": "ants"}
    assert (view["1.jpg"]["annotator"], view["1.jpg"]["annotators"], view["1.jpg"]["disagree"]) == ("2", 2, True)
    assert disagreements(latest(str(table))) == 1

    # A newer export of the same tasks: only task 4's updated annotation is new, and it wins.
    newer = import_labels(str(table), _write(tmp_path / "export2.json", export_json(update_task4=True)))
    assert (newer.rows, newer.added, newer.already_present, newer.version) == (4, 1, 3, 1)
    view = {r["uri"].rsplit("/", 1)[-1]: r for r in latest(str(table)).to_pylist()}
    assert view["4.jpg"]["label"] == "bees" and view["4.jpg"]["annotated_at"] == _utc("2024-02-01T08:00:00")
    assert (view["4.jpg"]["annotators"], view["4.jpg"]["disagree"]) == (1, False)  # one annotator changed their mind

    # The same annotations exported as JSON_MIN are the same rows: nothing to add.
    as_min = [
        {
            "image": t["data"]["image"],
            "id": t["id"],
            "label": a["result"][0]["value"]["choices"][0],
            "annotator": a["completed_by"],
            "annotation_id": a["id"],
            "created_at": a["created_at"],
            "updated_at": a["updated_at"],
            "lead_time": a["lead_time"],
        }
        for t in export_json(update_task4=True)
        for a in t["annotations"]
        if not a["was_cancelled"]
    ]
    assert import_labels(str(table), _write(tmp_path / "same.json", as_min)).added == 0

    # JSON_MIN into the same table: one annotator's later annotation (52) wins over their earlier one.
    import_labels(str(table), _write(tmp_path / "min.json", JSON_MIN))
    view = {r["uri"].rsplit("/", 1)[-1]: r["label"] for r in latest(str(table)).to_pylist()}
    assert (view["5.jpg"], view["6.jpg"], "7.jpg" in view) == ("bees", "ants", False)


def test_unknown_labels_refused_unless_new_class(tmp_path: Path) -> None:
    table, src = str(tmp_path / "labels"), _write(tmp_path / "export.json", export_json())
    with pytest.raises(
        DragonsError, match=r"not known classes: \['bees'\]; the known classes are \['ants'\].*--new-class"
    ):
        import_labels(table, src, known_classes=["ants"])
    assert not (tmp_path / "labels").exists()  # refused before anything was written
    res = import_labels(table, src, known_classes=["ants"], new_class=True)
    assert (res.added, res.new_classes) == (4, ["bees"])
    # Admitted once, a class is known: the same labels again need no --new-class.
    assert import_labels(table, _write(tmp_path / "e2.json", export_json(True)), known_classes=["ants"]).added == 1


def test_plain_csv_reimport_and_newer_statement(tmp_path: Path) -> None:
    table = tmp_path / "labels"
    (tmp_path / "a.csv").write_text(f"uri,label\n{IMG}/x.jpg,ants\n{IMG}/y.jpg,bees\n")
    (tmp_path / "b.csv").write_text(f"uri,label\n{IMG}/x.jpg,bees\n")
    (tmp_path / "c.csv").write_text(f"uri,label\n{IMG}/x.jpg,ants\n")  # back to ants: a new statement, not a repeat
    assert import_labels(str(table), str(tmp_path / "a.csv")).added == 2
    assert import_labels(str(table), str(tmp_path / "a.csv")).added == 0
    assert import_labels(str(table), str(tmp_path / "b.csv")).added == 1
    assert dict(zip(*latest(str(table)).select(["uri", "label"]).to_pydict().values()))[f"{IMG}/x.jpg"] == "bees"
    assert import_labels(str(table), str(tmp_path / "c.csv")).added == 1
    assert dict(zip(*latest(str(table)).select(["uri", "label"]).to_pydict().values()))[f"{IMG}/x.jpg"] == "ants"


def test_labels_table_on_s3(bucket: str, tmp_path: Path) -> None:
    from dragons import storage

    src = f"s3://{bucket}/exports/labels-{random.randrange(10**9)}.json"
    storage.write_bytes(src, json.dumps(export_json()).encode())
    table = f"s3://{bucket}/labels-{random.randrange(10**9)}"
    assert import_labels(table, src).added == 4
    assert import_labels(table, src).version == 0
    assert training_labels(table).to_pydict() == {
        "uri": [f"{IMG}/1.jpg", f"{IMG}/2.jpg", f"{IMG}/4.jpg"],
        "label": ["bees", "bees", "ants"],
        "split": [None, None, None],
    }


# ---------------------------------------------------------------- training data from labels


def _folder(root: Path) -> Path:
    for rel in (
        "train/ants/a1.jpg",
        "train/ants/a2.jpg",
        "train/ants/a3.jpg",
        "train/bees/b1.jpg",
        "train/bees/b2.jpg",
        "valid/ants/va.jpg",
        "valid/bees/vb.jpg",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    return root


def test_training_set_from_folder_and_labels(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    added = [(f"s3://photos/new/w{i:03d}.jpg", "wasps" if i % 2 else "bees", None) for i in range(100)]
    rows = [
        (str(root / "train/ants/a1.jpg"), "bees", None),
        (str(root / "valid/bees/vb.jpg"), "bees", None),
        ("s3://photos/new/fixed.jpg", "ants", "valid"),
        *added,
    ]
    base = discover(str(root))
    f = with_labels(base, rows, 0.2, "labels.csv")
    assert f.classes == ["ants", "bees", "wasps"]
    label = {s.uri: f.classes[s.label] for s in f.train + f.valid}
    assert label[str(root / "train/ants/a1.jpg")] == "bees" and label[str(root / "train/ants/a2.jpg")] == "ants"
    assert str(root / "train/ants/a1.jpg") in {s.uri for s in f.train}  # relabelled, still on its folder's side
    assert "s3://photos/new/fixed.jpg" in {s.uri for s in f.valid}  # an explicit split is kept
    assert {k: f.labels[k] for k in ("overridden", "confirmed", "added", "new_classes")} == {
        "overridden": 1,
        "confirmed": 1,
        "added": 101,
        "new_classes": ["wasps"],
    }
    n_valid = sum(hash_valid(u, 0.2) for u, _, _ in added)
    assert f.labels["added_valid"] == n_valid + 1 and 8 < n_valid < 35 and f.split == "folder+labels+hash:0.2"
    assert {s.uri for s in f.valid} >= {u for u, _, _ in added if hash_valid(u, 0.2)}

    # Order-free and stable: shuffled rows give the same sets, in the same order.
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    g = with_labels(discover(str(root)), shuffled, 0.2, "labels.csv")
    assert [(s.uri, s.label) for s in g.train] == [(s.uri, s.label) for s in f.train]
    assert [(s.uri, s.label) for s in g.valid] == [(s.uri, s.label) for s in f.valid]


def test_discover_with_labels_file_alone_and_with_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    uris = [f"s3://photos/x/{i}.jpg" for i in range(60)]
    lines = [f"{u},{'cats' if i % 2 else 'dogs'}" for i, u in enumerate(uris)]
    (tmp_path / "l.csv").write_text("uri,label\n" + "\n".join(lines) + "\n")
    (tmp_path / "r.csv").write_text("uri,label\n" + "\n".join(reversed(lines)) + "\n")
    alone = discover("", 0.25, labels=str(tmp_path / "l.csv"))
    again = discover("", 0.25, labels=str(tmp_path / "r.csv"))
    assert alone.classes == ["cats", "dogs"] and alone.split == "hash:0.25"
    expected = sorted(u for u in uris if hash_valid(u, 0.25))
    assert [s.uri for s in alone.valid] == [s.uri for s in again.valid] == expected
    both = discover(str(root), labels=str(tmp_path / "l.csv"))
    assert both.classes == ["ants", "bees", "cats", "dogs"] and both.labels["added"] == 60
    assert len(both.train) + len(both.valid) == 7 + 60

    # From a labels table: its latest view, the same hash split.
    import_labels(str(tmp_path / "table"), str(tmp_path / "l.csv"))
    from_table = discover("", 0.25, labels=str(tmp_path / "table"))
    assert [s.uri for s in from_table.valid] == [s.uri for s in alone.valid]


def test_training_labels_refusals(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    with pytest.raises(DragonsError, match=r"classes \['wasps'\] have no training image"):
        with_labels(discover(str(root)), [("s3://p/w.jpg", "wasps", "valid")], 0.2, "l.csv")
    with pytest.raises(DragonsError, match="give --data .* or --labels"):
        discover("", 0.2)
    (tmp_path / "s.csv").write_text("uri,label,split\ns3://p/a.jpg,ants,test\n")
    with pytest.raises(DragonsError, match="split 'test' is not one of train, valid"):
        discover("", labels=str(tmp_path / "s.csv"))


def test_train_flags_take_labels_without_data() -> None:
    from dragons.cli import get_train_parser
    from dragons.train.config import TrainConfig

    args = get_train_parser().parse_args(["--labels", "s3://b/labels", "--out", "/tmp/m"])
    assert (args.labels, args.data) == ("s3://b/labels", "")
    with pytest.raises(DragonsError, match="--data or --labels is required"):
        TrainConfig(out="/tmp/m").validate()
