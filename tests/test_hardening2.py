"""Issue 16 (hardening, round two), each item against a live server on 127.0.0.1 with real sockets, real
images and real gzip: compression bombs behind URLs (N1), long thin images (N2), connections never
closed (N3), per-client caps and the minimum upload rate (N4), gRPC's connection bounds (N5), the byte
budgets of bodies arriving (N6) and of Filestack temp files (N7), and the small items (N8).

Attackers bind other loopback addresses (127.0.0.2 …) so that per-client limits can tell them from the
good client on 127.0.0.1. Every loop is bounded (a few sockets, a few seconds) and every server stops
with its context manager."""

from __future__ import annotations

import base64
import gzip
import io
import logging
import socket
import threading
import time

import httpx
import pytest
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2 as sc
from live_server import LiveServer
from PIL import Image, PngImagePlugin
from pydantic import SecretStr
from raw_http import (
    GENERAL,
    EncodedFiles,
    chunk,
    closed_while_dripping,
    connect,
    filestack_head,
    gzip_zeros,
    json_of,
    one,
    post_head,
    read_all,
    rotated_jpeg,
    status_of,
    thin_png,
    wait_for,
)

from localtag.core import errors, memory
from localtag.core.config import Settings
from localtag.core.errors import ImageError
from localtag.core.fetch import FetchPolicy, fetch
from localtag.core.loader import load
from localtag.serve.logthrottle import ThrottleFilter

KEY = "hardening2-key-0123"
HDR = {"Authorization": f"Key {KEY}"}
BOMB = 256 * 1024 * 1024  # bytes of zeros behind two gzip layers


@pytest.fixture(scope="module")
def settings(random_store, cache_dir):
    return Settings(models_dir=random_store, model="tiny-random", cache_dir=cache_dir, device="cpu",
                    api_keys=[SecretStr(KEY)], fetch_timeout=5.0, batch_size=8, workers=2)


@pytest.fixture(scope="module")
def loaded(settings):
    return load(settings)


@pytest.fixture(scope="module")
def photo(coco_images) -> bytes:
    return coco_images[0].read_bytes()


def client(source: str, timeout: float = 30) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), headers=HDR, timeout=timeout)


