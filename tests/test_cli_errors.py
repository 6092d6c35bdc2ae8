"""Every command fails fast and cleanly on a dead endpoint or a missing bucket:
exit 2, ``error: ...`` naming the input, no traceback, before any image is read."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dragons.local.s3server import free_port

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 60.0  # Python + torch imports take a few seconds on a busy 2-core machine


def _run(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    full = {**os.environ, **env}
    full.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "dragons.cli", *args],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=LIMIT_S * 3,
    )
    return p, time.monotonic() - t0


def _commands(b: str, good: str) -> dict[str, list[str]]:
    return {
        "train": ["train", "--data", f"s3://{b}/data", "--out", f"s3://{b}/models/m", "--epochs", "0"],
        "score": ["score", "--model", f"s3://{b}/models/m", "--input", f"s3://{b}/images", "--output", f"s3://{b}/t"],
        "evaluate": ["evaluate", "--model", f"s3://{b}/models/m", "--data", f"s3://{b}/data"],
        "predict": ["predict", "--model", f"s3://{b}/models/m", f"s3://{b}/x.jpg"],
        "query": ["query", "--table", f"s3://{b}/tables/scores"],
        "train-out": ["train", "--data", f"s3://{good}/hymenoptera", "--out", f"s3://{b}/models/m"],
    }


def _check(p: subprocess.CompletedProcess[str], seconds: float, must: str) -> None:
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "error: " in p.stderr and must in p.stderr, p.stderr[-2000:]
    assert seconds < LIMIT_S, (seconds, out[-2000:])


@pytest.mark.parametrize("cmd", ["train", "score", "evaluate", "predict", "query"])
def test_unreachable_endpoint(s3: object, cmd: str) -> None:
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    p, seconds = _run(_commands("some-bucket", "some-bucket")[cmd], env)
    _check(p, seconds, "cannot reach S3")
    assert "AWS_ENDPOINT_URL" in p.stderr


@pytest.mark.parametrize("cmd", ["train", "score", "evaluate", "predict", "query", "train-out"])
def test_missing_bucket(s3: object, bucket: str, hymenoptera_s3: str, cmd: str) -> None:
    p, seconds = _run(_commands("no-such-bucket", bucket)[cmd], {})
    _check(p, seconds, "no-such-bucket")
    if cmd == "train-out":
        assert "--out" in p.stderr and "not writable" in p.stderr
        assert "training" not in p.stdout  # failed before any Ray work


def test_a_broken_command_module_is_an_error_not_an_unknown_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """An import error in the scoring CLI used to be swallowed: ``score``, ``query`` and
    ``demo`` then vanished as "unknown command". Command modules are imported
    directly now: a broken one fails the import of the CLI, loudly."""
    import importlib

    import dragons.score

    monkeypatch.delattr(dragons.score, "cli", raising=False)
    monkeypatch.setitem(sys.modules, "dragons.score.cli", None)  # makes the import fail
    monkeypatch.delitem(sys.modules, "dragons.cli", raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("dragons.cli")


def test_top_level_help_gives_one_line_per_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`dragons --help` names every command with a line from its own description, as git and kubectl do."""
    from dragons.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = {
        ln.split()[0]: ln.split(None, 1)[1] for ln in out.splitlines() if ln.startswith("  ") and len(ln.split()) > 1
    }
    assert set(lines) == set(COMMANDS) and all(len(text) > 10 for text in lines.values()), out
    assert lines["score"].startswith("Score every image under a prefix")
