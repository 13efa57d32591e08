"""A small HTTP proxy on 127.0.0.1 that makes an S3 server flaky or slow, for retry tests.

It forwards every request to the real (moto) server, except that some GET and HEAD
requests are answered with ``503 SlowDown`` and some connections are reset before an
answer, on a fixed schedule and up to a fixed number of faults, so a run stays bounded;
``delay_s`` makes every request that ``delay_match`` finds in "<method> <path>" wait first:
a slow store, where a commit takes seconds.

The proxy runs in a process of its own: delta-rs holds the GIL of the process that calls
it while it waits for an answer, so a proxy in one of that process's threads would never
answer. ``FaultProxy`` starts it and reads what it saw (``faults``, ``requests``).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
STATS = "/__faultproxy__/stats"


class FaultProxy:
    """``every``-th read request fails: alternately a 503 SlowDown and a reset connection."""

    def __init__(
        self, upstream: str, every: int = 4, max_faults: int = 40, delay_s: float = 0.0, delay_match: str = ""
    ):
        self.config = {"upstream": upstream, "every": every, "max_faults": max_faults, "delay_s": delay_s,
                       "delay_match": delay_match}  # fmt: skip
        self._proc: subprocess.Popen | None = None
        self._final: dict | None = None  # what it saw, read when it stopped
        self.url = ""

    def start(self) -> FaultProxy:
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), json.dumps(self.config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.url = self._proc.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), self.url
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._final = self._stats()
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _stats(self) -> dict:
        if self._final is not None:
            return self._final
        # http.client, not urllib.request.urlopen: that builds urllib's global opener, with the
        # proxies of the environment of the moment, for every later caller (torch.hub too).
        conn = http.client.HTTPConnection(urlparse(self.url).hostname, urlparse(self.url).port, timeout=10)
        try:
            conn.request("GET", STATS)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    @property
    def faults(self) -> dict[str, int]:
        return self._stats()["faults"]

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request seen."""
        return [tuple(r[:2]) for r in self._stats()["requests"]]

    @property
    def timed_requests(self) -> list[tuple[str, str, float]]:
        """(method, path, when it arrived: time.time()) of every request seen."""
        return [tuple(r) for r in self._stats()["requests"]]


class _Server:
    def __init__(self, upstream: str, every: int, max_faults: int, delay_s: float, delay_match: str):
        self.upstream = urlparse(upstream)
        self.every = every
        self.max_faults = max_faults
        self.delay_s = delay_s
        self.delay_match = re.compile(delay_match)
        self.reads = 0
        self.faults = {"503": 0, "reset": 0}
        self.requests: list[tuple[str, str, float]] = []
        self._lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.http.daemon_threads = True

    def _next_fault(self, method: str) -> str | None:
        if method not in ("GET", "HEAD") or not self.every:
            return None
        with self._lock:
            self.reads += 1
            if self.reads % self.every or sum(self.faults.values()) >= self.max_faults:
                return None
            kind = "503" if self.faults["503"] <= self.faults["reset"] else "reset"
            self.faults[kind] += 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass  # trailers
                            return out
                        out += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, data: bytes, kind: str = "application/xml") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _forward(self):
                if self.path == STATS:
                    with proxy._lock:
                        stats = {"faults": proxy.faults, "requests": proxy.requests}
                    self._send(200, json.dumps(stats).encode(), "application/json")
                    return
                body = self._body()
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, time.time()))
                if proxy.delay_s and proxy.delay_match.search(f"{self.command} {self.path}"):
                    time.sleep(proxy.delay_s)
                fault = proxy._next_fault(self.command)
                if fault == "reset":
                    # SO_LINGER 0: close() sends RST, as a dropped connection does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "503":
                    self._send(503, SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                # A HEAD answer keeps the object's own Content-Length; others carry the bytes read.
                keep_length = self.command == "HEAD"
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_HEADERS and (keep_length or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not keep_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler


if __name__ == "__main__":
    server = _Server(**json.loads(sys.argv[1]))
    threading.Thread(target=server.http.serve_forever, daemon=True).start()
    print(f"http://127.0.0.1:{server.http.server_address[1]}", flush=True)
    sys.stdin.read()  # until the test closes our end
    server.http.shutdown()