class RssPeak(threading.Thread):
    """This process's peak RSS while the block runs, sampled every 5 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.before = memory.rss_bytes()
        self.peak = self.before
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, memory.rss_bytes())

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


# -- N1: compression bombs behind an image URL ---------------------------------------------------------
@pytest.fixture(scope="module")
def encoded_server(photo):
    one_layer = gzip_zeros(BOMB)
    files = {"/bomb2": (gzip.compress(one_layer), "gzip, gzip"), "/bomb1": (one_layer, "gzip"),
             "/br": (b"\x00" * 100, "br"), "/photo.gz": (gzip.compress(photo), "gzip"),
             "/photo": (photo, "identity")}
    srv = EncodedFiles({path: (body, coding, "image/jpeg") for path, (body, coding) in files.items()})
    yield srv.host
    srv.close()


async def _fetch(host: str, path: str, max_bytes: int = 1_000_000) -> bytes:
    return await fetch(f"http://{host}{path}", FetchPolicy(max_bytes=max_bytes, timeout=10, allow_hosts=(host,)))


def test_nested_gzip_url_is_refused_without_inflating(encoded_server, photo):
    import asyncio

    with RssPeak() as rss, pytest.raises(ImageError) as e:
        asyncio.run(_fetch(encoded_server, "/bomb2"))
    assert e.value.kind == errors.FETCH_FAILED and "Content-Encoding" in e.value.message, e.value.message
    assert rss.peak - rss.before < 64_000_000, (rss.before, rss.peak)  # httpx inflated all 256 MB at once
    with pytest.raises(ImageError) as e:
        asyncio.run(_fetch(encoded_server, "/br"))
    assert "Content-Encoding" in e.value.message
    with RssPeak() as rss, pytest.raises(ImageError) as e:  # one layer: inflated off the loop, stopped at the cap
        asyncio.run(_fetch(encoded_server, "/bomb1"))
    assert e.value.kind == errors.TOO_MANY_BYTES
    assert rss.peak - rss.before < 64_000_000, (rss.before, rss.peak)
    assert asyncio.run(_fetch(encoded_server, "/photo.gz", 20_000_000)) == photo  # a real gzip layer works
    assert asyncio.run(_fetch(encoded_server, "/photo", 20_000_000)) == photo


def test_nested_gzip_url_through_the_server(settings, loaded, encoded_server):
    s = settings.model_copy(update={"allow_hosts": [encoded_server], "max_bytes": 20_000_000})
    with LiveServer(s, loaded) as srv:
        body = {"inputs": [{"data": {"image": {"url": f"http://{encoded_server}/bomb2"}}},
                           {"data": {"image": {"url": f"http://{encoded_server}/photo.gz"}}}]}
        before = memory.rss_bytes()
        r = httpx.post(srv.base + GENERAL, json=body, headers=HDR, timeout=60).json()
        grown = memory.rss_bytes() - before
    codes = [o["status"]["code"] for o in r["outputs"]]
    assert codes == [sc.INPUT_DOWNLOAD_FAILED, 10000], r
    assert "Content-Encoding" in r["outputs"][0]["status"]["details"]
    assert grown < 100_000_000, grown


# -- N2: long thin images --------------------------------------------------------------------------------
def test_long_thin_images_are_refused_fast(settings, loaded, photo):
    pngs = [thin_png(1, 500_000), rotated_jpeg(50_000, 1)]
    assert all(len(p) < 120_000 for p in pngs)
    with LiveServer(settings, loaded) as srv, httpx.Client(base_url=srv.base, headers=HDR, timeout=120) as c:
        c.post(GENERAL, json=one(photo))  # warm
        for data in pngs:
            before = memory.rss_bytes()
            t = time.monotonic()
            r = c.post(GENERAL, json=one(data)).json()
            took = time.monotonic() - t
            out = r["outputs"][0]["status"]
            assert out["code"] == sc.INPUT_OVER_LIMIT and "1:100" in out["details"], out
            assert took < 1.0, took
            assert memory.rss_bytes() - before < 50_000_000
        wide = c.post(GENERAL, json=one(thin_png(3000, 40))).json()  # 1:75 still tags
        assert wide["outputs"][0]["status"]["code"] == 10000


# -- N3: connections that are never closed ---------------------------------------------------------------
def test_answered_requests_read_no_more_body_and_are_closed(settings, loaded):
    with LiveServer(settings, loaded) as srv:
        for head in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
                     f"POST {GENERAL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000000000\r\n\r\n{".encode()):  # no key: 401
            s = connect(srv.port, "127.0.0.1")
            s.sendall(head)
            got, closed_after = closed_while_dripping(s, 8.0)
            s.close()
            assert status_of(got) in (200, 401), got[:80]
            assert closed_after is not None and closed_after < 5.0, closed_after  # each byte kept it open


def test_connection_deadline_and_clarifai_shaped_refusals(settings, loaded, photo):
    s = settings.model_copy(update={"connection_max_age": 1.5, "keep_alive_timeout": 30.0, "max_connections": 4})
    with LiveServer(s, loaded) as srv:
        sk = connect(srv.port, "127.0.0.1")
        sk.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        got, closed = read_all(sk, 4.0)  # answered, then closed at the total deadline (not after 30 s)
        sk.close()
        assert status_of(got) == 200 and closed
        held = [connect(srv.port, f"127.0.0.{10 + i}") for i in range(4)]
        try:
            time.sleep(0.2)
            extra = connect(srv.port, "127.0.0.20")
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            reply, closed = read_all(extra, 3.0)
            extra.close()
        finally:
            for h in held:
                h.close()
        assert status_of(reply) == 503 and closed, reply[:200]
        assert b"retry-after: 1" in reply.lower() and json_of(reply)["status"]["code"] == sc.MODEL_BUSY_PLEASE_RETRY
        assert wait_for(lambda: httpx.get(srv.base + "/healthz").status_code == 200)


# -- N4: per-client caps, minimum upload rate ----------------------------------------------------------------
def test_one_client_cannot_take_all_connections(settings, loaded, photo):
    s = settings.model_copy(update={"max_client_connections": 4})
    with LiveServer(s, loaded) as srv:
        attack = [connect(srv.port, "127.0.0.2") for _ in range(4)]
        for a in attack:
            a.sendall(b"POST " + GENERAL.encode() + b" HTTP/1.1\r\nHost: x\r\n")  # half-sent headers
        try:
            fifth = connect(srv.port, "127.0.0.2")
            fifth.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            reply, _ = read_all(fifth, 3.0)
            fifth.close()
            with httpx.Client(headers=HDR, timeout=30) as c:
                r = c.post(srv.base + GENERAL, json=one(photo))
            with client("127.0.0.3") as other:
                r3 = other.post(srv.base + GENERAL, json=one(photo))
        finally:
            for a in attack:
                a.close()
    assert status_of(reply) == 503 and json_of(reply)["status"]["code"] == sc.MODEL_BUSY_PLEASE_RETRY, reply[:200]
    assert r.status_code == 200 and r3.status_code == 200


def slow_body(port: int, source: str, path: str = GENERAL, length: int = 100_000, first: bytes = b"{") -> socket.socket:
    s = connect(port, source)
    s.sendall(post_head(path, KEY, length) + first)
    return s


def test_per_client_body_readers_and_minimum_upload_rate(settings, loaded, photo):
    s = settings.model_copy(update={"max_client_body_readers": 2, "min_upload_rate": 1000, "body_timeout": 30.0})
    with LiveServer(s, loaded) as srv:
        attack = [slow_body(srv.port, "127.0.0.2") for _ in range(2)]
        try:
            assert wait_for(lambda: srv.service.reading == 2)
            with client("127.0.0.2") as same:
                r = same.post(srv.base + GENERAL, json=one(photo))
            assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
            assert r.json()["status"]["code"] == sc.MODEL_BUSY_PLEASE_RETRY and "client" in r.text
            with httpx.Client(headers=HDR, timeout=30) as good:
                assert good.post(srv.base + GENERAL, json=one(photo)).json()["status"]["code"] == 10000
            t = time.monotonic()
            replies = [closed_while_dripping(a, 10.0, every=0.5) for a in attack]  # 2 B/s, under 1000 B/s
        finally:
            for a in attack:
                a.close()
        for got, _closed_after in replies:
            assert status_of(got) == 408 and b"bytes/s" in got, got[:300]
        assert time.monotonic() - t < 8.0  # the rate, not the 30 s body timeout, ended them
        assert wait_for(lambda: srv.service.reading == 0)


# -- N5: gRPC connections ---------------------------------------------------------------------------------
def test_grpc_caps_connections_and_times_out_handshakes(settings, loaded, photo):
    s = settings.model_copy(update={"grpc_port": 0, "grpc_max_connections": 4, "header_timeout": 1.0})
    with LiveServer(s, loaded) as srv:
        silent = [connect(srv.grpc_port, "127.0.0.2") for _ in range(10)]
        try:
            time.sleep(0.5)
            early = sum(read_all(sk, 0.05)[1] for sk in silent)
            time.sleep(1.5)
            late = sum(read_all(sk, 0.05)[1] for sk in silent)
        finally:
            for sk in silent:
                sk.close()
        assert early >= 6, early  # past the cap: closed at once
        assert late == 10, late  # no handshake within header_timeout: closed
        channel = ClarifaiChannel.get_insecure_grpc_channel(base="127.0.0.1", port=srv.grpc_port)
        stub = service_pb2_grpc.V2Stub(channel)
        req = service_pb2.PostModelOutputsRequest(model_id="general-image-recognition", inputs=[
            resources_pb2.Input(data=resources_pb2.Data(image=resources_pb2.Image(base64=photo)))])
        try:
            g = stub.PostModelOutputs(req, metadata=(("authorization", f"Key {KEY}"),), timeout=20)
        finally:
            channel.close()
        assert g.status.code == sc.SUCCESS


def test_repeated_resource_errors_are_logged_once_per_interval(caplog):
    log = logging.getLogger("asyncio-throttle-test")
    flt = ThrottleFilter(interval=0.3)
    log.addFilter(flt)
    caplog.set_level(logging.ERROR, logger=log.name)
    try:
        for _ in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                log.error("socket.accept() out of system resource", exc_info=True)
        time.sleep(0.35)
        log.error("socket.accept() out of system resource")
        log.error("an unrelated error")
    finally:
        log.removeFilter(flt)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "999 more like this" in lines[1] and lines[2] == "an unrelated error"


# -- N6: bytes of bodies still arriving ---------------------------------------------------------------------
def test_bodies_arriving_share_one_byte_budget(settings, loaded, photo):
    s = settings.model_copy(update={"max_body_bytes": 4_000_000, "max_client_body_bytes": 2_000_000})
    part = b" " * 1_500_000  # each attacker body held one byte short
    with LiveServer(s, loaded) as srv:
        held = [slow_body(srv.port, "127.0.0.2", length=1_500_002, first=b"{" + part),
                slow_body(srv.port, "127.0.0.3", length=1_500_002, first=b"{" + part)]
        try:
            assert wait_for(lambda: srv.service.body_bytes.used >= 3_000_002), srv.service.body_bytes.used
            refused = []
            for source in ("127.0.0.2", "127.0.0.4"):  # over this client's share; over the whole budget
                sk = slow_body(srv.port, source, length=1_500_002, first=b"{" + part)
                refused.append(read_all(sk, 5.0))
                sk.close()
            with httpx.Client(headers=HDR, timeout=30) as good:
                r = good.post(srv.base + GENERAL, json=one(photo))
        finally:
            for h in held:
                h.close()
        for reply, closed in refused:
            assert status_of(reply) == 503 and closed, reply[:200]
            assert json_of(reply)["status"]["code"] == sc.MODEL_BUSY_PLEASE_RETRY
        assert "client" in json_of(refused[0][0])["status"]["details"]
        assert "server" in json_of(refused[1][0])["status"]["details"]
        assert r.json()["status"]["code"] == 10000
        assert wait_for(lambda: srv.service.body_bytes.used == 0)


# -- N7: Filestack temp files --------------------------------------------------------------------------------
def upload(port: int, source: str, size: int) -> socket.socket:
    """A chunked multipart Filestack upload of ``size`` bytes of file, left unfinished."""
    s = connect(port, source)
    s.sendall(filestack_head(KEY))
    framed = chunk(b"z" * 65536)
    for _ in range(size // 65536):
        s.sendall(framed)
    return s


def test_filestack_uploads_share_one_temp_file_budget(settings, loaded, photo):
    s = settings.model_copy(update={"max_spool_bytes": 4_000_000, "max_client_spool_bytes": 2_000_000})
    with LiveServer(s, loaded) as srv:
        held = [upload(srv.port, "127.0.0.2", 1_500_000), upload(srv.port, "127.0.0.3", 1_500_000)]
        try:
            assert wait_for(lambda: srv.service.spool.used >= 2_800_000), srv.service.spool.used
            refused = []
            for source in ("127.0.0.2", "127.0.0.4"):
                sk = upload(srv.port, source, 1_500_000)
                refused.append(read_all(sk, 5.0))
                sk.close()
            with httpx.Client(headers=HDR, timeout=30) as good:
                r = good.post(srv.base + "/filestack/tags", files={"fileUpload": ("a.jpg", photo, "image/jpeg")})
        finally:
            for h in held:
                h.close()
        for reply, _closed in refused:
            assert status_of(reply) == 503, reply[:200]
            assert json_of(reply)["code"] == sc.MODEL_BUSY_PLEASE_RETRY
        assert r.status_code == 200 and r.json()["tags"]["auto"], r.text
        assert wait_for(lambda: srv.service.spool.used == 0)


# -- N8: the small items ----------------------------------------------------------------------------------
def test_small_items(settings, loaded, photo):
    b64 = base64.b64encode(photo).decode()
    assert "+" in b64 and "/" in b64
    mixed = b64.replace("/", "_", 1)  # one URL-safe character among standard ones
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "metadata " * 200_000, zip=True)  # 1.8 MB of text, inflated
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (0, 90, 200)).save(buf, "PNG", pnginfo=info)
    with LiveServer(settings, loaded) as srv:
        sk = connect(srv.port, "127.0.0.1")
        sk.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        reply, _ = read_all(sk, 3.0)
        sk.close()
        assert status_of(reply) in (400, 431), reply[:200]  # over the 64 KB header limit, in one read or many
        with httpx.Client(base_url=srv.base, headers=HDR, timeout=30) as c:
            out = c.post(GENERAL, json=one(mixed)).json()["outputs"][0]["status"]
            assert out["code"] == sc.INPUT_INVALID_ARGUMENT and "not valid base64" in out["details"], out
            out = c.post(GENERAL, json=one(buf.getvalue())).json()["outputs"][0]["status"]
            assert out["code"] == 10000, out
