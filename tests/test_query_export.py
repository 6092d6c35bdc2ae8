"""``dragons query --format csv|json|parquet [--out FILE]`` writes every row, streamed;
only the terminal ``table`` format is cut, with a note on stderr."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dragons.cli import main
from dragons.errors import DragonsError
from dragons.score.export import TABLE_MAX_ROWS, export

REPO = Path(__file__).resolve().parents[1]
ROWS = 12_345  # more than the 10,000 the terminal table shows


def _rows(run_id: str, start: int, stop: int) -> pa.Table:
    """Synthetic scored rows in the table's schema (classes ants, bees)."""
    from dragons.score.schema import schema

    n, now = stop - start, datetime.now(timezone.utc)
    return pa.table(
        {
            "uri": [f"s3://x/{run_id}/{i}.jpg" for i in range(start, stop)],
            "label": ["ants"] * n,
            "score": [0.75] * n,
            "p_ants": [0.75] * n,
            "p_bees": [0.25] * n,
            "novelty": [None] * n,
            "model_version": ["v1"] * n,
            "run_id": [run_id] * n,
            "scored_at": [now] * n,
            "error": [None] * n,
            "error_kind": [None] * n,
            "etag": [f"e{i}" for i in range(start, stop)],
            "size": [100] * n,
            "last_modified": [now] * n,
            "dt": [now.strftime("%Y-%m-%d")] * n,
        },
        schema=schema(["ants", "bees"]),
    )


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local Delta table of ROWS rows in two commits, written straight with delta-rs (no Ray, no model)."""
    from deltalake import write_deltalake

    root = str(tmp_path_factory.mktemp("export") / "scores")
    write_deltalake(root, _rows("a", 0, 10_000), partition_by=["dt"])
    write_deltalake(root, _rows("b", 10_000, ROWS), partition_by=["dt"], mode="append")
    return root


def _query(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["query", *args])
    out, err = capfd.readouterr()
    return code, out, err


def test_csv_to_a_file_has_every_row(table: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "all.csv"
    code, stdout, err = _query(
        capfd, "--table", table, "--format", "csv", "--out", str(out), "SELECT uri, label, score, scored_at FROM scores"
    )
    assert code == 0, err
    assert stdout == "" and f"{ROWS} rows -> {out}" in err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == ROWS
    assert {r["uri"] for r in rows} == {
        f"s3://x/{run}/{i}.jpg" for run, lo, hi in (("a", 0, 10_000), ("b", 10_000, ROWS)) for i in range(lo, hi)
    }
    assert rows[0]["label"] == "ants" and float(rows[0]["score"]) == 0.75
    assert [p.name for p in tmp_path.iterdir()] == ["all.csv"]  # no temporary file left beside it


def test_json_lines_on_stdout_has_every_row(table: str, capfd: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = _query(capfd, "--table", table, "--format", "json", "SELECT uri, p_bees, error FROM scores")
    assert code == 0, err
    lines = stdout.splitlines()
    assert len(lines) == ROWS  # one object a line, no note among them
    first = json.loads(lines[0])
    assert set(first) == {"uri", "p_bees", "error"} and first["p_bees"] == 0.25 and first["error"] is None
    assert len({json.loads(line)["uri"] for line in lines}) == ROWS
    assert "not shown" not in err and "note" not in err


def test_parquet_to_a_file_has_every_row(table: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "all.parquet"
    code, _, err = _query(
        capfd,
        "--table",
        table,
        "--format",
        "parquet",
        "--out",
        str(out),
        "--memory-limit",
        "256MB",
        "SELECT * FROM scores",
    )
    assert code == 0, err
    t = pq.read_table(out)
    assert t.num_rows == ROWS
    assert {"uri", "label", "p_ants", "p_bees", "run_id", "dt"} <= set(t.column_names)
    assert pa.types.is_timestamp(t.schema.field("scored_at").type)  # types kept, not text


def test_parquet_needs_out(table: str, capfd: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = _query(capfd, "--table", table, "--format", "parquet")
    assert code == 2 and stdout == ""
    assert err.startswith("error: ") and "--out" in err and "Traceback" not in err


def test_out_is_refused_for_table_format_and_s3(table: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = _query(capfd, "--table", table, "--out", str(tmp_path / "x.txt"))
    assert code == 2 and err.startswith("error: ") and "--format csv, json or parquet" in err
    code, _, err = _query(capfd, "--table", table, "--format", "csv", "--out", "s3://b/x.csv")
    assert code == 2 and err.startswith("error: ") and "local file" in err
    code, _, err = _query(capfd, "--table", table, "--format", "csv", "--out", str(tmp_path / "no" / "x.csv"))
    assert code == 2 and err.startswith("error: ") and "does not exist" in err


def test_the_terminal_table_is_cut_and_says_so_on_stderr(table: str, capfd: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = _query(capfd, "--table", table, "SELECT uri, label FROM scores")
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].split() == ["uri", "label"]
    assert len(lines) == 2 + TABLE_MAX_ROWS + 1  # header, rule, rows, "(first 10000 rows)"
    assert lines[-1] == f"(first {TABLE_MAX_ROWS} rows)"
    assert "more were left out" in err and "--format csv|json|parquet" in err
    assert "left out" not in stdout
    # A result that fits is not cut, and nothing is said.
    code, stdout, err = _query(
        capfd, "--table", table, "SELECT run_id, count(*) AS n FROM scores GROUP BY 1 ORDER BY 1"
    )
    assert code == 0 and stdout.splitlines()[-1] == "(2 rows)" and err == ""


def test_a_failed_export_leaves_no_file(tmp_path: Path) -> None:
    """Written under a temporary name, renamed only when complete: a query that fails
    halfway (a limit, the timeout) leaves neither a half file nor the temporary one."""
    schema = pa.schema([pa.field("n", pa.int64())])

    def batches() -> Iterator[pa.RecordBatch]:
        yield pa.record_batch([pa.array(range(1000))], schema=schema)
        raise DragonsError("query stopped after --timeout 1s")

    out = tmp_path / "half.csv"
    with pytest.raises(DragonsError, match="--timeout"):
        export(pa.RecordBatchReader.from_batches(schema, batches()), "csv", str(out))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old.json").write_text("kept\n")  # an earlier export under the same name stays whole
    with pytest.raises(DragonsError):
        export(pa.RecordBatchReader.from_batches(schema, batches()), "json", str(tmp_path / "old.json"))
    assert (tmp_path / "old.json").read_text() == "kept\n" and len(list(tmp_path.iterdir())) == 1


def test_csv_writes_nested_values_as_json_text(tmp_path: Path) -> None:
    t = pa.table({"k": ["a", "b"], "l": pa.array([[1, 2], None], pa.list_(pa.int64()))})
    out = tmp_path / "nested.csv"
    assert export(pa.RecordBatchReader.from_batches(t.schema, t.to_batches()), "csv", str(out)) == 2
    assert list(csv.reader(io.StringIO(out.read_text()))) == [["k", "l"], ["a", "[1, 2]"], ["b", ""]]


def test_table_history_formats_still_print_every_row(table: str, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["table", "history", "--table", table, "--format", "json"]) == 0
    out, _ = capfd.readouterr()
    assert len(out.splitlines()) == 2 and json.loads(out.splitlines()[0])["version"] == 1


def test_a_closed_pipe_ends_the_export_quietly(table: str) -> None:
    """`dragons query --format csv ... | head`: no BrokenPipe traceback."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    cmd = (
        f"{sys.executable} -m dragons.cli query --table {table} --format csv 'SELECT * FROM scores' | head -n 2; "
        "exit ${PIPESTATUS[0]}"
    )
    p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout.splitlines()) == 2 and "Traceback" not in p.stderr and "Error" not in p.stderr


