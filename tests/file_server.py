"""A loopback HTTP file server for the download tests: Range requests, dropped connections, chosen headers."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from typing import NamedTuple


class FileServer(NamedTuple):
    """A loopback HTTP server over ``files`` (path -> bytes) that honours Range requests.

    ``requests`` records each request's (path, Range header); ``drop_after[path] = n`` makes
    the next request of ``path`` send ``n`` bytes of its body and then close the connection
    (once per entry: the entry is removed when used). ``headers[path]`` sets response headers
    of ``path`` (a value of None leaves the header out, e.g. ``Content-Length``).
    """

    url: str
    files: dict[str, bytes]
    requests: list[tuple[str, str | None]]
    drop_after: dict[str, int]
    headers: dict[str, dict[str, str | None]]


@contextlib.contextmanager
def serve_files() -> Iterator[FileServer]:
    """A ``FileServer`` with no files yet, running until the context exits."""
    files: dict[str, bytes] = {}
    requests: list[tuple[str, str | None]] = []
    drop_after: dict[str, int] = {}
    headers: dict[str, dict[str, str | None]] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append((self.path, self.headers.get("Range")))
            if self.path not in files:
                self.send_error(404)
                return
            body, start = files[self.path], 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            for name, value in {"Content-Length": str(len(body) - start), **headers.get(self.path, {})}.items():
                if value is not None:
                    self.send_header(name, value)
            self.end_headers()
            cut = drop_after.pop(self.path, None)
            self.wfile.write(body[start:] if cut is None else body[start:start + cut])
            if cut is not None:
                self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FileServer(f"http://127.0.0.1:{server.server_address[1]}", files, requests, drop_after, headers)
    finally:
        server.shutdown()
        server.server_close()
