"""Real-AWS parity: ``AWS_ENDPOINT_URL=""`` means "not set" for every library.

Env files, Kubernetes Secrets and Ray's ``${VAR}`` expansion write an unset
variable as an empty string. pyarrow and boto3 then use real AWS S3, but delta-rs
read the empty endpoint as a URL and panicked (``TokioMultiThreadExecutor has
crashed``: a Rust panic and a Python traceback, exit 1). With no network here,
"real AWS" is unreachable, so every S3-touching command must end with a clean
``error:`` (exit 2, no traceback, no panic) within seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dragons import storage
from dragons.errors import DragonsError

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 60.0  # imports (torch, ray) take seconds on a busy 2-core machine; real runs take 4-9 s

# Real AWS (no endpoint), dummy credentials; no network here. EC2 metadata off:
# nothing may wait for an instance-metadata service that is not there.
AWS_ENV = {
    "AWS_ENDPOINT_URL": "",
    "AWS_ENDPOINT_URL_S3": " ",
    "AWS_ACCESS_KEY_ID": "AKIDUMMYDUMMYDUMMY",
    "AWS_SECRET_ACCESS_KEY": "dummy-secret-value-for-tests",
    "AWS_SESSION_TOKEN": "",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(AWS_ENV)
    env["PYTHONPATH"] = str(REPO)  # this checkout's dragons, whatever is installed
    return env


def _run(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LIMIT_S * 3)
    return p, time.monotonic() - t0


def _check_clean_error(p: subprocess.CompletedProcess[str], seconds: float) -> None:
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "panicked" not in out and "PanicException" not in out, out[-3000:]
    assert p.stderr.startswith("error: ") or "\nerror: " in p.stderr, p.stderr[-2000:]
    assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in out
    assert seconds < LIMIT_S, (seconds, out[-2000:])


@pytest.fixture(scope="module")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local model artifact, so that `score` gets as far as its S3 output."""
    from helpers_hardening import save_tiny_model

    uri = str(tmp_path_factory.mktemp("model") / "tiny")
    save_tiny_model(uri)
    return uri


COMMANDS = {
    "query": ["query", "--table", "s3://b/t"],
    "query-sql": ["query", "--table", "s3://b/t", "--format", "csv", "SELECT count(*) FROM scores"],
    "history": ["table", "history", "--table", "s3://b/t"],
    "score": ["score", "--model", "{model}", "--input", "s3://b/in", "--output", "s3://b/t"],
    "train": ["train", "--data", "s3://b/d", "--out", "s3://b/o", "--epochs", "0"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_empty_endpoint_is_real_aws_and_a_clean_error(name: str, local_model: str, tmp_path: Path) -> None:
    """Each command as a person runs it (the console script's `main`): it reaches for
    real AWS S3 like pyarrow and boto3 do, and says it cannot reach it."""
    args = [a.format(model=local_model) for a in COMMANDS[name]]
    p, seconds = _run([sys.executable, "-m", "dragons.cli", *args], cwd=tmp_path)  # logs/ lands in tmp_path
    _check_clean_error(p, seconds)
    assert "cannot reach S3" in p.stderr and "s3://b/" in p.stderr, p.stderr[-2000:]


def test_job_entry_point_drops_empty_aws_vars(tmp_path: Path) -> None:
    """jobs/score.py (`ray job submit -- python jobs/score.py`) does not go through dragons.cli."""
    p, seconds = _run(
        [
            sys.executable,
            str(REPO / "jobs" / "score.py"),
            "--model",
            "s3://b/m",
            "--input",
            "s3://b/in",
            "--output",
            "s3://b/t",
        ],
        cwd=tmp_path,
    )
    _check_clean_error(p, seconds)


def test_embedded_ray_workers_do_not_inherit_empty_aws_vars(tmp_path: Path) -> None:
    """Workers of an embedded Ray copy the driver's environment at ray.init:
    ensure_ray clears the empty variables before it, whoever called it."""
    code = (
        "import os, ray; from dragons.raycluster import ensure_ray; ensure_ray(30); "
        "names = ray.get(ray.remote(lambda: sorted(k for k in os.environ if k.startswith('AWS_'))).remote()); "
        "print('worker', names); ray.shutdown()"
    )
    p, _ = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    worker = next(line for line in p.stdout.splitlines() if line.startswith("worker"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):  # empty or blank above
        assert f"'{name}'" not in worker, worker
    assert "'AWS_REGION'" in worker and "'AWS_ACCESS_KEY_ID'" in worker, worker  # set ones travel as before


def test_a_delta_rs_panic_reached_through_the_library_is_a_clean_error(tmp_path: Path) -> None:
    """Code that skips the entry points (a notebook calling run_sql with the empty
    variables still set) still meets delta-rs' panic: it ends as an `error:` naming
    the table, not a traceback. (drop_empty_aws_env is not called on purpose; Rust's
    panic hook prints its own "thread ... panicked" lines before Python sees it.)"""
    code = (
        "import sys; from dragons.cliargs import guarded; from dragons.score.query import run_sql; "
        "sys.exit(guarded(lambda: run_sql('s3://b/t')))"
    )
    p, seconds = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert "panicked" in p.stderr  # the case this test is about happened
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "s3://b/t" in last, last
    assert seconds < LIMIT_S


# ----------------------------------------------------------------- unit level


def test_drop_empty_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")
    monkeypatch.setenv("AWS_REGION", "  ")
    monkeypatch.setenv("AWS_PROFILE", "prod")
    monkeypatch.setenv("NOT_AWS_EMPTY", "")
    assert storage.aws_env("AWS_ENDPOINT_URL") is None and storage.aws_env("AWS_REGION") is None
    assert storage.aws_env("AWS_PROFILE") == "prod"
    assert storage.drop_empty_aws_env() == ["AWS_ENDPOINT_URL", "AWS_REGION"]
    assert "AWS_ENDPOINT_URL" not in os.environ and "AWS_REGION" not in os.environ
    assert os.environ["AWS_PROFILE"] == "prod" and os.environ["NOT_AWS_EMPTY"] == ""
    assert storage.drop_empty_aws_env() == []


def test_delta_failures_are_told_from_bugs(tmp_path: Path) -> None:
    from deltalake.exceptions import DeltaError

    class PanicException(BaseException):  # pyo3's, which derives from BaseException
        pass

    assert storage.is_delta_failure(DeltaError("Generic DeltaTable error: task 5 panicked"))
    assert storage.is_delta_failure(PanicException("called `Result::unwrap()` on an `Err` value"))
    assert storage.is_delta_failure(Exception("Generic S3 error: error sending request"))
    assert storage.is_delta_failure(OSError("Kernel error -> Generic S3 error"))
    assert not storage.is_delta_failure(TypeError("object_store"))  # a bug keeps its traceback
    assert not storage.is_delta_failure(KeyboardInterrupt())

    table = str(tmp_path / "t")  # local: exists() has nothing clearer to say
    with pytest.raises(DragonsError, match=r"cannot read the table at .*delta-rs crashed .*AWS_ENDPOINT_URL"):
        with storage.delta_errors(table):
            raise PanicException("TokioMultiThreadExecutor has crashed: RecvError")
    with pytest.raises(DragonsError, match=r"^cannot read the table at .*: Kernel error -> Generic S3 error Error"):
        with storage.delta_errors(table):
            raise OSError("Kernel error -> Generic S3 error\n  \x1b[31m↳\x1b[0m Error performing GET")
    with pytest.raises(TypeError):
        with storage.delta_errors(table):
            raise TypeError("a bug")