def test_csv_cells_that_look_like_formulas_open_as_text(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """OWASP CSV injection: a class named `=1+1` (and keys starting with + - @ tab) come out
    with a leading ' in `dragons query --format csv` and `dragons export --format csv`;
    numbers (a negative margin) are untouched."""
    from dragons.score.labelling import render
    from dragons.score.table import RunWriter

    root = str(tmp_path / "t")
    w = RunWriter(root, "inj", datetime.now(timezone.utc), ["=1+1", "ok"], model_version="v1")
    w.add(
        pa.table(
            {
                "uri": ["s3://b/1.jpg", "+cmd|' /C calc'!A0", "@SUM(1)", "\tx"],
                "label": ["=1+1", "ok", "ok", "=1+1"],
                "score": [0.9, 0.8, 0.7, 0.6],
                "p__1_1": [0.9, 0.2, 0.3, 0.6],
                "p_ok": [0.1, 0.8, 0.7, 0.4],
                "error": pa.nulls(4, pa.string()),
            }
        )
    )
    w.commit({})
    out = tmp_path / "q.csv"
    assert (
        main(
            [
                "query",
                "--table",
                root,
                "SELECT uri, label, -score AS neg FROM scores ORDER BY score DESC",
                "--format",
                "csv",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    got = list(csv.reader(io.StringIO(out.read_text())))
    assert got[1:] == [
        ["s3://b/1.jpg", "'=1+1", "-0.9"],
        ["'+cmd|' /C calc'!A0", "ok", "-0.8"],
        ["'@SUM(1)", "ok", "-0.7"],
        ["'\tx", "'=1+1", "-0.6"],
    ]
    text = render([{"uri": '=HYPERLINK("http://x")', "label": "=1+1", "score": 0.5, "margin": -0.1}], "csv").decode()
    assert list(csv.reader(io.StringIO(text)))[1] == ['\'=HYPERLINK("http://x")', "'=1+1", "0.500000", "-0.100000"]
