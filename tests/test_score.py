"""Scoring into the Delta table, incremental runs, querying, and the Ray Jobs API (slow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dragons import storage
from dragons.errors import DragonsError
from dragons.score.cli import run_score as score
from dragons.score.config import ScoreConfig
from dragons.score.query import run_sql
from dragons.score.table import open_table, run_history

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

ACCURACY_SQL = """
SELECT count(*) AS n,
       avg(CASE WHEN uri LIKE '%/' || label || '/%' THEN 1.0 ELSE 0.0 END) AS accuracy
FROM scores WHERE run_id = '{run}'
"""


def test_score_hymenoptera_val_from_s3(hymenoptera_model: dict, hymenoptera_s3: str, tmp_path: Path) -> None:
    table = "s3://dragons-test/tables/hymenoptera"
    m = score(
        ScoreConfig(
            model=hymenoptera_model["uri"],
            input=f"{hymenoptera_s3}/val",
            output=table,
            run_id="val1",
            log_file=str(tmp_path / "score.log"),
        )
    )
    assert (m["listed"], m["rows"], m["errors"], m["skipped"]) == (153, 153, 0, 0)
    # Accuracy straight from the Delta table, read with deltalake (no dragons code in the way).
    rows = open_table(table).to_pyarrow_table().to_pylist()
    assert len(rows) == 153 and len({r["uri"] for r in rows}) == 153
    assert set(rows[0]) >= {
        "uri",
        "label",
        "score",
        "p_ants",
        "p_bees",
        "model_version",
        "run_id",
        "scored_at",
        "error",
        "etag",
        "size",
        "last_modified",
        "dt",
    }
    assert all(r["etag"] and r["size"] > 0 and r["last_modified"] is not None for r in rows)
    acc = sum(f"/{r['label']}/" in r["uri"] for r in rows) / len(rows)
    assert acc >= 0.90
    assert all(abs(r["p_ants"] + r["p_bees"] - 1) < 1e-5 and r["score"] == max(r["p_ants"], r["p_bees"]) for r in rows)
    assert {r["model_version"] for r in rows} == {hymenoptera_model["meta"]["version"]}
    # dragons query reports the same.
    q = run_sql(table, ACCURACY_SQL.format(run="val1")).to_pylist()[0]
    assert q["n"] == 153 and abs(q["accuracy"] - acc) < 1e-9
    assert "scored" in (tmp_path / "score.log").read_text()
    _same_probabilities_from_evaluate_and_predict(hymenoptera_model["uri"], hymenoptera_s3, rows, tmp_path)


def _same_probabilities_from_evaluate_and_predict(model: str, data: str, rows: list[dict], tmp_path: Path) -> None:
    """One inference path: the scoring actors (Ray Data, batches of 8), ``evaluate``
    (threads, batches of 32, its report's predictions.csv) and ``dragons predict``
    give the same probabilities for the same images, to 1e-5 on CPU."""
    import contextlib
    import io

    import pyarrow.csv as pcsv

    from dragons.cli import main
    from dragons.evaluate import evaluate

    scored = {r["uri"]: (r["p_ants"], r["p_bees"]) for r in rows}
    evaluate(model, data, str(tmp_path / "report"))
    ev = pcsv.read_csv(tmp_path / "report" / "predictions.csv").to_pylist()
    assert len(ev) == 153 and {r["uri"] for r in ev} == set(scored)
    worst = max(abs(r[c] - scored[r["uri"]][j]) for r in ev for j, c in enumerate(("p_ants", "p_bees")))
    assert worst < 1e-5, f"evaluate and score differ by {worst:.2e}"
    some = sorted(scored)[::15]  # 11 images, both classes
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["predict", "--model", model, "--format", "json", *some]) == 0
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [g["uri"] for g in got] == some
    worst = max(abs(g[c] - scored[g["uri"]][j]) for g in got for j, c in enumerate(("p_ants", "p_bees")))
    assert worst < 1e-5, f"predict and score differ by {worst:.2e}"


def test_bad_file_catalogue_one_row_each(hymenoptera_model: dict, bucket: str) -> None:
    from dragons.local.synth import bad_file_catalogue

    cat = bad_file_catalogue()
    for name, (data, _) in cat.items():
        storage.write_bytes(f"s3://{bucket}/catalogue/{name}", data)
    table = f"s3://{bucket}/tables/catalogue"
    m = score(ScoreConfig(model=hymenoptera_model["uri"], input=f"s3://{bucket}/catalogue", output=table, run_id="cat"))
    assert m["listed"] == m["rows"] == len(cat)
    rows = {
        r["uri"].rsplit("/", 1)[-1]: r for r in run_sql(table, "SELECT * FROM scores WHERE run_id = 'cat'").to_pylist()
    }
    assert set(rows) == set(cat)
    for name, (_, expect) in cat.items():
        r = rows[name]
        if expect == "error":
            assert r["error"] and r["label"] is None and r["p_ants"] is None, r
        else:
            assert r["error"] is None and r["label"] in ("ants", "bees") and 0.5 <= r["score"] <= 1.0, r
    assert rows["bomb.png"]["error"].startswith("too_large")
    assert rows["truncated.jpg"]["error"].startswith("truncated")
    # On this CPU cluster the scoring actors decode ("auto"); decoding in upstream CPU
    # tasks (what GPU clusters do) gives the same rows, errors and probabilities.
    score(
        ScoreConfig(
            model=hymenoptera_model["uri"],
            input=f"s3://{bucket}/catalogue",
            output=table,
            run_id="cat-tasks",
            decode="separate",
        )
    )
    tasks = {
        r["uri"].rsplit("/", 1)[-1]: r
        for r in run_sql(table, "SELECT * FROM scores WHERE run_id = 'cat-tasks'").to_pylist()
    }
    assert set(tasks) == set(rows)
    for name, r in rows.items():
        t = tasks[name]
        assert (t["error"] is None) == (r["error"] is None) and (t["error"] or "")[:12] == (r["error"] or "")[:12], name
        assert t["label"] == r["label"] and (r["p_ants"] is None or abs(t["p_ants"] - r["p_ants"]) < 1e-6), name
    # The same run with a strict error budget: rows still committed, non-zero exit.
    with pytest.raises(DragonsError, match="exceeds --max-error-rate"):
        score(
            ScoreConfig(
                model=hymenoptera_model["uri"],
                input=f"s3://{bucket}/catalogue",
                output=table,
                run_id="cat-strict",
                max_error_rate=0.1,
            )
        )
    assert {h["run_id"] for h in run_history(table) if h["run_id"]} == {"cat", "cat-tasks", "cat-strict"}


def test_rerun_continues_and_replace_rescores(hymenoptera_model: dict, hymenoptera_s3: str, tmp_path: Path) -> None:
    table = str(tmp_path / "table")
    cfg = ScoreConfig(model=hymenoptera_model["uri"], input=f"{hymenoptera_s3}/val/ants", output=table, run_id="again")
    first = score(cfg)
    second = score(cfg)  # the run is complete: running it again keeps every row and scores nothing
    assert (first["version"], second["version"]) == (1, 2)  # version 0 creates the table; one commit per part
    assert (second["kept"], second["new_rows"], second["rows"]) == (70, 0, 70)
    counts = run_sql(
        table, "SELECT count(*) AS n, count(DISTINCT uri) AS u, max(scored_at) AS t FROM scores"
    ).to_pylist()[0]
    assert (counts["n"], counts["u"]) == (70, 70)
    third = score(ScoreConfig(**{**cfg.__dict__, "replace": True}))  # --replace rescores from scratch
    assert (third["kept"], third["new_rows"], third["rows"]) == (0, 70, 70)
    again = run_sql(
        table, "SELECT count(*) AS n, count(DISTINCT uri) AS u, min(scored_at) AS t FROM scores"
    ).to_pylist()[0]
    assert (again["n"], again["u"]) == (70, 70) and again["t"] > counts["t"]
    assert run_sql(table, "SELECT count(*) AS n FROM scores", as_of="1").to_pylist()[0]["n"] == 70


def test_incremental_scores_only_new_and_changed(
    hymenoptera_model: dict, hymenoptera: Path, bucket: str, tmp_path: Path
) -> None:
    """Score 100 objects, add 10, overwrite 5: the next --incremental run scores exactly 15."""
    from dragons.storage import boto3_client

    client = boto3_client()
    photos = sorted((hymenoptera / "train").rglob("*.jpg"))
    assert len(photos) >= 115
    prefix = "incremental/archive"
    # Keys with characters URL parsing gets wrong round-trip into the row's uri unchanged.
    names = [f"{p.parent.name}/{i:03d} {p.stem}.jpg" for i, p in enumerate(photos[:110])]
    for p, name in zip(photos[:100], names[:100]):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=p.read_bytes())
    table = f"s3://{bucket}/tables/incremental"
    model = hymenoptera_model["uri"]
    first = score(
        ScoreConfig(model=model, input=f"s3://{bucket}/{prefix}", output=table, run_id="night1", incremental=True)
    )
    assert (first["listed"], first["skipped"], first["rows"]) == (100, 0, 100)
    for p, name in zip(photos[100:110], names[100:110]):  # 10 new objects
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=p.read_bytes())
    changed = names[:5]
    for p, name in zip(photos[110:115], changed):  # 5 overwritten with other photos
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=p.read_bytes())
    expected = {f"s3://{bucket}/{prefix}/{n}" for n in names[100:110] + changed}

    # --dry-run prints exactly those and writes nothing.
    version = open_table(table).version()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dragons.cli",
            "score",
            "--model",
            model,
            "--input",
            f"s3://{bucket}/{prefix}",
            "--output",
            table,
            "--incremental",
            "--dry-run",
            "--log-file",
            str(tmp_path / "dry.log"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert set(p.stdout.splitlines()) == expected
    assert "listed 110  kept 0  skipped 95  would score 15" in p.stderr
    assert open_table(table).version() == version

    second = score(
        ScoreConfig(model=model, input=f"s3://{bucket}/{prefix}", output=table, run_id="night2", incremental=True)
    )
    assert (second["listed"], second["skipped"], second["rows"], second["errors"]) == (110, 95, 15, 0)
    scored = {r["uri"] for r in run_sql(table, "SELECT uri FROM scores WHERE run_id = 'night2'").to_pylist()}
    assert scored == expected
    assert run_sql(table, "SELECT count(*) AS n FROM latest").to_pylist()[0]["n"] == 110
    assert run_sql(table, "SELECT count(*) AS n FROM scores").to_pylist()[0]["n"] == 115
    runs = {r["run_id"]: r for r in run_sql(table, "SELECT * FROM runs").to_pylist()}
    assert (runs["night2"]["listed"], runs["night2"]["skipped"], runs["night2"]["scored"]) == (110, 95, 15)
    # No secret in anything the runs wrote (data files, commit log).
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="tables/incremental/")["Contents"]:
        assert secret not in client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read(), obj["Key"]
    # Nothing changed since: the third night scores nothing and still commits its counts.
    third = score(
        ScoreConfig(model=model, input=f"s3://{bucket}/{prefix}", output=table, run_id="night3", incremental=True)
    )
    assert (third["listed"], third["skipped"], third["rows"]) == (110, 110, 0)


def test_query_is_read_only_and_formats(hymenoptera_model: dict, tmp_path: Path) -> None:
    table = "s3://dragons-test/tables/hymenoptera"
    for sql in (
        "DROP TABLE scores",
        "INSERT INTO scores SELECT * FROM scores",
        "COPY scores TO 'x.csv'",
        "CREATE TABLE t AS SELECT 1",
    ):
        p = subprocess.run(
            [sys.executable, "-m", "dragons.cli", "query", "--table", table, sql],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ.copy(),
        )
        assert p.returncode == 2 and "read-only" in p.stderr and "Traceback" not in p.stderr, (sql, p.stderr)
    p = subprocess.run(
        [sys.executable, "-m", "dragons.cli", "query", "--table", table, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )
    assert p.returncode == 0, p.stderr
    summary = [json.loads(line) for line in p.stdout.splitlines()]  # one line per run, from the commit log
    val1 = [r for r in summary if r["run_id"] == "val1"]
    assert len(val1) == 1 and (val1[0]["listed"], val1[0]["scored"], val1[0]["errors"]) == (153, 153, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ray_jobs_api_submission(hymenoptera_model: dict, hymenoptera_s3: str, tmp_path: Path) -> None:
    """`ray start --head` on 127.0.0.1, submit jobs/score.py through the Jobs API, check its table."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dash = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The job's `python` is the cluster's: this venv's, even when pytest runs
    # without the venv activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The session's embedded Ray already holds Ray's default agent ports (52365,
    # metrics, runtime env): a second cluster on the same machine needs its own,
    # or its job agent never comes up and every submit answers "No available agent".
    ports = [
        f"--{flag}={_free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "ray-client-server-port",
        )
    ]
    # --block keeps `ray start` in the foreground: terminating it stops exactly this
    # cluster (a plain `ray stop` would also kill the test session's embedded Ray).
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            *ports,
            "--num-cpus=2",
            "--object-store-memory=800000000",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    # The cluster inherits RAY_AUTH_MODE=token and the token file (dragons.rayauth).
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urlopen(
                Request(f"http://127.0.0.1:{dash}/api/version", headers={"Authorization": f"Bearer {token}"}), timeout=2
            ).read()
            with pytest.raises(HTTPError, match="401"):  # ...and refuses a client without it
                urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
            break
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            time.sleep(1)
    try:
        client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
        table = "s3://dragons-test/tables/jobs"
        job = None
        for _ in range(30):  # the dashboard answers before its job agent is ready
            try:
                job = client.submit_job(
                    entrypoint=f"python jobs/score.py --model {hymenoptera_model['uri']} --input {hymenoptera_s3}/val/bees "
                    f"--output {table} --run-id job1",
                    runtime_env={
                        "working_dir": str(REPO),
                        "excludes": [".venv", ".git", "dragons_demo", "logs", "*.egg-info"],
                    },
                )
                break
            except RuntimeError as exc:
                if "No available agent" not in str(exc):
                    raise
                time.sleep(2)
        assert job is not None, "the Jobs API never accepted the job"
        deadline = time.time() + 420
        status = client.get_job_status(job)
        while time.time() < deadline and status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            time.sleep(2)
            status = client.get_job_status(job)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert "run job1 holds 83 rows" in logs and os.environ["AWS_SECRET_ACCESS_KEY"] not in logs
        q = run_sql(table, ACCURACY_SQL.format(run="job1")).to_pylist()[0]
        assert q["n"] == 83 and q["accuracy"] >= 0.85
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()


