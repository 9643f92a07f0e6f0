"""Live servers for the server tests, all on 127.0.0.1 and stopped by their context managers.

- :class:`LiveServer`: ``localtag.serve.server.create_app`` on uvicorn in a background thread (REST, and
  gRPC when ``settings.grpc_port`` is set).
- :class:`ImageServer`: a small HTTP server the fetcher can be pointed at: files, a 404, a stall,
  redirects (to anywhere, and a loop), a ``?access_token=`` check like Directus's ``/assets``.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import uvicorn

from localtag.serve.http_config import uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``serve``'s own uvicorn config (:func:`localtag.serve.http_config.uvicorn_config`: limits, header timeout)
    on ``settings.host`` (127.0.0.1 unless a test says ::1) and a free port; logging is left to pytest
    (``log_config`` None) unless a test passes one."""

    def __init__(self, settings, loaded=None, log_config=None):
        from localtag.serve.server import create_app

        self.app = create_app(settings, loaded)
        self.port = free_port()
        host = settings.host
        self.base = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        config = uvicorn_config(self.app, settings, host=host, port=self.port, logs=log_config)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{self.port}")

    @property
    def service(self):
        return self.app.state.service

    @property
    def grpc_port(self) -> int:
        return self.app.state.grpc_port

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the localtag server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        self.server.seen.append((parts.path, self.headers.get("Host")))
        path = parts.path
        if path.startswith("/img/"):
            data = self.server.files.get(path[5:])
            return self._send(200, data, {"Content-Type": "image/jpeg"}) if data else self._send(404)
        if path.startswith("/assets/"):  # like Directus: needs ?access_token=
            if query.get("access_token", [""])[0] != self.server.token:
                return self._send(403, b'{"errors":[{"message":"forbidden"}]}')
            data = self.server.files.get(path[8:])
            return self._send(200, data, {"Content-Type": "image/jpeg"}) if data else self._send(403)
        if path == "/redirect":
            return self._send(302, headers={"Location": query["to"][0]})
        if path == "/loop":
            return self._send(302, headers={"Location": "/loop"})
        if path == "/stall":
            self.server.release.wait(30)
            return self._send(200, b"late")
        if path == "/drip":  # headers at once, then a byte now and then
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                if self.server.release.wait(0.2):
                    break
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return
            return
        if path == "/huge":  # claims a body over any cap
            return self._send(200, b"", {"Content-Length": str(10**12)})
        if path == "/chunked":  # no length, more than the test's byte cap
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"y" * 65536
            try:
                for _ in range(64):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if path == "/error":
            return self._send(500, b"boom")
        return self._send(404, b"not found")


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes] | None = None, token: str = "s3cret-token"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files or {})
        self.token = token
        self.seen: list[tuple[str, str | None]] = []
        self.release = threading.Event()
        self.port = self.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name=f"images-{self.port}")

    def add(self, name: str, path_or_bytes: Path | bytes) -> str:
        self.files[name] = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        return f"{self.base}/img/{name}"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()
