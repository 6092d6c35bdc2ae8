"""Nights that survive anything: a run committed in parts, SIGKILLed and run
again, two runs of one id at once, and a model that changes under a run.

The archive is 1,998 real photos (hymenoptera and 1,600 of flowers5) on the
local S3 endpoint, scored with the tiny untrained model: these tests are about
rows and commits, not accuracy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dragons.errors import DragonsError
from dragons.score.query import run_sql

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "data" / "flowers5"
ARCHIVE_SIZE = 1998


@pytest.fixture(scope="module")
def archive(hymenoptera: Path, bucket: str) -> str:
    """s3://dragons-test/archive: hymenoptera's 398 photos and 1,600 of flowers5's."""
    from concurrent.futures import ThreadPoolExecutor

    from dragons.storage import boto3_client

    if not (FLOWERS / "train").is_dir():
        pytest.fail(f"missing shared data set {FLOWERS}; it ships beside the repo in ../shared/data")
    files = sorted(p for p in hymenoptera.rglob("*") if p.is_file())
    files += sorted(p for p in (FLOWERS / "train").rglob("*") if p.is_file())[: ARCHIVE_SIZE - len(files)]
    assert len(files) == ARCHIVE_SIZE
    client = boto3_client(max_pool_connections=8)

    def put(i_path: tuple[int, Path]) -> None:
        i, path = i_path
        client.put_object(Bucket=bucket, Key=f"archive/{path.parent.name}/{i:04d}-{path.name}", Body=path.read_bytes())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, enumerate(files)))
    return f"s3://{bucket}/archive"


def _score_cmd(model: str, archive: str, table: str, run_id: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dragons.cli",
        "score",
        "--model",
        model,
        "--input",
        archive,
        "--output",
        table,
        "--run-id",
        run_id,
        "--commit-every",
        "200",
        "--progress-s",
        "1",
        *extra,
    ]


