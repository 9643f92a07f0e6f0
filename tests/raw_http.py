"""Raw HTTP/1.1 on loopback sockets, shared by tests/test_hardening.py, tests/test_hardening2.py and
bench/bench_attack.py: requests sent by hand (slow, half-sent or never finished: what an HTTP client
will not make), reading what the server sent back, and the hostile images and bodies they send.

Standard library, httpx and Pillow only, so the bench imports it without the test fixtures
(``sys.path`` holding this folder; pytest puts it there for the tests).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import socket
import subprocess
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from PIL import Image

GENERAL = "/v2/models/general-image-recognition/outputs"
#: the first part of a Filestack multipart upload (boundary ``XX``), up to the file's bytes
FILESTACK_PART = b'--XX\r\nContent-Disposition: form-data; name="fileUpload"; filename="a.jpg"\r\n\r\n'


# -- sending ----------------------------------------------------------------------------------------------
def connect(port: int, source: str | None = None, timeout: float = 10) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port``, from ``source`` (any 127/8 address is loopback on Linux)."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0) if source else None)


def post_head(path: str, key: str | None, length: int | None = None, *, content_type: str = "application/json",
              chunked: bool = False, complete: bool = True) -> bytes:
    """A POST request head: ``Authorization: Key`` when ``key``, a ``Content-Length`` or chunked framing.
    ``complete=False``: only the request line, Host and the key (a half-sent head)."""
    lines = [f"POST {path} HTTP/1.1", "Host: x"] + ([f"Authorization: Key {key}"] if key else [])
    if not complete:
        return ("\r\n".join(lines) + "\r\n").encode()
    lines.append(f"Content-Type: {content_type}")
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def filestack_head(key: str | None) -> bytes:
    """A chunked multipart Filestack upload's head and first chunk: the file's bytes come next, as chunks."""
    return post_head("/filestack/tags", key, content_type="multipart/form-data; boundary=XX", chunked=True) \
        + chunk(FILESTACK_PART)


def one(data: bytes | str, **extra) -> dict:
    """A predict body of one base64 image (``data``: bytes, or base64 text as is)."""
    b64 = data if isinstance(data, str) else base64.b64encode(data).decode()
    return {"inputs": [{"data": {"image": {"base64": b64}}, **extra}]}


# -- reading ----------------------------------------------------------------------------------------------
def read_all(s: socket.socket, wait: float) -> tuple[bytes, bool]:
    """What the server sent on ``s`` within ``wait`` seconds, and whether it closed the connection."""
    end = time.monotonic() + wait
    got = b""
    while (left := end - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except TimeoutError:
            return got, False
        except OSError:
            return got, True
        if not data:
            return got, True
        got += data
    return got, False


def alive(s: socket.socket, answers_ok: bool = False) -> bool:
    """Still open, and (unless ``answers_ok``: what came is read and dropped) unanswered; does not wait."""
    s.setblocking(False)
    try:
        while True:
            got = s.recv(65536)  # b"": closed; bytes: answered
            if not got or not answers_ok:
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def closed_while_dripping(s: socket.socket, wait: float, every: float = 0.2) -> tuple[bytes, float | None]:
    """Send a byte every ``every`` s for at most ``wait`` s; (what came back, seconds until closed or None)."""
    start = time.monotonic()
    got = b""
    while time.monotonic() - start < wait:
        try:
            s.send(b"x")
        except OSError:
            return got, time.monotonic() - start
        data, closed = read_all(s, every)
        got += data
        if closed:
            return got, time.monotonic() - start
    return got, None


def status_of(reply: bytes) -> int:
    """The HTTP status of a raw reply (0: none)."""
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def json_of(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# -- hostile payloads ------------------------------------------------------------------------------------
def thin_png(w: int, h: int) -> bytes:
    """A flat w×h PNG (a 1×500,000 one is a few KB on the wire)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def rotated_jpeg(w: int, h: int) -> bytes:
    """A w×h JPEG whose EXIF says to turn it a quarter (orientation 6): upright it is h×w."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "JPEG", quality=70, exif=exif.tobytes())
    return buf.getvalue()


def gzip_zeros(n_zeros: int, layers: int = 1) -> bytes:
    """``n_zeros`` bytes of zeros gzipped ``layers`` times (one layer of 1 GiB: about 1 MB; two: about 2 KB),
    compressed a MiB at a time (never all in memory)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    out = b"".join(c.compress(block) for _ in range(n_zeros >> 20)) + c.flush()
    for _ in range(layers - 1):
        out = gzip.compress(out, 9)
    return out


# -- servers -----------------------------------------------------------------------------------------------
class EncodedFiles(ThreadingHTTPServer):
    """A web server (in a thread) that answers ``GET path`` with ``files[path] = (body, Content-Encoding,
    Content-Type)`` as they are (a compression bomb is served compressed); ``host``: ``address:port``."""

    daemon_threads = True

    def __init__(self, files: dict[str, tuple[bytes, str, str]], address: str = "127.0.0.1"):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                body, coding, kind = files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Encoding", coding)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        super().__init__((address, 0), Handler)
        self.host = f"{address}:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll ``base``/readyz until it answers 200 (True), or ``proc`` exits or ``timeout`` s pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
