"""A local HTTP server for artifacts by address (tests/test_remote.py, benchmarks/bench_remote.py): files from
memory with HEAD and range requests as object stores serve them, an added latency per request, and the faults a
network gives: a missing file, a body cut short, no range support, a read that stalls."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Server:
    """What the server holds and has seen; change its fields while it runs."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    truncated: set[str] = field(default_factory=set)  # half the body, then the connection drops
    no_ranges: set[str] = field(default_factory=set)  # always the whole body, status 200
    stalled: dict[str, int] = field(default_factory=dict)  # name: GETs answered before each waits ``stall`` seconds
    latency: float = 0.0  # seconds added before every answer
    stall: float = 30.0
    gets: Counter = field(default_factory=Counter)  # GET requests per file
    requests: int = 0  # every request (HEAD and GET)
    bytes_sent: int = 0

    def address(self, name: str, sha256: str | None = None) -> str:
        return f"{self.url}/{name}" + (f"#sha256={sha256}" if sha256 else "")

    def counted(self) -> tuple[int, int]:
        """(requests, bytes) so far, to subtract."""
        return self.requests, self.bytes_sent


def _etag(body: bytes) -> str:
    return f'"{len(body)}-{hash(body[:4096])}"'


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do: latency is per request, not per connection

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _body(self) -> bytes | None:
            with lock:
                server.requests += 1
            if server.latency:
                time.sleep(server.latency)
            body = server.files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
            return body

        def do_HEAD(self) -> None:  # noqa: N802
            body = self._body()
            if body is not None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", _etag(body))
                if self.path.lstrip("/") not in server.no_ranges:
                    self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            body = self._body()
            if body is None:
                return
            name = self.path.lstrip("/")
            with lock:
                server.gets[name] += 1
            start, end = 0, len(body)
            if "Range" in self.headers and name not in server.no_ranges:
                if name in server.stalled and server.gets[name] > server.stalled[name]:
                    time.sleep(server.stall)
                first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
                start, end = int(first), min(len(body), int(last) + 1 if last else len(body))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start))
            self.send_header("ETag", _etag(body))
            self.end_headers()
            if name in server.truncated:
                self.wfile.write(body[start : start + (end - start) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body[start:end])
            with lock:
                server.bytes_sent += end - start

    return Handler


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up mid-body (a reader giving up) is what the faults are about: no traceback."""


@contextmanager
def serving(files: dict[str, bytes] | None = None) -> Iterator[Server]:
    """A server on a free local port, for the length of the block."""
    state = Server(files=dict(files or {}))
    httpd = _Quiet(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
