"""The Delta scores table without Ray or a model: commits, concurrent writers,
crashes, queries (views, time travel, sandbox, limits), maintenance, other engines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from dragons.columns import check_classes, prob_column
from dragons.errors import DragonsError
from dragons.score.query import run_sql
from dragons.score.table import RunWriter, open_table, run_history

REPO = Path(__file__).resolve().parents[1]
WRITER = str(REPO / "tests" / "_table_writer.py")
sys.path.insert(0, str(REPO / "tests"))
from _table_writer import rows  # noqa: E402


def _count(table: str, where: str = "true") -> int:
    return int(run_sql(table, f"SELECT count(*) AS n FROM scores WHERE {where}").to_pylist()[0]["n"])


def _commit(table: str, run_id: str, n: int, start: int = 0, replace: bool = False, **kw: object) -> dict:
    w = RunWriter(
        table, run_id, datetime.now(timezone.utc), ["ants", "bees"], model_version="v1", replace=replace, **kw
    )
    t = rows(run_id, n, start).drop_columns(["model_version", "run_id", "scored_at", "dt"])
    w.add(t)
    return w.commit({"listed": n, "skipped": 0, "model_version": "v1", "input": "test"})


def _writer(
    table: str, run_id: str, n: int, delay: float, file_bytes: int | None = None, commit_every: int = 0
) -> subprocess.Popen[str]:
    args = [sys.executable, WRITER, table, run_id, str(n), str(delay), str(file_bytes or 0), str(commit_every)]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(), cwd=REPO
    )


def test_prob_column_collisions_are_refused() -> None:
    assert prob_column("a-b") == prob_column("a_b") == "p_a_b"
    for classes in (["a-b", "a_b"], ["Ants", "ants"], ["x y", "x.y", "z"]):
        with pytest.raises(DragonsError, match="both map to the table column"):
            check_classes(classes)
    check_classes(["ants", "bees", "a-b"])  # distinct columns pass
    with pytest.raises(DragonsError, match="both map"):
        RunWriter("/tmp/never-written", "r", datetime.now(timezone.utc), ["a-b", "a_b"])


def test_train_refuses_colliding_classes_before_training(tmp_path: Path) -> None:
    from PIL import Image

    from dragons.train.config import TrainConfig
    from dragons.train.run import train

    for split in ("train", "valid"):
        for cls in ("a-b", "a_b"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(d / f"{i}.jpg")
    t0 = time.perf_counter()
    with pytest.raises(DragonsError, match="'a-b' and 'a_b' both map to the table column 'p_a_b'"):
        train(TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "model"), workers=1))
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "model").exists()


def test_score_refuses_colliding_artifact_and_missing_output_bucket_before_reading(
    s3: object, bucket: str, tmp_path: Path
) -> None:
    """Both checks happen before listing or reading any image (the input does not even exist)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"classes": ["a-b", "a_b"], "version": "v0", "arch": "x"}))
    cmd = [
        sys.executable,
        "-m",
        "dragons.cli",
        "score",
        "--model",
        str(model),
        "--input",
        f"s3://{bucket}/no/such/input",
        "--log-file",
        str(tmp_path / "s.log"),
    ]
    p = subprocess.run(cmd + ["--output", str(tmp_path / "t")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error:" in p.stderr and "p_a_b" in p.stderr and "Traceback" not in p.stderr, p.stderr
    (model / "model.json").write_text(json.dumps({"classes": ["ants", "bees"], "version": "v0", "arch": "x"}))
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd + ["--output", "s3://no-such-bucket-dragons/tables/t"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "error: --output s3://no-such-bucket-dragons/tables/t " in p.stderr
    assert "bucket 'no-such-bucket-dragons' does not exist" in p.stderr
    assert "no/such/input" not in p.stderr  # failed on the output, before the input was even listed
    assert time.perf_counter() - t0 < 60


def test_parts_replace_history_and_time_travel(tmp_path: Path) -> None:
    table = str(tmp_path / "t")
    m1 = _commit(table, "night1", 30)  # version 0 creates the table
    m2 = _commit(table, "night2", 20)
    assert (m1["version"], m2["version"]) == (1, 2)
    m3 = _commit(table, "night1", 12, start=100, replace=True)  # --replace: delete night1's rows, then its new ones
    assert m3["version"] == 4
    assert _count(table) == 32 and _count(table, "run_id = 'night1'") == 12
    assert _count(table, "uri LIKE '%/100.jpg'") == 1 and _count(table, "uri LIKE '%/0.jpg' AND run_id = 'night1'") == 0
    hist = run_history(table)
    assert [h["version"] for h in hist] == [4, 3, 2, 1, 0]
    assert [h["status"] for h in hist] == ["complete", "replaced", "complete", "complete", "created"]
    assert (
        hist[0]["run_id"] == "night1"
        and hist[0]["listed"] == 12
        and hist[0]["rows"] == 12
        and hist[1]["files_removed"] >= 1
    )
    # Time travel: as of version 1 night1 still had its 30 rows.
    assert (
        int(run_sql(table, "SELECT count(*) AS n FROM scores WHERE run_id = 'night1'", as_of="1").to_pylist()[0]["n"])
        == 30
    )
    ts = datetime.now(timezone.utc).isoformat()
    assert _count(table) == int(run_sql(table, "SELECT count(*) AS n FROM scores", as_of=ts).to_pylist()[0]["n"])
    with pytest.raises(DragonsError, match="--as-of 99: no such table version"):
        run_sql(table, "SELECT 1", as_of="99")
    # The default query is one line per run; `commits` has one per commit.
    summary = run_sql(table).to_pylist()
    assert [(r["run_id"], r["status"], r["parts"], r["rows"], r["listed"]) for r in summary] == [
        ("night1", "complete", 1, 12, 12),
        ("night2", "complete", 1, 20, 20),
    ]
    assert [r["version"] for r in run_sql(table, "SELECT version FROM commits ORDER BY version").to_pylist()] == [
        0,
        1,
        2,
        3,
        4,
    ]
    # A NaN probability (an error row) is NULL in the table.
    w = RunWriter(table, "nan", datetime.now(timezone.utc), ["ants", "bees"], model_version="v1")
    w.add(
        pa.table(
            {
                "uri": ["s3://x/bad.jpg"],
                "label": [None],
                "score": [float("nan")],
                "p_ants": [float("nan")],
                "p_bees": [float("nan")],
                "error": ["truncated: x"],
            }
        )
    )
    w.commit({"listed": 1})
    r = run_sql(table, "SELECT score, p_ants, error FROM scores WHERE run_id = 'nan'").to_pylist()
    assert r == [{"score": None, "p_ants": None, "error": "truncated: x"}]


def test_parts_resume_date_and_run_status(tmp_path: Path) -> None:
    """A run committed in parts: a second writer of the id continues it (same part
    numbering, same dt); the runs view says running / partial / failed / complete."""
    from dragons.score.table import app_id, runs_summary

    table = str(tmp_path / "t")
    started = datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)
    w = RunWriter(
        table,
        "n",
        started,
        ["ants", "bees"],
        model_version="v1",
        commit_every=10,
        date="2026-11-29",
        commit_interval_s=300,
    )
    assert w.begin().part == 0
    batch = rows("n", 25).drop_columns(["model_version", "run_id", "scored_at", "dt"])
    committed = [w.add(batch.slice(i, 5)) for i in range(0, 25, 5)]
    assert committed == [False, True, False, True, False] and w.part == 2 and w.rows == 20
    # Parts just committed, another due within 3 intervals: running.
    assert [(r["status"], r["parts"], r["rows"]) for r in runs_summary(run_history(table))] == [("running", 2, 20)]
    # ... and long after: partial (killed; run it again to continue).
    later = datetime.now(timezone.utc).replace(year=2027)
    assert runs_summary(run_history(table), now=later)[0]["status"] == "partial"
    w.discard()  # the writer "dies" with 5 rows uncommitted
    assert _count(table) == 20 and set(
        r["dt"] for r in run_sql(table, "SELECT DISTINCT dt FROM scores").to_pylist()
    ) == {"2026-11-29"}
    # The next attempt, days later and without --date: the night's date and part numbers carry on.
    w2 = RunWriter(table, "n", datetime.now(timezone.utc), ["ants", "bees"], model_version="v1")
    state = w2.begin()
    assert (state.part, state.rows, state.date, w2.dt) == (2, 20, "2026-11-29", "2026-11-29")
    w2.add(batch.slice(20, 5))
    m = w2.finish({"listed": 25})
    assert (m["dragons_part"], m["rows"], m["dt"]) == (3, 25, "2026-11-29")
    assert open_table(table).transaction_version(app_id("n")) == 3
    assert [(r["status"], r["parts"], r["rows"], r["dt"]) for r in runs_summary(run_history(table))] == [
        ("complete", 3, 25, "2026-11-29")
    ]
    # A --date that would split the night is refused; with --replace it rescores under the new date.
    with pytest.raises(DragonsError, match="already holds rows dated 2026-11-29"):
        RunWriter(table, "n", started, ["ants", "bees"], date="2026-11-30").begin()
    w3 = RunWriter(table, "n", started, ["ants", "bees"], date="2026-11-30", replace=True)
    w3.begin()
    w3.add(batch.slice(0, 3))
    w3.finish()
    assert run_sql(table, "SELECT dt, count(*) AS n FROM scores GROUP BY 1").to_pylist() == [
        {"dt": "2026-11-30", "n": 3}
    ]
    # A failure after a part is recorded, without the uncommitted rows.
    w4 = RunWriter(table, "f", started, ["ants", "bees"], model_version="v1", commit_every=2)
    w4.add(batch.slice(0, 3))
    w4.fail("RuntimeError: boom")
    runs = {r["run_id"]: r for r in run_sql(table, "SELECT * FROM runs").to_pylist()}
    assert (runs["f"]["status"], runs["f"]["rows"], runs["n"]["status"], runs["n"]["parts"]) == (
        "failed",
        2,
        "complete",
        1,
    )
    assert "boom" in runs["f"]["failure"] and _count(table, "run_id = 'f'") == 2
    # A second writer of a running night that fails before committing anything
    # writes no marker: the first one's next part still commits.
    a = RunWriter(table, "g", started, ["ants", "bees"], model_version="v1", commit_every=2)
    a.add(batch.slice(0, 3))  # part 1 committed, 1 row pending
    b = RunWriter(table, "g", started, ["ants", "bees"], model_version="v1")
    assert b.begin().part == 1
    b.fail("KeyboardInterrupt")
    a.add(batch.slice(3, 1))
    assert a.finish()["rows"] == 4 and _count(table, "run_id = 'g'") == 4


def test_parts_commit_on_the_committer_thread_in_order_and_a_fenced_part_surfaces(tmp_path: Path) -> None:
    """The pipeline's writer (background=True): parts commit off the caller's loop, in
    order, with the same numbering and counts as inline commits; a part the committer
    cannot commit (another writer of the id got there first) fails the caller's next call."""
    from dragons.score.table import app_id, runs_summary

    table = str(tmp_path / "t")
    seen: list[tuple[int, int]] = []
    w = RunWriter(
        table,
        "bg",
        datetime.now(timezone.utc),
        ["ants", "bees"],
        model_version="v1",
        commit_every=10,
        background=True,
        on_commit=lambda part, n: seen.append((part, n)),
    )
    w.begin()
    batch = rows("bg", 45).drop_columns(["model_version", "run_id", "scored_at", "dt"])
    for i in range(0, 45, 5):
        w.add(batch.slice(i, 5))
    m = w.finish({"listed": 45})
    assert seen == [(1, 10), (2, 20), (3, 30), (4, 40)]  # every part, in order, before the final one
    assert (m["dragons_part"], m["rows"], m["dragons_status"]) == (5, 45, "complete")
    assert _count(table, "run_id = 'bg'") == 45 and open_table(table).transaction_version(app_id("bg")) == 5
    assert [(r["status"], r["parts"], r["rows"]) for r in runs_summary(run_history(table))] == [("complete", 5, 45)]
    # Two writers of one id: the second commits first, so the first's queued part is fenced.
    a = RunWriter(
        table, "race", datetime.now(timezone.utc), ["ants", "bees"], model_version="v1", commit_every=5, background=True
    )
    a.begin()
    b = RunWriter(table, "race", datetime.now(timezone.utc), ["ants", "bees"], model_version="v1")
    b.begin()
    b.add(batch.slice(0, 3))
    b.finish()
    a.add(batch.slice(0, 5))  # a part handed to the committer, which a's stale handle cannot commit
    with pytest.raises(DragonsError, match="another writer committed to this run id"):
        a.add(batch.slice(5, 5))
        a.finish()
    assert _count(table, "run_id = 'race'") == 3


def _night(
    table: str, run_id: str = "night", every: int = 5, classes: tuple[str, ...] = ("ants", "bees"), **kw: object
) -> RunWriter:
    w = RunWriter(
        table, run_id, datetime.now(timezone.utc), list(classes), model_version="v1", commit_every=every, **kw
    )
    w.begin()
    return w


@pytest.mark.parametrize("change", ["schema", "append", "optimize", "delete_other", "protocol", "delete_ours", "rival"])
def test_each_conflict_kind_gets_its_own_behaviour(tmp_path: Path, change: str) -> None:
    """A running night (part 1 committed) meets a real second writer's commit before its part 2:
    a schema change (a backfill whose model adds a class), an append, optimize or a delete of
    other rows are retried on a fresh snapshot and the night ends complete; a protocol upgrade,
    a delete of the night's own rows, or another writer of its run id are named errors."""
    table = str(tmp_path / "t")
    batch = rows("night", 10).drop_columns(["model_version", "run_id", "scored_at", "dt"])
    night = _night(table)
    night.add(batch.slice(0, 5))  # part 1
    if change == "schema":
        other = _night(table, "backfill", 0, ("ants", "bees", "wasps"))
        other.add(batch.slice(0, 2).append_column("p_wasps", pa.array([0.1, 0.2])))
        other.finish()
    elif change in ("append", "optimize", "delete_other"):
        _commit(table, "other", 4)
        if change == "optimize":
            open_table(table).optimize.compact()
        if change == "delete_other":
            open_table(table).delete("run_id = 'other'")
    elif change == "protocol":
        open_table(table).alter.set_table_properties({"delta.minWriterVersion": "4"})
    elif change == "delete_ours":
        open_table(table).delete("run_id = 'night'")
    elif change == "rival":
        rival = _night(table, "night", 0)
        rival.add(batch.slice(5, 2))
        rival.finish()
    expected = {
        "protocol": "changed its Delta protocol",
        "delete_ours": "rows of this run were deleted",
        "rival": "another writer committed to this run id",
    }
    if change in expected:
        with pytest.raises(DragonsError, match=expected[change]):
            night.add(batch.slice(5, 5))
        return
    night.add(batch.slice(5, 5))  # part 2, on a fresh snapshot
    m = night.finish({"listed": 10})
    assert (m["dragons_part"], m["rows"], m["dragons_status"]) == (3, 10, "complete")
    assert _count(table, "run_id = 'night'") == 10


def test_a_failure_marker_that_conflicts_is_retried(tmp_path: Path) -> None:
    """The run's failed marker meets a schema change: retried, so the run never stays 'running'."""
    table = str(tmp_path / "t")
    batch = rows("night", 10).drop_columns(["model_version", "run_id", "scored_at", "dt"])
    night = _night(table)
    night.add(batch.slice(0, 5))
    other = _night(table, "backfill", 0, ("ants", "bees", "wasps"))
    other.add(batch.slice(0, 2).append_column("p_wasps", pa.array([0.1, 0.2])))
    other.finish()
    night.fail("RuntimeError: the actors died")
    runs = {r["run_id"]: r for r in run_sql(table, "SELECT * FROM runs").to_pylist()}
    assert runs["night"]["status"] == "failed" and "actors died" in runs["night"]["failure"]


def test_a_run_id_is_bound_to_its_model_input_and_row_options(tmp_path: Path) -> None:
    """Continuing a run id with another model, input or --max-bytes is refused naming both
    sides, the table unchanged; --replace rescores it; the same binding continues it."""
    table = str(tmp_path / "t")
    bound = {
        "model_version": "aaa111",
        "classes": ["ants", "bees"],
        "input": "s3://b/night",
        "max_bytes": 1000,
        "max_pixels": 10,
        "tta": 0,
    }
    batch = rows("night", 10).drop_columns(["model_version", "run_id", "scored_at", "dt"])
    first = _night(table, binding=bound)
    first.add(batch.slice(0, 5))
    first.discard()  # killed after part 1
    version = open_table(table).version()
    for key, other in (("model_version", "bbb222"), ("input", "s3://b/other"), ("max_bytes", 2000)):
        with pytest.raises(DragonsError, match=rf"{key}: the run has .*, this command .*--replace.*--run-id"):
            _night(table, binding={**bound, key: other})
        assert open_table(table).version() == version and _count(table) == 5
    again = _night(table, binding=bound)  # the same command continues it
    again.add(batch.slice(5, 5))
    assert again.finish()["rows"] == 10
    replaced = _night(table, binding={**bound, "model_version": "bbb222"}, replace=True)
    replaced.add(batch.slice(0, 3))
    assert replaced.finish()["rows"] == 3
    runs = run_sql(table, "SELECT status, rows FROM runs").to_pylist()
    assert runs == [{"status": "complete", "rows": 3}]
    assert json.loads([h for h in open_table(table).history(1)][0]["binding"])["model_version"] == "bbb222"


def test_latest_view_one_row_per_uri_and_model_version(tmp_path: Path) -> None:
    table = str(tmp_path / "t")
    _commit(table, "a", 10)
    _commit(table, "b", 10)  # other uris (uri includes the run id)
    w = RunWriter(table, "c", datetime.now(timezone.utc), ["ants", "bees"], model_version="v2")
    w.add(rows("a", 5).drop_columns(["model_version", "run_id", "scored_at", "dt"]))  # a's first 5 uris, new model
    w.commit({})
    w = RunWriter(table, "d", datetime.now(timezone.utc), ["ants", "bees"], model_version="v1")
    w.add(rows("a", 3).drop_columns(["model_version", "run_id", "scored_at", "dt"]))  # a's first 3 again, same model
    w.commit({})
    assert _count(table) == 28
    latest = run_sql(
        table, "SELECT run_id, model_version, count(*) AS n FROM latest GROUP BY ALL ORDER BY ALL"
    ).to_pylist()
    assert latest == [
        {"run_id": "a", "model_version": "v1", "n": 7},
        {"run_id": "b", "model_version": "v1", "n": 10},
        {"run_id": "c", "model_version": "v2", "n": 5},
        {"run_id": "d", "model_version": "v1", "n": 3},
    ]


def test_concurrent_writers_different_ids_both_land(bucket: str) -> None:
    table = f"s3://{bucket}/tables/concurrent-diff"
    _commit(table, "seed", 5)
    procs = [_writer(table, f"run{i}", 3000, 0.3) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "committed" in out
    assert _count(table) == 5 + 3000 + 3000
    assert {
        r["run_id"]: r["n"] for r in run_sql(table, "SELECT run_id, count(*) AS n FROM scores GROUP BY 1").to_pylist()
    } == {"seed": 5, "run0": 3000, "run1": 3000}
    assert open_table(table).version() == 3  # the table's creation, the seed, one commit each


def test_concurrent_writers_same_id_are_fenced(bucket: str) -> None:
    """Two writers of one run id: the first commit wins, the other stops with a
    clear error (Delta app transaction), and no object has two rows."""
    table = f"s3://{bucket}/tables/concurrent-same"
    _commit(table, "seed", 5)
    a = _writer(table, "same", 3000, 1.0)
    b = _writer(table, "same", 2000, 1.0)
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=180), b.communicate(timeout=180)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (err_a, err_b)
    loser_err = err_a if a.returncode else err_b
    assert "error: run same: another writer committed to this run id" in loser_err and "Traceback" not in loser_err
    winner_rows = 3000 if a.returncode == 0 else 2000
    # Readable, and holding exactly one of the two runs.
    assert _count(table, "run_id = 'same'") == winner_rows and _count(table) == 5 + winner_rows
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err_a + err_b + out_a + out_b
    # In parts: a second writer that starts mid-run continues from the committed rows;
    # whichever commits second is fenced, and every row is there exactly once.
    table = f"s3://{bucket}/tables/concurrent-parts"
    a = _writer(table, "p", 8000, 0.3, commit_every=1000)
    deadline = time.time() + 120
    while time.time() < deadline and a.poll() is None and _rows_of(table, "p") < 2000:
        time.sleep(0.2)
    b = _writer(table, "p", 8000, 0.3, commit_every=1000)
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=180), b.communicate(timeout=180)
    assert sorted([a.returncode, b.returncode]) in ([0, 2], [0, 0]), (err_a, err_b)
    for p, err in ((a, err_a), (b, err_b)):
        assert p.returncode == 0 or "another writer committed to this run id" in err, err
    counts = run_sql(table, "SELECT count(*) AS n, count(DISTINCT uri) AS u FROM scores").to_pylist()[0]
    assert counts["n"] == counts["u"] and counts["u"] >= 2000


def _rows_of(table: str, run_id: str) -> int:
    from deltalake import DeltaTable

    from dragons.score.table import table_uri
    from dragons.storage import delta_options

    uri = table_uri(table)
    if not DeltaTable.is_deltatable(uri, storage_options=delta_options(uri)):
        return 0
    return _count(table, f"run_id = '{run_id}'")


def test_optimize_compacts_small_files(tmp_path: Path) -> None:
    from dragons.score.maintenance import optimize, run

    table = str(tmp_path / "t")
    for i in range(4):
        _commit(table, f"n{i}", 10)
    before = len(open_table(table).file_uris())
    out = optimize(table, 128)
    assert out["files_removed"] == before and out["files_added"] == 1
    assert len(open_table(table).file_uris()) == 1 and _count(table) == 40
    hist = run("history", table).to_pylist()
    assert hist[0]["operation"] == "OPTIMIZE" and [h["run_id"] for h in hist[1:]] == ["n3", "n2", "n1", "n0", None]


def test_query_sandbox_and_limits(tmp_path: Path) -> None:
    table = str(tmp_path / "t")
    _commit(table, "q", 10)
    secret_file = tmp_path / "secret.csv"
    secret_file.write_text("a\n1\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dragons.cli", "query", "--table", table, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    for sql in (
        "DROP VIEW scores",
        "INSERT INTO scores SELECT * FROM scores",
        f"COPY (SELECT 1) TO '{tmp_path}/x.csv'",
        "CREATE TABLE t AS SELECT 1",
        "ATTACH 'x.db'",
        "SET enable_external_access = true",
        "INSTALL httpfs",
    ):
        p = cli(sql)
        assert p.returncode == 2 and "read-only" in p.stderr and "Traceback" not in p.stderr, (sql, p.stderr)
    for sql in (
        f"SELECT * FROM read_csv('{secret_file}')",
        f"SELECT * FROM '{secret_file}'",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM delta_scan('/tmp')",
    ):
        p = cli(sql)
        assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr, (sql, p.stderr)
    assert not (tmp_path / "x.csv").exists()
    # A runaway query is stopped by the wall-clock limit, with a clear message.
    t0 = time.perf_counter()
    p = cli("--timeout", "3", "SELECT count(*) FROM range(1000000000000) a, range(10) b")
    assert p.returncode == 2 and "error: query stopped after --timeout 3s" in p.stderr, p.stderr
    assert time.perf_counter() - t0 < 60
    # A query that needs more memory than allowed fails with a clear message.
    p = cli("--memory-limit", "50MB", "--threads", "1", "SELECT list(i) AS l FROM range(20000000) t(i) GROUP BY i % 3")
    assert p.returncode == 2 and "error: query needs more than --memory-limit 50MB" in p.stderr, p.stderr
    p = cli("--format", "json", "SELECT count(*) AS n FROM latest")
    assert p.returncode == 0 and json.loads(p.stdout) == {"n": 10}, p.stderr
    # No table there: a clear error.
    p = subprocess.run(
        [sys.executable, "-m", "dragons.cli", "query", "--table", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "error: no Delta table at" in p.stderr


def test_other_engines_read_the_same_rows(bucket: str, tmp_path: Path) -> None:
    """Polars' scan_delta and DuckDB's delta extension read the table as `dragons query` does."""
    import duckdb
    import duckdb_extension_delta
    import polars as pl

    from dragons.storage import delta_options

    for table in (str(tmp_path / "t"), f"s3://{bucket}/tables/engines"):
        _commit(table, "e1", 40)
        _commit(table, "e2", 25)
        _commit(table, "e1", 30, start=500, replace=True)  # the replaced rows must not show in any engine
        ours = {
            r["run_id"]: r["n"]
            for r in run_sql(table, "SELECT run_id, count(*) AS n FROM scores GROUP BY 1").to_pylist()
        }
        assert ours == {"e1": 30, "e2": 25}
        pol = pl.scan_delta(table, storage_options=delta_options(table) or None).group_by("run_id").len().collect()
        assert dict(zip(pol["run_id"].to_list(), pol["len"].to_list())) == ours
        if table.startswith("s3://"):
            continue  # DuckDB's delta_scan on S3 needs the httpfs extension and S3 secrets; local shows the same files
        ext = (
            Path(duckdb_extension_delta.__file__).parent
            / "extensions"
            / f"v{duckdb.__version__}"
            / "delta.duckdb_extension"
        )
        con = duckdb.connect()
        con.execute(f"LOAD '{ext}'")
        duck = dict(con.execute(f"SELECT run_id, count(*) FROM delta_scan('{table}') GROUP BY 1").fetchall())
        assert duck == ours


def test_skips_resume_incremental_and_error_kinds(tmp_path: Path) -> None:
    """What a run skips: its own committed objects (resume), and with --incremental
    objects unchanged since this model version's rows, unless their last row is a
    transient error (or any error, with --retry-errors)."""
    from dragons.score.incremental import load_skips
    from dragons.score.schema import LISTING_SCHEMA

    table = str(tmp_path / "t")
    assert load_skips(table, None, "v1", "n3", incremental=True).split(
        rows("x", 3).select(["uri", "etag", "size", "last_modified"])
    )[1:] == (0, 0)
    _commit(table, "n1", 8)  # uris s3://x/n1/0..7.jpg, etag e0..e7, size 100, model v1
    w = RunWriter(table, "n2", datetime.now(timezone.utc), ["ants", "bees"], model_version="v1")
    w.add(
        pa.table(
            {
                "uri": ["s3://x/n1/5.jpg", "s3://x/n1/6.jpg", "s3://x/n1/7.jpg"],
                "error": ["read_error: timeout", "truncated: image file is truncated", "access_denied: no"],
                "error_kind": ["read_error", "truncated", "access_denied"],
                "etag": ["e5", "e6", "e7"],
                "size": [100, 100, 100],
            }
        )
    )
    w.commit({})  # the newest rows for 5, 6, 7 are errors: transient, permanent, transient
    now = datetime.now(timezone.utc)
    page = pa.Table.from_pylist(
        [
            {"uri": "s3://x/n1/0.jpg", "etag": "e0", "size": 100, "last_modified": now},  # unchanged -> skip
            {"uri": "s3://x/n1/1.jpg", "etag": "CHANGED", "size": 100, "last_modified": now},  # new etag
            {"uri": "s3://x/n1/2.jpg", "etag": "e2", "size": 101, "last_modified": now},  # new size
            {"uri": "s3://x/n1/3.jpg", "etag": "e3", "size": 100, "last_modified": now},  # unchanged -> skip
            {"uri": "s3://x/n1/5.jpg", "etag": "e5", "size": 100, "last_modified": now},  # last row a transient error
            {"uri": "s3://x/n1/6.jpg", "etag": "e6", "size": 100, "last_modified": now},  # last row a permanent error
            {"uri": "s3://x/n1/7.jpg", "etag": "e7", "size": 100, "last_modified": now},  # access denied: transient
            {"uri": "s3://x/new.jpg", "etag": "e9", "size": 100, "last_modified": now},  # new object
        ],
        schema=LISTING_SCHEMA,
    )
    v = open_table(table).version()

    def todo(model: str, run_id: str, incremental: bool = True, retry: bool = False) -> tuple[list[str], int, int]:
        t, kept, skipped = load_skips(table, v, model, run_id, incremental, retry).split(page)
        return [u.rsplit("/", 1)[1] for u in t.column("uri").to_pylist()], kept, skipped

    assert todo("v1", "n3") == (["1.jpg", "2.jpg", "5.jpg", "7.jpg", "new.jpg"], 0, 3)
    assert todo("v1", "n3", retry=True) == (["1.jpg", "2.jpg", "5.jpg", "6.jpg", "7.jpg", "new.jpg"], 0, 2)
    assert todo("v2", "n3") == (["0.jpg", "1.jpg", "2.jpg", "3.jpg", "5.jpg", "6.jpg", "7.jpg", "new.jpg"], 0, 0)
    # Resume: run n1 again keeps (skips) every object it holds, whatever their etag,
    # with or without --incremental; only the new object is left.
    assert todo("v1", "n1", incremental=False) == (["new.jpg"], 7, 0)
    assert todo("v2", "n1") == (["new.jpg"], 7, 0)
    # As of an older version (what a retried listing task reads), n2's rows do not exist yet.
    t, kept, skipped = load_skips(table, 1, "v1", "n2", False).split(page)
    assert (t.num_rows, kept) == (8, 0)


def test_local_listing_streams_pages(tmp_path: Path) -> None:
    from dragons.score.listing import iter_listing

    for i in range(25):
        d = tmp_path / "in" / f"d{i % 3}" / "deep"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"photo #{i}?%20 x.jpg").write_bytes(b"x" * i)
    pages = list(iter_listing(str(tmp_path / "in"), page_rows=10))
    assert [p.num_rows for p in pages] == [10, 10, 5]
    rows = [r for p in pages for r in p.to_pylist()]
    assert {Path(r["uri"]).name for r in rows} == {f"photo #{i}?%20 x.jpg" for i in range(25)}
    assert all(
        r["etag"].startswith("W/") and r["size"] == int(Path(r["uri"]).name.split("#")[1].split("?")[0]) for r in rows
    )
    with pytest.raises(DragonsError, match="does not exist"):
        list(iter_listing(str(tmp_path / "missing")))


def test_local_listing_keeps_a_name_that_is_not_utf8_and_refuses_an_empty_folder(tmp_path: Path) -> None:
    from dragons.score.listing import iter_listing

    d = tmp_path / "in"
    d.mkdir()
    (d / "ok.jpg").write_bytes(b"x")
    os.close(os.open(os.fsencode(str(d)) + b"/caf\xe9.jpg", os.O_CREAT | os.O_WRONLY))  # Latin-1 bytes, not UTF-8
    rows = [r for p in iter_listing(str(d)) for r in p.to_pylist()]
    assert sorted(Path(r["uri"]).name for r in rows) == ["caf\\xe9.jpg", "ok.jpg"]  # a row each, no crash
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DragonsError, match="holds no files"):  # as an empty S3 prefix is
        list(iter_listing(str(tmp_path / "empty")))


def test_many_classes_different_run_ids_both_land(tmp_path: Path) -> None:
    """From 28 classes on, run_id was past the 32 columns Delta keeps statistics
    for, so a concurrent commit of another run id looked like a conflict."""
    from dragons.score.schema import schema

    classes = [f"c{i:02d}" for i in range(30)]
    table = str(tmp_path / "t")

    def run_rows(run_id: str) -> pa.Table:
        now = datetime.now(timezone.utc)
        s = schema(classes)
        return pa.table(
            {
                f.name: [f"s3://x/{run_id}.jpg"]
                if f.name == "uri"
                else [run_id]
                if f.name == "run_id"
                else [now]
                if f.name in ("scored_at", "last_modified")
                else [now.strftime("%Y-%m-%d")]
                if f.name == "dt"
                else [None]
                for f in s
            },
            schema=s,
        )

    def run(run_id: str) -> RunWriter:
        w = RunWriter(table, run_id, datetime.now(timezone.utc), classes)
        w.begin()
        w.add(run_rows(run_id).drop_columns(["model_version", "run_id", "scored_at", "dt"]))
        return w

    run("seed").finish()
    a = run("a")  # run a's handle sits at the version before b's commit
    run("b").finish()
    a.finish()
    assert sorted(r["run_id"] for r in run_sql(table, "SELECT run_id FROM scores").to_pylist()) == ["a", "b", "seed"]


def test_vacuum_keeps_a_floor_and_rounds_up(tmp_path: Path) -> None:
    """Below the floor (an hour, or twice the longest part interval in the log)
    vacuum refuses: it would delete a running night's files before their commit
    names them. delta-rs takes whole hours: a fractional retention rounds up."""
    from dragons.score.maintenance import vacuum

    table = str(tmp_path / "t")
    _commit(table, "a", 5, commit_interval_s=3 * 3600.0)  # a night whose parts come every 3 h: floor 6 h
    for hours in (0, 0.5, 5.9):
        with pytest.raises(DragonsError, match=r"below this table's floor of 6 h.*--retention-hours 6 or more"):
            vacuum(table, hours)
    part = next(p for p in Path(table).iterdir() if p.name.startswith("dt="))
    young = part / "in-flight-writer.parquet"
    young.write_bytes((next(part.glob("*.parquet"))).read_bytes())  # a file no commit names yet
    old = time.time() - 6.7 * 3600
    os.utime(young, (old, old))
    assert vacuum(table, 6.5) == [] and young.exists()  # 6.5 h is 7 h, and the file is 6.7 h old
    assert any(f.endswith("in-flight-writer.parquet") for f in vacuum(table, 6, dry_run=True))


def test_maintenance_beside_a_night_past_its_first_checkpoint(tmp_path: Path) -> None:
    """optimize and vacuum while a night commits 130 parts: no row lost, no commit
    broken; past delta-rs' first checkpoint (every 100 commits) dragons, DuckDB's
    delta_scan and Polars read the same rows."""
    import duckdb
    import duckdb_extension_delta
    import polars as pl

    from dragons.score.maintenance import optimize, vacuum

    table = str(tmp_path / "t")
    n = 6500
    proc = _writer(table, "night", n, 0.2, commit_every=50)
    optimized = vacuumed = 0
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if _rows_of(table, "night") >= 500:
            optimized += (optimize(table, 1)["files_removed"] or 0) > 0
            vacuumed += 1
            vacuum(table, 1)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert optimized >= 1 and vacuumed >= 3, (optimized, vacuumed)
    assert list((Path(table) / "_delta_log").glob("*.checkpoint.parquet")), "no checkpoint after 130 commits"
    ours = run_sql(table, "SELECT count(*) AS n, count(DISTINCT uri) AS u FROM scores").to_pylist()[0]
    assert ours == {"n": n, "u": n}
    assert run_sql(table, "SELECT status, parts FROM runs").to_pylist() == [{"status": "complete", "parts": n // 50}]
    assert pl.scan_delta(table).select(pl.len()).collect().item() == n
    ext = (
        Path(duckdb_extension_delta.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "delta.duckdb_extension"
    )
    con = duckdb.connect()
    con.execute(f"LOAD '{ext}'")
    assert con.execute(f"SELECT count(*), count(DISTINCT uri) FROM delta_scan('{table}')").fetchone() == (n, n)


def test_writer_killed_during_a_commit_loses_at_most_that_part(tmp_path: Path) -> None:
    """SIGKILL while delta-rs writes a part's files: the parts before it are all
    there, the table reads, and the next writer of the run continues at the next
    part and ends with every row exactly once."""
    from dragons.score.table import app_id

    n, every = 600_000, 200_000  # parts of ~100 files each: a commit is a window of seconds
    for attempt in range(3):  # a commit can land in the instant between our look and the kill: then try again
        table = str(tmp_path / f"t{attempt}")
        log = Path(table) / "_delta_log"
        proc = _writer(table, "k", n, 0.0, file_bytes=50_000, commit_every=every)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list(log.glob("*.json"))) >= 2:  # the table's creation and part 1 are committed
                on_disk = {p.name for p in Path(table).rglob("*.parquet")}
                named = {Path(u).name for u in open_table(table).file_uris()}
                if on_disk - named:  # a later part's files, not yet committed
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.05)
        proc.wait(timeout=30)
        named = {Path(u).name for u in open_table(table).file_uris()}
        orphans = {p.name for p in Path(table).rglob("*.parquet")} - named
        if orphans and proc.returncode == -signal.SIGKILL:
            break
    assert orphans, "no kill landed inside a commit in 3 tries"
    dt = open_table(table)
    parts = dt.transaction_version(app_id("k"))
    counts = run_sql(table, "SELECT count(*) AS n, count(DISTINCT uri) AS u FROM scores").to_pylist()[0]
    assert parts is not None and counts == {"n": parts * every, "u": parts * every}  # whole parts only
    again = _writer(table, "k", n, 0.0, file_bytes=100_000, commit_every=every)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    counts = run_sql(table, "SELECT count(*) AS n, count(DISTINCT uri) AS u FROM scores").to_pylist()[0]
    assert counts == {"n": n, "u": n}
    assert open_table(table).transaction_version(app_id("k")) == n // every + 1  # its parts, then the completing commit
    # The killed commit's files are named by no commit: no reader saw them, and
    # vacuum (a week by default, never below its floor) deletes them once they are
    # older than the retention, and nothing committed.
    old = time.time() - 3 * 3600
    for path in Path(table).rglob("*.parquet"):
        if path.name in orphans:
            os.utime(path, (old, old))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dragons.cli",
            "table",
            "vacuum",
            "--table",
            table,
            "--retention-hours",
            "2",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    removed = {Path(json.loads(line)["file"]).name for line in p.stdout.splitlines() if line.startswith("{")}
    assert orphans <= removed
    assert not orphans & {q.name for q in Path(table).rglob("*.parquet")}
    assert run_sql(table, "SELECT count(*) AS n FROM scores").to_pylist()[0]["n"] == n
