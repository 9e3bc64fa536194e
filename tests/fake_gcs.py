"""A local Google Cloud Storage for the ``gs://`` tests: an emulator behind an HTTPS proxy, in a process of its
own, that every client of a run reaches in place of Google (``FakeGcs`` says how)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

GOOGLE_API_HOSTS = ("storage.googleapis.com", "www.googleapis.com", "oauth2.googleapis.com")


class FakeGcs(NamedTuple):
    """A GCS emulator (``gcp-storage-emulator``, in memory) on loopback with one bucket, and what a process
    needs to use it instead of Google: ``env`` (set it in a subprocess, or with ``monkeypatch``).

    Each client of the run reaches it its own way: google-cloud-storage (Orbax, the lock) through
    ``STORAGE_EMULATOR_HOST``, array_record (google-cloud-cpp) through ``CLOUD_STORAGE_EMULATOR_ENDPOINT``;
    TensorFlow's GCS filesystem (epath, TensorBoard) and TensorStore (Orbax's arrays) have no emulator
    setting, so they go through an HTTPS proxy on loopback that serves ``*.googleapis.com`` with a
    certificate of a test CA (``CURL_CA_BUNDLE``, ``TENSORSTORE_CA_BUNDLE``) and forwards to the emulator.
    The proxy refuses every other host, and the metadata server points at a closed port: nothing
    leaves the machine.
    """

    bucket: str
    env: dict[str, str]

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])


def _patch_emulator() -> None:
    """Three behaviours of real GCS that gcp-storage-emulator 2026.7.19 lacks, which the clients rely on:
    an empty upload is an empty object (it reads the missing body as None and fails), an upload with
    ``ifGenerationMatch=0`` fails with 412 if the object exists (it ignores the precondition), and a
    download names the object's generation in ``x-goog-generation`` (TensorStore reads it after a 412)."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(server, "_dit_jax_patched", False):
        return
    read_data = server._read_data

    def _read_data(handler, query):
        data = read_data(handler, query)
        return b"" if data is None and (handler.command == "PUT" or query.get("uploadType") == ["media"]) else data

    def _precondition(handler):
        def checked(request, response, storage, *args, **kwargs):
            name = request.query.get("name", [None])[0]
            if name is None and request.query.get("uploadType") == ["multipart"]:
                name = request.data["meta"].get("name")
            if request.query.get("ifGenerationMatch") == ["0"] and name is not None:
                try:
                    storage.get_file_obj(request.params["bucket_name"], name)
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    return None
                except NotFound:
                    pass
            return handler(request, response, storage, *args, **kwargs)
        checked.__wrapped__ = handler
        return checked

    download = objects.download

    def _download(request, response, storage, *args, **kwargs):
        result = download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return result

    server._read_data = _read_data
    objects.download = _download  # objects.get calls it for ?alt=media
    insert = _precondition(objects.insert)
    patched = {download: _download, insert.__wrapped__: insert}
    server.HANDLERS = tuple((regex, {m: patched.get(h, h) for m, h in handlers.items()})
                           for regex, handlers in server.HANDLERS)
    server._dit_jax_patched = True


def serve_fake_gcs(root: str) -> None:
    """Run the emulator and the proxy (``FakeGcs``), print the environment that reaches them as one JSON line,
    and serve until stdin closes. A process of its own: TensorFlow's GCS calls hold the GIL while they wait
    for an answer, so a proxy in the process making them could never answer."""
    import http.client
    import http.server
    import logging
    import socket
    import socketserver
    import ssl
    import threading
    import urllib.parse

    import trustme
    from gcp_storage_emulator.server import create_server

    _patch_emulator()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    root = Path(root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emulator = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    emulator.start()

    def forward(handler: http.server.BaseHTTPRequestHandler, host: str) -> None:
        """Send the request to the emulator and its answer back (Location headers kept on ``host``)."""
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(handler.rfile.readline().split(b";")[0], 16):
                body += handler.rfile.read(size)
                handler.rfile.readline()
            while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
        else:
            body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in ("transfer-encoding", "connection", "proxy-connection", "expect")}
        headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request(handler.command, handler.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                handler.send_header(key, value.replace(f"http://{host}", f"https://{host}")
                                    if key.lower() == "location" and host else value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    class Tunnel(http.server.BaseHTTPRequestHandler):
        """Requests inside a CONNECT tunnel to ``host``, after the TLS handshake."""
        protocol_version, host = "HTTP/1.1", ""

        def relay(self):
            forward(self, self.host)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = relay

        def log_message(self, *args):
            pass

    ca = trustme.CA()
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*GOOGLE_API_HOSTS).configure_cert(context)

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_CONNECT(self):
            host = self.path.rsplit(":", 1)[0]
            if host not in GOOGLE_API_HOSTS:
                self.send_error(403, f"fake GCS proxy: refusing a tunnel to {self.path}")
                return
            self.send_response(200, "Connection established")
            self.end_headers()
            self.wfile.flush()
            type("Tunnel", (Tunnel,), {"host": host})(context.wrap_socket(self.connection, server_side=True),
                                                      self.client_address, self.server)
            self.close_connection = True

        def plain(self):
            """A plain-HTTP proxy request: served only if it is for the emulator itself."""
            url = urllib.parse.urlsplit(self.path)
            if (url.hostname, url.port) != ("127.0.0.1", port):
                self.send_error(403, f"fake GCS proxy: refusing {self.command} {self.path}")
                return
            self.path = url.path + (f"?{url.query}" if url.query else "")
            forward(self, "")

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = plain

        def log_message(self, *args):
            pass

    proxy = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Proxy)
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    (root / "gcloud").mkdir()
    proxy_url, emulator_url = f"http://127.0.0.1:{proxy.server_address[1]}", f"http://127.0.0.1:{port}"
    env = {"https_proxy": proxy_url, "HTTPS_PROXY": proxy_url, "http_proxy": proxy_url, "HTTP_PROXY": proxy_url,
           "no_proxy": "", "NO_PROXY": "", "CURL_CA_BUNDLE": str(ca_file), "TENSORSTORE_CA_BUNDLE": str(ca_file),
           # No credentials: TensorFlow skips the metadata server and sends no token, TensorStore a fake one;
           # the emulator clients need none. No gcloud configuration of the user's is read.
           "NO_GCE_CHECK": "true", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "CLOUDSDK_CONFIG": str(root / "gcloud"),
           "GCE_METADATA_ROOT": "127.0.0.1:9", "GCE_METADATA_HOST": "127.0.0.1:9",
           "STORAGE_EMULATOR_HOST": emulator_url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": emulator_url}
    print(json.dumps(env), flush=True)
    try:
        sys.stdin.read()  # until the test session closes it
    finally:
        proxy.shutdown()
        proxy.server_close()
        emulator.stop()


@contextlib.contextmanager
def start_fake_gcs(root: Path) -> Iterator[FakeGcs]:
    """``serve_fake_gcs`` in a process of its own (its CA and gcloud folder in ``root``) until the context exits."""
    import subprocess

    server = subprocess.Popen([sys.executable, "-c", f"from tests.fake_gcs import serve_fake_gcs; "
                               f"serve_fake_gcs({str(root)!r})"], cwd=Path(__file__).resolve().parents[1],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line, f"the fake GCS server did not start (exit status {server.wait()})"
        yield FakeGcs("bucket", json.loads(line))
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
