"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the local S3 endpoint.

For a seeded, bounded share of requests it answers 503 SlowDown or 500
InternalError, or resets the connection, instead of forwarding. Deterministic
per request sequence (seeded RNG under a lock) and bounded: the same request
(method + path) is faulted at most ``max_per_request`` times, so a client that
retries enough always gets through, unless its key matches ``always_fail``
(500 forever) or ``deny`` (403 AccessDenied forever). ``delete_on_get`` keys
are deleted on the endpoint just before their first GET is forwarded: an object
that vanishes between listing and reading. ``latency_s`` delays every request
whose kind is in ``latency_methods`` ("LIST" = a bucket listing, or an HTTP
method) before it is forwarded: a far-away endpoint (AWS's ~0.1-0.3 s a LIST
page) in front of a local one; requests wait concurrently, as on a network.

Runs in its own thread (``start()``) or as a process (``python tests/s3_fault_proxy.py``).
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
INTERNAL = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)
DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
)


@dataclass
class FaultPlan:
    rate: float = 0.2  # share of requests faulted (until max_per_request for that request)
    seed: int = 0
    max_per_request: int = 2  # below the clients' S3_MAX_ATTEMPTS - 1: retries always get through
    max_faults: int = 10_000  # total bound
    always_fail: tuple[str, ...] = ()  # key substrings answered 500 forever
    deny: tuple[str, ...] = ()  # key substrings answered 403 AccessDenied forever ("" = everything)
    deny_methods: tuple[str, ...] = ("GET", "PUT", "POST", "DELETE", "HEAD")
    delete_on_get: tuple[str, ...] = ()  # key substrings deleted just before their first GET
    kinds: tuple[str, ...] = ("slowdown", "internal", "reset")
    latency_s: float = 0.0  # added before forwarding each request of latency_methods
    latency_methods: tuple[str, ...] = ("LIST",)  # "LIST" (a bucket listing: GET ?list-type=2 ...) or HTTP methods


@dataclass
class Stats:
    requests: int = 0
    faults: Counter = field(default_factory=Counter)
    deleted: list[str] = field(default_factory=list)


class FaultProxy:
    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        u = urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname or "127.0.0.1", int(u.port or 80)
        self.plan = plan
        self.stats = Stats()
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()
        self._per_request: Counter = Counter()
        self._deleted: set[str] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                proxy._delay(self.command, self.path)
                action = proxy._decide(self.command, self.path)
                if action == "reset":
                    # RST instead of FIN: the client sees "connection reset by peer".
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if action == "slowdown":
                    return self._reply(503, SLOWDOWN, {"Content-Type": "application/xml"})
                if action in ("internal", "always_fail"):
                    return self._reply(500, INTERNAL, {"Content-Type": "application/xml"})
                if action == "deny":
                    return self._reply(403, DENIED, {"Content-Type": "application/xml"})
                if action == "delete":
                    proxy._delete_upstream(self.path)
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    skip = {"transfer-encoding", "content-length", "connection"}
                    hdrs = {k: v for k, v in resp.getheaders() if k.lower() not in skip}
                    self.send_response(resp.status)
                    for k, v in hdrs.items():
                        self.send_header(k, v)
                    # HEAD answers carry the object's length without a body.
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _delay(self, method: str, path: str) -> None:
        plan = self.plan
        if plan.latency_s <= 0:
            return
        u = urlsplit(path)
        # A listing is a GET on the bucket itself (path-style: /bucket) with a query.
        is_list = (
            method == "GET" and u.path.strip("/").count("/") == 0 and ("list-type" in u.query or "prefix" in u.query)
        )
        if method in plan.latency_methods or ("LIST" in plan.latency_methods and is_list):
            time.sleep(plan.latency_s)

    def _decide(self, method: str, path: str) -> str:
        key = unquote(urlsplit(path).path)
        plan = self.plan
        with self._lock:
            self.stats.requests += 1
            if any(s in key for s in plan.always_fail):
                self.stats.faults["always_fail"] += 1
                return "always_fail"
            if method in plan.deny_methods and any(s in unquote(path) for s in plan.deny):  # query too: listings
                self.stats.faults["deny"] += 1
                return "deny"
            if (
                method == "GET"
                and key not in self._deleted
                and any(s in key for s in plan.delete_on_get)
                and "?" not in path
            ):
                self._deleted.add(key)
                self.stats.deleted.append(key)
                return "delete"
            r = self._rng.random()
            kind = self._rng.choice(plan.kinds)
            req = f"{method} {path}"
            if (
                r < plan.rate
                and self._per_request[req] < plan.max_per_request
                and sum(self.stats.faults.values()) < plan.max_faults
            ):
                self._per_request[req] += 1
                self.stats.faults[kind] += 1
                return kind
            return "forward"

    def _delete_upstream(self, path: str) -> None:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
        try:
            conn.request("DELETE", urlsplit(path).path)
            conn.getresponse().read()
        finally:
            conn.close()

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


if (
    __name__ == "__main__"
):  # python tests/s3_fault_proxy.py UPSTREAM PLAN_JSON: prints the port, serves until stdin closes
    proxy = FaultProxy(sys.argv[1], FaultPlan(**json.loads(sys.argv[2]))).start()
    print(proxy.port, flush=True)
    sys.stdin.read()
    print(
        json.dumps(
            {"requests": proxy.stats.requests, "faults": dict(proxy.stats.faults), "deleted": proxy.stats.deleted}
        ),
        flush=True,
    )
    proxy.stop()
