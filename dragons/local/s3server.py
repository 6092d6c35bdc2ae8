"""A real S3 HTTP endpoint on 127.0.0.1 (moto's server) for the demo and tests.

It runs in its own process so that Ray workers, the driver and boto3 all talk
to it over HTTP exactly as they would to AWS.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from dragons.errors import DragonsError

# Local-only credentials: moto accepts anything, and these are not secrets.
LOCAL_ENV = {
    "AWS_ACCESS_KEY_ID": "dragons-local",
    "AWS_SECRET_ACCESS_KEY": "dragons-local-secret",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServeConfig:
    """``dragons s3 serve``'s settings (its flags are generated from these fields)."""

    port: int = 9000  # port on 127.0.0.1 (the endpoint never listens beyond this machine)
    bucket: list[str] = field(default_factory=list)  # create this bucket at start (repeatable)


@dataclass
class LocalS3:
    """A running moto server and the environment that points at it."""

    port: int
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def apply_env(self) -> None:
        """Point this process (and Ray workers started after it) at the endpoint."""
        os.environ.update(self.env)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start(port: int | None = None, timeout_s: float = 30.0) -> LocalS3:
    """Start moto's server on 127.0.0.1 and wait until it answers."""
    if importlib.util.find_spec("moto") is None:  # the `local` extra
        raise DragonsError("the local S3 endpoint needs moto, which is not installed: pip install 'dragons[local]'")
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = LocalS3(port=port, process=proc, env={**LOCAL_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; is port {port} free?")
        try:
            urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=1).read()
            return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"moto server did not answer on {server.endpoint} within {timeout_s:.0f}s")


def create_bucket(name: str) -> None:
    from dragons.storage import boto3_client

    client = boto3_client()
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def upload_tree(local_dir: str, bucket: str, prefix: str) -> int:
    """Upload a local folder to s3://bucket/prefix with boto3; returns the file count."""
    from dragons.storage import boto3_client

    client = boto3_client()
    n = 0
    for root, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            client.upload_file(path, bucket, f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel)
            n += 1
    return n
