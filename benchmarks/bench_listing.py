"""Listing fanned out: keys/s at 1 and 8 listing streams over a slow endpoint.

    .venv/bin/python benchmarks/bench_listing.py            # 100,000 keys (a minute or two)
    .venv/bin/python benchmarks/bench_listing.py --n 2000   # seconds

N keys under one flat prefix (sequential names, the split's hard case: no
folders) are put once into a local S3 endpoint, which is then listed through
tests/s3_fault_proxy.py adding --latency-ms to every LIST call (AWS: ~0.1-0.3 s
a 1,000-key page). Each stream is a process (as a Ray read task is) listing its
units (dragons.score.listing.split, dealt round-robin as source.plan_units
deals them), so the figure is the listing's own fan-out, without Ray's
start-up. The bar (issue 28): at least 4x the keys/s at 8 streams.

Endpoints (--endpoint):
* ``moto``: dragons.local.s3server's moto, in a process of its own with the keys
  put straight into its backend (100,000 PUTs over HTTP take ~20 minutes on a
  2-core machine, the backend ~30 s). Moto answers a LIST by walking every key of
  the bucket in one Python process: at 100,000 keys that, not the latency, is
  what a LIST costs, and 8 streams wait on it in turn.
* ``sorted`` (default): a ListObjectsV2 endpoint over a sorted key list (a binary
  search and one page of XML a call, like S3's own index), so that the latency is
  what a LIST costs, as on AWS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUCKET = "dragons-bench-listing"
PREFIX = "flat"


def serve(n: int) -> None:
    """The endpoint (in its own process): moto with n keys, its port on stdout, until stdin closes."""
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    from dragons.local.s3server import free_port

    port = free_port()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    backend = s3_backends["123456789012"]["global"]
    backend.create_bucket(BUCKET, "us-east-1")
    for i in range(n):
        backend.put_object(BUCKET, f"{PREFIX}/img_{i:08d}.jpg", b"x")
    print(port, flush=True)
    sys.stdin.read()
    server.stop()


def serve_sorted(n: int) -> None:
    """A minimal ListObjectsV2 endpoint over n sorted keys (prefix, start-after,
    continuation-token, max-keys, url encoding; no delimiter: the keys are flat)."""
    import bisect
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, quote, urlsplit

    keys = [f"{PREFIX}/img_{i:08d}.jpg" for i in range(n)]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
            prefix, after = q.get("prefix", ""), q.get("continuation-token") or q.get("start-after") or ""
            lo = max(bisect.bisect_right(keys, after), bisect.bisect_left(keys, prefix))
            hi = bisect.bisect_left(keys, prefix + "\U0010ffff")
            page = keys[lo : min(hi, lo + int(q.get("max-keys", 1000)))]
            more = lo + len(page) < hi
            body = "".join(
                f"<Contents><Key>{quote(k)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                f"<ETag>&quot;{i:032x}&quot;</ETag><Size>1</Size><StorageClass>STANDARD</StorageClass>"
                "</Contents>"
                for i, k in enumerate(page, lo)
            )
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                'xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{BUCKET}</Name><Prefix>{quote(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>"
                f"<MaxKeys>{q.get('max-keys', 1000)}</MaxKeys><EncodingType>url</EncodingType>"
                f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>"
                + (f"<NextContinuationToken>{quote(page[-1])}</NextContinuationToken>" if more else "")
                + body
                + "</ListBucketResult>"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            self.wfile.write(xml)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()
    server.shutdown()


def _start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        raise SystemExit(f"{args[0]} did not start")
    return proc, line


def _list_units(units: list[Any]) -> int:
    """One stream: its units listed in order (in a process of its own)."""
    from dragons.score import listing

    return sum(t.num_rows for u in units for t, _ in listing.iter_unit(u))


def list_keys(streams: int) -> tuple[int, float, int]:
    """(keys listed, seconds, units) with ``streams`` threads, the split included."""
    from dragons.score import listing

    t0 = time.perf_counter()
    units = listing.split(f"s3://{BUCKET}/{PREFIX}", streams)
    dealt = [units[i::streams] for i in range(streams)]

    with ProcessPoolExecutor(streams, mp_context=multiprocessing.get_context("fork")) as pool:
        n = sum(pool.map(_list_units, dealt))
    return n, time.perf_counter() - t0, len(units)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="keys under the prefix")
    p.add_argument("--latency-ms", type=float, default=100.0, help="added to every LIST call")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    p.add_argument("--endpoint", choices=("sorted", "moto"), default="sorted")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve is not None:
        serve(a.serve) if a.endpoint == "moto" else serve_sorted(a.serve)
        return {}
    from dragons.local.s3server import LOCAL_ENV

    t = time.perf_counter()
    moto, port = _start([__file__, "--serve", str(a.n), "--endpoint", a.endpoint])
    print(f"{a.endpoint} endpoint with {a.n} keys up in {time.perf_counter() - t:.1f}s")
    plan = {"rate": 0.0, "latency_s": a.latency_ms / 1000, "latency_methods": ["LIST"]}
    proxy, pport = _start([str(REPO / "tests" / "s3_fault_proxy.py"), f"http://127.0.0.1:{port}", json.dumps(plan)])
    os.environ.update({**LOCAL_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{pport}"})
    try:
        rates = {}
        for s in a.streams:
            n, secs, units = list_keys(s)
            if n != a.n:
                raise SystemExit(f"{s} streams listed {n} keys, not {a.n}")
            rates[s] = n / secs
            print(f"{s} stream(s): {n} keys in {secs:.1f}s over {units} units: {rates[s]:,.0f} keys/s")
        lo, hi = min(a.streams), max(a.streams)
        print(
            f"{hi} streams / {lo}: {rates[hi] / rates[lo]:.1f}x (bar: >= 4x at 8 streams; "
            f"LIST latency {a.latency_ms:g} ms)"
        )
        return {
            "keys": a.n,
            "endpoint": a.endpoint,
            "latency_ms": a.latency_ms,
            "keys_per_s": {str(k): round(v) for k, v in rates.items()},
            "ratio": round(rates[hi] / rates[lo], 2),
        }
    finally:
        for proc in (proxy, moto):
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
