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

from dragons.errors import DragonsError
from dragons.score.query import run_sql
from dragons.columns import check_classes, prob_column
from dragons.score.table import RunWriter, open_table, run_history

REPO = Path(__file__).resolve().parents[1]
WRITER = str(REPO / "tests" / "_table_writer.py")
sys.path.insert(0, str(REPO / "tests"))
from _table_writer import rows  # noqa: E402


def _count(table: str, where: str = "true") -> int:
    return int(run_sql(table, f"SELECT count(*) AS n FROM scores WHERE {where}").to_pylist()[0]["n"])


def _commit(table: str, run_id: str, n: int, start: int = 0) -> dict:
    w = RunWriter(table, run_id, datetime.now(timezone.utc), ["ants", "bees"], model_version="v1")
    t = rows(run_id, n, start).drop_columns(["model_version", "run_id", "scored_at", "dt"])
    w.add(t)
    return w.commit({"listed": n, "skipped": 0, "model_version": "v1", "input": "test"})


def _writer(table: str, run_id: str, n: int, delay: float, file_bytes: int | None = None) -> subprocess.Popen[str]:
    args = [sys.executable, WRITER, table, run_id, str(n), str(delay)] + ([str(file_bytes)] if file_bytes else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(), cwd=REPO)


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


def test_score_refuses_colliding_artifact_and_missing_output_bucket_before_reading(s3: object, bucket: str,
                                                                                      tmp_path: Path) -> None:
    """Both checks happen before listing or reading any image (the input does not even exist)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"classes": ["a-b", "a_b"], "version": "v0", "arch": "x"}))
    cmd = [sys.executable, "-m", "dragons.cli", "score", "--model", str(model), "--input", f"s3://{bucket}/no/such/input",
           "--log-file", str(tmp_path / "s.log")]
    p = subprocess.run(cmd + ["--output", str(tmp_path / "t")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error:" in p.stderr and "p_a_b" in p.stderr and "Traceback" not in p.stderr, p.stderr
    (model / "model.json").write_text(json.dumps({"classes": ["ants", "bees"], "version": "v0", "arch": "x"}))
    t0 = time.perf_counter()
    p = subprocess.run(cmd + ["--output", "s3://no-such-bucket-dragons/tables/t"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "error: --output s3://no-such-bucket-dragons/tables/t " in p.stderr
    assert "bucket 'no-such-bucket-dragons' does not exist" in p.stderr
    assert "no/such/input" not in p.stderr  # failed on the output, before the input was even listed
    assert time.perf_counter() - t0 < 60


def test_one_run_one_commit_rerun_replaces_and_history(tmp_path: Path) -> None:
    table = str(tmp_path / "t")
    m1 = _commit(table, "night1", 30)
    m2 = _commit(table, "night2", 20)
    assert (m1["version"], m2["version"]) == (0, 1)
    m3 = _commit(table, "night1", 12, start=100)  # re-run: replaces night1's rows in one commit
    assert m3["version"] == 2
    assert _count(table) == 32 and _count(table, "run_id = 'night1'") == 12
    assert _count(table, "uri LIKE '%/100.jpg'") == 1 and _count(table, "uri LIKE '%/0.jpg' AND run_id = 'night1'") == 0
    hist = run_history(table)
    assert [h["version"] for h in hist] == [2, 1, 0]
    assert hist[0]["run_id"] == "night1" and hist[0]["listed"] == 12 and hist[0]["rows"] == 12 and hist[0]["files_removed"] >= 1
    # Time travel: as of version 1 night1 still had its 30 rows.
    assert int(run_sql(table, "SELECT count(*) AS n FROM scores WHERE run_id = 'night1'", as_of="1").to_pylist()[0]["n"]) == 30
    ts = datetime.now(timezone.utc).isoformat()
    assert _count(table) == int(run_sql(table, "SELECT count(*) AS n FROM scores", as_of=ts).to_pylist()[0]["n"])
    with pytest.raises(DragonsError, match="--as-of 99: no such table version"):
        run_sql(table, "SELECT 1", as_of="99")
    # The default query is the per-run summary from the commit log.
    summary = run_sql(table).to_pylist()
    assert [(r["version"], r["run_id"], r["listed"]) for r in summary] == [(0, "night1", 30), (1, "night2", 20), (2, "night1", 12)]
    # A NaN probability (an error row) is NULL in the table.
    w = RunWriter(table, "nan", datetime.now(timezone.utc), ["ants", "bees"], model_version="v1")
    w.add(pa.table({"uri": ["s3://x/bad.jpg"], "label": [None], "score": [float("nan")], "p_ants": [float("nan")],
                    "p_bees": [float("nan")], "error": ["truncated: x"]}))
    w.commit({"listed": 1})
    r = run_sql(table, "SELECT score, p_ants, error FROM scores WHERE run_id = 'nan'").to_pylist()
    assert r == [{"score": None, "p_ants": None, "error": "truncated: x"}]


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
    latest = run_sql(table, "SELECT run_id, model_version, count(*) AS n FROM latest GROUP BY ALL ORDER BY ALL").to_pylist()
    assert latest == [{"run_id": "a", "model_version": "v1", "n": 7}, {"run_id": "b", "model_version": "v1", "n": 10},
                      {"run_id": "c", "model_version": "v2", "n": 5}, {"run_id": "d", "model_version": "v1", "n": 3}]


def test_concurrent_writers_different_ids_both_land(bucket: str) -> None:
    table = f"s3://{bucket}/tables/concurrent-diff"
    _commit(table, "seed", 5)
    procs = [_writer(table, f"run{i}", 3000, 0.3) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "committed" in out
    assert _count(table) == 5 + 3000 + 3000
    assert {r["run_id"]: r["n"] for r in run_sql(table, "SELECT run_id, count(*) AS n FROM scores GROUP BY 1").to_pylist()} == \
        {"seed": 5, "run0": 3000, "run1": 3000}
    assert open_table(table).version() == 2  # one commit each


def test_concurrent_writers_same_id_exactly_one_wins(bucket: str) -> None:
    table = f"s3://{bucket}/tables/concurrent-same"
    _commit(table, "seed", 5)
    a = _writer(table, "same", 3000, 1.0)
    b = _writer(table, "same", 2000, 1.0)
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=180), b.communicate(timeout=180)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (err_a, err_b)
    loser_err = err_a if a.returncode else err_b
    assert "error: run same: another writer's commit" in loser_err and "the same run id" in loser_err and "Traceback" not in loser_err
    winner_rows = 3000 if a.returncode == 0 else 2000
    # Readable, and holding exactly one of the two runs.
    assert _count(table, "run_id = 'same'") == winner_rows and _count(table) == 5 + winner_rows
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err_a + err_b + out_a + out_b


def test_killed_writer_is_invisible_next_run_commits_vacuum_removes_orphans(tmp_path: Path) -> None:
    table = str(tmp_path / "t")
    _commit(table, "before", 50)
    committed_files = {p.name for p in Path(table).rglob("*.parquet")}
    proc = _writer(table, "doomed", 200_000, 0.1, file_bytes=100_000)
    deadline = time.time() + 120
    while time.time() < deadline and len(set(p.name for p in Path(table).rglob("*.parquet")) - committed_files) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    orphans = {p.name for p in Path(table).rglob("*.parquet")} - committed_files
    assert len(orphans) >= 2, "the writer never wrote a data file before it was killed"
    # Nothing of the killed run is visible; the table is as before.
    assert _count(table) == 50 and _count(table, "run_id = 'doomed'") == 0
    assert open_table(table).version() == 0
    # The next run commits normally.
    m = _commit(table, "after", 20)
    assert m["version"] == 1 and _count(table) == 70
    # Vacuum (retention 0 here; a week by default) removes the orphans, nothing committed.
    p = subprocess.run([sys.executable, "-m", "dragons.cli", "table", "vacuum", "--table", table, "--retention-hours", "0",
                        "--format", "json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    removed = {Path(json.loads(line)["file"]).name for line in p.stdout.splitlines() if line.startswith("{")}
    assert orphans <= removed
    assert not orphans & {q.name for q in Path(table).rglob("*.parquet")}
    assert _count(table) == 70


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
    assert hist[0]["operation"] == "OPTIMIZE" and [h["run_id"] for h in hist[1:]] == ["n3", "n2", "n1", "n0"]


def test_query_sandbox_and_limits(tmp_path: Path) -> None:
    table = str(tmp_path / "t")
    _commit(table, "q", 10)
    secret_file = tmp_path / "secret.csv"
    secret_file.write_text("a\n1\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dragons.cli", "query", "--table", table, *args], capture_output=True,
                              text=True, timeout=120)

    for sql in ("DROP VIEW scores", "INSERT INTO scores SELECT * FROM scores", f"COPY (SELECT 1) TO '{tmp_path}/x.csv'",
                "CREATE TABLE t AS SELECT 1", "ATTACH 'x.db'", "SET enable_external_access = true", "INSTALL httpfs"):
        p = cli(sql)
        assert p.returncode == 2 and "read-only" in p.stderr and "Traceback" not in p.stderr, (sql, p.stderr)
    for sql in (f"SELECT * FROM read_csv('{secret_file}')", f"SELECT * FROM '{secret_file}'",
                "SELECT * FROM read_text('/etc/hostname')", "SELECT * FROM delta_scan('/tmp')"):
        p = cli(sql)
        assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr, (sql, p.stderr)
    assert not (tmp_path / "x.csv").exists()
    # A runaway query is stopped by the wall-clock limit, with a clear message.
    t0 = time.perf_counter()
    p = cli("--timeout", "3", "SELECT count(*) FROM range(1000000000000) a, range(10) b")
    assert p.returncode == 2 and "error: query stopped after --timeout 3s" in p.stderr, p.stderr
    assert time.perf_counter() - t0 < 60
    # A query that needs more memory than allowed fails with a clear message.
    p = cli("--memory-limit", "50MB", "--threads", "1",
            "SELECT list(i) AS l FROM range(20000000) t(i) GROUP BY i % 3")
    assert p.returncode == 2 and "error: query needs more than --memory-limit 50MB" in p.stderr, p.stderr
    p = cli("--format", "json", "SELECT count(*) AS n FROM latest")
    assert p.returncode == 0 and json.loads(p.stdout) == {"n": 10}, p.stderr
    # No table there: a clear error.
    p = subprocess.run([sys.executable, "-m", "dragons.cli", "query", "--table", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "error: no Delta table at" in p.stderr


def test_other_engines_read_the_same_rows(bucket: str, tmp_path: Path) -> None:
    """Polars' scan_delta and DuckDB's delta extension read the table as `dragons query` does."""
    import duckdb
    import duckdb_extension_delta
    import polars as pl

    from dragons.score.table import storage_options

    for table in (str(tmp_path / "t"), f"s3://{bucket}/tables/engines"):
        _commit(table, "e1", 40)
        _commit(table, "e2", 25)
        _commit(table, "e1", 30, start=500)  # the re-run's removed rows must not show in any engine
        ours = {r["run_id"]: r["n"] for r in run_sql(table, "SELECT run_id, count(*) AS n FROM scores GROUP BY 1").to_pylist()}
        assert ours == {"e1": 30, "e2": 25}
        pol = pl.scan_delta(table, storage_options=storage_options(table) or None).group_by("run_id").len().collect()
        assert dict(zip(pol["run_id"].to_list(), pol["len"].to_list())) == ours
        if table.startswith("s3://"):
            continue  # DuckDB's delta_scan on S3 needs the httpfs extension and S3 secrets; local shows the same files
        ext = Path(duckdb_extension_delta.__file__).parent / "extensions" / f"v{duckdb.__version__}" / "delta.duckdb_extension"
        con = duckdb.connect()
        con.execute(f"LOAD '{ext}'")
        duck = dict(con.execute(f"SELECT run_id, count(*) FROM delta_scan('{table}') GROUP BY 1").fetchall())
        assert duck == ours


def test_known_objects_per_model_version_and_etag(tmp_path: Path) -> None:
    """--incremental's filter: same model version + same etag and size = skip; anything else is scored."""
    from dragons.score.incremental import known_objects
    from dragons.score.listing import LISTING_SCHEMA

    table = str(tmp_path / "t")
    assert len(known_objects(table, "v1", "n3")) == 0  # no table yet: everything is new
    _commit(table, "n1", 6)  # uris s3://x/n1/0..5.jpg, etag e0..e5, size 100, model v1
    w = RunWriter(table, "n2", datetime.now(timezone.utc), ["ants", "bees"], model_version="v1")
    w.add(pa.table({"uri": ["s3://x/n1/5.jpg"], "error": ["read_error: timeout"], "etag": ["e5"], "size": [100]}))
    w.commit({})  # the newest row for 5.jpg is a (transient) read error
    now = datetime.now(timezone.utc)
    page = pa.Table.from_pylist([
        {"uri": "s3://x/n1/0.jpg", "etag": "e0", "size": 100, "last_modified": now},   # unchanged -> skip
        {"uri": "s3://x/n1/1.jpg", "etag": "CHANGED", "size": 100, "last_modified": now},  # new etag
        {"uri": "s3://x/n1/2.jpg", "etag": "e2", "size": 101, "last_modified": now},   # new size
        {"uri": "s3://x/n1/3.jpg", "etag": "e3", "size": 100, "last_modified": now},   # unchanged -> skip
        {"uri": "s3://x/n1/5.jpg", "etag": "e5", "size": 100, "last_modified": now},   # last row a read_error
        {"uri": "s3://x/new.jpg", "etag": "e9", "size": 100, "last_modified": now},    # new object
    ], schema=LISTING_SCHEMA)
    v1 = known_objects(table, "v1", "n3")
    assert len(v1) == 5
    assert v1.unseen(page).column("uri").to_pylist() == ["s3://x/n1/1.jpg", "s3://x/n1/2.jpg", "s3://x/n1/5.jpg",
                                                          "s3://x/new.jpg"]
    assert known_objects(table, "v2", "n3").unseen(page).num_rows == 6  # a new model version scores everything
    # A rerun under run id n1 replaces n1's rows at its commit: they are not "known",
    # or the rerun would skip them and its commit delete them.
    assert len(known_objects(table, "v1", "n1")) == 0


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
    assert all(r["etag"].startswith("W/") and r["size"] == int(Path(r["uri"]).name.split("#")[1].split("?")[0])
               for r in rows)
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
    from deltalake import write_deltalake

    from dragons.score.table import schema, write_run

    classes = [f"c{i:02d}" for i in range(30)]
    table = str(tmp_path / "t")

    def run_rows(run_id: str) -> pa.Table:
        now = datetime.now(timezone.utc)
        s = schema(classes)
        return pa.table({f.name: [f"s3://x/{run_id}.jpg"] if f.name == "uri" else [run_id] if f.name == "run_id" else
                         [now] if f.name in ("scored_at", "last_modified") else [now.strftime("%Y-%m-%d")] if f.name == "dt"
                         else [None] for f in s}, schema=s)

    write_run(table, "seed", run_rows("seed"), {})
    # Run b commits while run a is "scoring": a's write starts from the version before b's.
    from deltalake import DeltaTable

    stale = DeltaTable(table)
    write_run(table, "b", run_rows("b"), {})
    write_deltalake(stale, run_rows("a"), mode="overwrite", predicate="run_id = 'a'", partition_by=["dt"])
    assert sorted(r["run_id"] for r in run_sql(table, "SELECT run_id FROM scores").to_pylist()) == ["a", "b", "seed"]


def test_vacuum_rounds_a_fractional_retention_up(tmp_path: Path) -> None:
    """delta-rs takes whole hours: 0.5 h used to become 0 and delete a file a
    running writer had just written (its commit would then name a missing file)."""
    from dragons.score.maintenance import vacuum

    table = str(tmp_path / "t")
    _commit(table, "a", 5)
    part = next(p for p in Path(table).iterdir() if p.name.startswith("dt="))
    fresh = part / "in-flight-writer.parquet"
    fresh.write_bytes((next(part.glob("*.parquet"))).read_bytes())  # a file no commit names yet, seconds old
    assert vacuum(table, 0.5) == [] and fresh.exists()
    assert any(f.endswith("in-flight-writer.parquet") for f in vacuum(table, 0, dry_run=True))  # 0 h means now
