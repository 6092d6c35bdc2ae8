"""``dragons s3 serve``: flags generated from its config, buckets created, a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dragons.local.s3server import LOCAL_ENV, free_port

REPO = Path(__file__).resolve().parents[1]


def test_s3_serve_help_shows_the_configs_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dragons.cli", "s3", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "--port PORT" in out and "(default: 9000)" in out and "127.0.0.1" in out
    assert "--bucket BUCKET" in out and "repeatable" in out


def test_s3_serve_creates_its_buckets_and_stops_on_interrupt() -> None:
    import boto3

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dragons.cli", "s3", "serve", "--port", str(port), "--bucket", "one", "--bucket", "two"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]  # printed once the buckets exist
        assert first.startswith(f"S3 endpoint on http://127.0.0.1:{port}"), first
        hint = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"AWS_ENDPOINT_URL=http://127.0.0.1:{port}" in hint and LOCAL_ENV["AWS_SECRET_ACCESS_KEY"] not in hint
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name=LOCAL_ENV["AWS_REGION"],
            aws_access_key_id=LOCAL_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=LOCAL_ENV["AWS_SECRET_ACCESS_KEY"],
        )
        assert {b["Name"] for b in client.list_buckets()["Buckets"]} == {"one", "two"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10  # moto went with it: the port is free again
        while time.monotonic() < deadline:
            try:
                client.list_buckets()
            except Exception:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the endpoint on port {port} still answers after the interrupt")
    finally:
        if proc.poll() is None:
            proc.kill()