def _start(cmd: list[str], tmp: Path, name: str) -> subprocess.Popen[str]:
    """A `dragons score` in a process group of its own, on the session's Ray."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(
        cmd + ["--log-file", str(tmp / f"{name}.log")],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _rows(table: str, run_id: str) -> list[dict]:
    return run_sql(table, f"SELECT uri, scored_at, dt FROM scores WHERE run_id = '{run_id}'").to_pylist()


def _committed(table: str, run_id: str) -> int:
    try:
        return int(run_sql(table, f"SELECT count(*) AS n FROM scores WHERE run_id = '{run_id}'").to_pylist()[0]["n"])
    except DragonsError:  # no table yet
        return 0


def test_killed_night_resumes_keeping_every_committed_row(
    ray_session: None, tiny_model: str, archive: str, bucket: str, tmp_path: Path
) -> None:
    table = f"s3://{bucket}/tables/resume"
    cmd = _score_cmd(tiny_model, archive, table, "night", "--date", "2026-11-29")
    proc = _start(cmd, tmp_path, "first")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _committed(table, "night") < 0.3 * ARCHIVE_SIZE:
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, mid-flight
    proc.wait(timeout=30)
    before = {r["uri"]: r["scored_at"] for r in _rows(table, "night")}
    assert 0.3 * ARCHIVE_SIZE <= len(before) < ARCHIVE_SIZE and len(before) % 200 == 0  # whole parts only
    status = run_sql(table, "SELECT status, parts FROM runs WHERE run_id = 'night'").to_pylist()
    assert status[0]["parts"] == len(before) // 200 and status[0]["status"] in ("running", "partial")

    again = _start(cmd, tmp_path, "second")
    out, err = again.communicate(timeout=420)
    assert again.returncode == 0, err[-3000:]
    assert f"kept {len(before)}" in out and f"new {ARCHIVE_SIZE - len(before)}" in out, out
    rows = _rows(table, "night")
    counts = Counter(r["uri"] for r in rows)
    assert len(counts) == ARCHIVE_SIZE and set(counts.values()) == {1}  # every object exactly once
    after = {r["uri"]: r["scored_at"] for r in rows}
    assert all(after[u] == t for u, t in before.items())  # committed rows kept as they were
    assert {r["dt"] for r in rows} == {"2026-11-29"}
    run = run_sql(table, "SELECT * FROM runs WHERE run_id = 'night'").to_pylist()[0]
    assert (run["status"], run["listed"], run["kept"], run["rows"]) == (
        "complete",
        ARCHIVE_SIZE,
        len(before),
        ARCHIVE_SIZE,
    )
    # The night's date stays when it is run again days later, without --date.
    p = _start(_score_cmd(tiny_model, archive, table, "night"), tmp_path, "third")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and f"kept {ARCHIVE_SIZE}" in out and "new 0" in out, err[-3000:]
    assert {r["dt"] for r in _rows(table, "night")} == {"2026-11-29"}


def test_two_runs_of_one_id_at_once_score_each_object_once(
    ray_session: None, tiny_model: str, archive: str, bucket: str, tmp_path: Path
) -> None:
    table = f"s3://{bucket}/tables/twins"
    cmd = _score_cmd(tiny_model, archive, table, "twin")
    a, b = _start(cmd, tmp_path, "a"), _start(cmd, tmp_path, "b")
    (_, err_a), (_, err_b) = a.communicate(timeout=600), b.communicate(timeout=600)
    for p, err in ((a, err_a), (b, err_b)):
        assert p.returncode == 0 or (
            p.returncode == 2 and "another writer committed to this run id" in err and "Traceback" not in err
        ), err[-3000:]
    assert 0 in (a.returncode, b.returncode), (err_a[-2000:], err_b[-2000:])
    counts = Counter(r["uri"] for r in _rows(table, "twin"))
    assert len(counts) == ARCHIVE_SIZE and set(counts.values()) == {1}


def test_a_model_changed_under_a_run_commits_none_of_its_rows(
    ray_session: None, tiny_model: str, hymenoptera_s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver pinned one artifact (here: it read another version than the one
    now at --model); every scoring actor checks what it loaded against it."""
    from dragons import artifact
    from dragons.score import pipeline
    from dragons.score.pipeline import ScoreConfig, score

    real = artifact.read_meta

    def pinned_elsewhere(uri: str) -> dict:
        return {**real(uri), "version": "0123456789abcdef"}

    monkeypatch.setattr(pipeline.artifact, "read_meta", pinned_elsewhere)
    table = str(tmp_path / "t")
    with pytest.raises(DragonsError, match="changed during the run") as err:
        score(
            ScoreConfig(
                model=tiny_model,
                input=f"{hymenoptera_s3}/val/ants",
                output=table,
                run_id="pinned",
                commit_every=10,
                log_file=str(tmp_path / "s.log"),
            )
        )
    assert "0123456789abcdef" in str(err.value)
    assert _committed(table, "pinned") == 0
    # It committed nothing, so it records nothing (a marker could fence a healthy writer of the id).
    assert run_sql(table, "SELECT status FROM runs WHERE run_id = 'pinned'").to_pylist() == []
    # The night then runs with the model at --model; republished afterwards (another version
    # there), a retry of the run id is refused, naming both versions, and the table is unchanged.
    monkeypatch.setattr(pipeline.artifact, "read_meta", real)
    done = score(
        ScoreConfig(
            model=tiny_model,
            input=f"{hymenoptera_s3}/val/ants",
            output=table,
            run_id="pinned",
            commit_every=10,
            log_file=str(tmp_path / "s.log"),
        )
    )
    monkeypatch.setattr(pipeline.artifact, "read_meta", pinned_elsewhere)
    with pytest.raises(
        DragonsError, match=r"model_version: the run has '\w+', this command '0123456789abcdef'.*--replace"
    ):
        score(
            ScoreConfig(
                model=tiny_model,
                input=f"{hymenoptera_s3}/val/ants",
                output=table,
                run_id="pinned",
                log_file=str(tmp_path / "s.log"),
            )
        )
    runs = run_sql(table, "SELECT status, rows, model_version FROM runs WHERE run_id = 'pinned'").to_pylist()
    assert runs == [{"status": "complete", "rows": done["rows"], "model_version": done["model_version"]}]
    assert run_sql(table, "SELECT count(DISTINCT model_version) AS n FROM scores").to_pylist() == [{"n": 1}]
