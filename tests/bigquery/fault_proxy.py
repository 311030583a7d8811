"""A loopback HTTP proxy in front of the BigQuery emulator that answers some requests with errors.

``FaultProxy(upstream)`` forwards every request to ``upstream`` and records it. A rule
(``fail(method, path_regex, status, times, reason)``) makes the first ``times`` matching requests
fail with ``status`` and a BigQuery-shaped JSON error body (``{"error": {"code", "message",
"errors": [{"reason"}]}}``, as the REST API sends it) without reaching the emulator.
``fail_jobs(times, reason)`` lets job inserts through but answers the first ``times`` as jobs
that ended with ``errorResult.reason`` (a job that failed inside BigQuery, which only
``job_retry`` retries). The tests point the warehouse's endpoint at the proxy and count what
it saw.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}

REASONS = {
    400: "invalidQuery",
    403: "accessDenied",
    404: "notFound",
    429: "rateLimitExceeded",
    500: "internalError",
    502: "badGateway",
    503: "backendError",
}


@dataclass
class Rule:
    method: str
    path: re.Pattern
    status: int
    times: int  # -1: always
    reason: str
    failed: int = 0
    job_failure: bool = False  # forward, then report the job as failed with ``reason``

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and bool(self.path.search(path))


@dataclass
class Seen:
    method: str
    path: str
    status: int
    injected: bool


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self):
        parts = urlsplit(self.upstream)
        self._upstream_host, self._upstream_port = parts.hostname, parts.port
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self._read_body()
                rule = proxy._take_rule(self.command, self.path)
                if rule is not None and rule.job_failure:
                    status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                    job = json.loads(data)
                    error = {"reason": rule.reason, "message": f"injected job failure {rule.reason}"}
                    job["status"] = {"state": "DONE", "errorResult": error, "errors": [error]}
                    data = json.dumps(job).encode()
                    proxy._record(self.command, self.path, status, True)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if rule is not None:
                    payload = json.dumps(
                        {"error": {"code": rule.status, "message": f"injected {rule.status} {rule.reason}",
                                   "errors": [{"reason": rule.reason, "message": "injected by FaultProxy"}],
                                   "status": "INJECTED"}}
                    ).encode()
                    proxy._record(self.command, self.path, rule.status, True)
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                proxy._record(self.command, self.path, status, False)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, method: str, path: str, status: int, times: int = 1, reason: str | None = None) -> Rule:
        rule = Rule(method, re.compile(path), status, times, reason or REASONS[status])
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail_jobs(self, times: int = 1, reason: str = "backendError") -> Rule:
        rule = Rule("POST", re.compile(r"^/bigquery/v2/projects/[^/]+/jobs(\?|$)"), 200, times, reason, job_failure=True)
        with self._lock:
            self.rules.append(rule)
        return rule

    def reset(self) -> None:
        with self._lock:
            self.rules.clear()
            self.seen.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        pattern = re.compile(path) if path else None
        with self._lock:
            return [s for s in self.seen if (method is None or s.method == method)
                    and (pattern is None or pattern.search(s.path))]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _take_rule(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path) and (rule.times < 0 or rule.failed < rule.times):
                    rule.failed += 1
                    return rule
        return None

    def _record(self, method: str, path: str, status: int, injected: bool) -> None:
        with self._lock:
            self.seen.append(Seen(method, path, status, injected))

    def _forward(self, method: str, path: str, headers, body: bytes):
        connection = http.client.HTTPConnection(self._upstream_host, self._upstream_port, timeout=120)
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            forwarded["Content-Length"] = str(len(body))
            connection.request(method, path, body=body, headers=forwarded)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()