def test_manifest_input_and_missing_objects(
    hymenoptera_model: dict, hymenoptera_s3: str, bucket: str, tmp_path: Path
) -> None:
    """--manifest lists URIs itself; one that does not exist still gets its row."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    uris = [f"{hymenoptera_s3}/val/ants/{n}" for n in ("10308379_1b6c72e180.jpg", "1053149811_f62a3410d3.jpg")]
    uris.append(f"s3://{bucket}/nowhere/missing.jpg")
    buf = io.BytesIO()
    pq.write_table(pa.table({"uri": uris}), buf)
    storage.write_bytes(f"s3://{bucket}/manifests/m.parquet", buf.getvalue())
    table = str(tmp_path / "t")
    m = score(
        ScoreConfig(
            model=hymenoptera_model["uri"], manifest=f"s3://{bucket}/manifests/m.parquet", output=table, run_id="m1"
        )
    )
    assert (m["listed"], m["rows"], m["errors"]) == (3, 3, 1)
    rows = {r["uri"]: r for r in run_sql(table, "SELECT uri, label, error FROM scores").to_pylist()}
    assert rows[uris[2]]["error"].startswith("not_found") and "missing.jpg" in rows[uris[2]]["error"]
    assert rows[uris[0]]["label"] in ("ants", "bees") and rows[uris[0]]["error"] is None
    with pytest.raises(DragonsError, match="no 'uri' column"):
        storage.write_bytes(f"s3://{bucket}/manifests/bad.csv", b"path\nx.jpg\n")
        score(ScoreConfig(model=hymenoptera_model["uri"], manifest=f"s3://{bucket}/manifests/bad.csv", output=table))
