"""A small HTTP proxy on 127.0.0.1 that makes an S3 server flaky, for retry tests.

It forwards every request to the real (moto) server, except that some GET and HEAD
requests are answered with ``503 SlowDown`` and some connections are reset before an
answer, on a fixed schedule and up to a fixed number of faults, so a run stays bounded.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


class FaultProxy:
    """``every``-th read request fails: alternately a 503 SlowDown and a reset connection."""

    def __init__(self, upstream: str, every: int = 4, max_faults: int = 40):
        self.upstream = urlparse(upstream)
        self.every = every
        self.max_faults = max_faults
        self.reads = 0
        self.faults = {"503": 0, "reset": 0}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

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

            def _forward(self):
                body = self._body()
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                fault = proxy._next_fault(self.command)
                if fault == "reset":
                    # SO_LINGER 0: close() sends RST, as a dropped connection does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
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
