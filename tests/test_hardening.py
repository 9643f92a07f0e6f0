"""Issue 10's server items, each against a live server on 127.0.0.1 (or ::1) with real sockets and real
images: slow bodies and headers, connection and reader caps, pixel budgets and fair decoding, the
streamed Filestack cap, deep JSON, lone surrogates, disconnects, redacted logs on stderr, API-key
parsing, model errors at start and the ``[::1]`` host. Every slow client is bounded (a few sockets,
seconds) and stops by itself."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2 as sc
from live_server import ImageServer, LiveServer, free_port
from PIL import Image
from pydantic import SecretStr
from raw_http import GENERAL, chunk, connect, filestack_head, one, post_head, read_all, wait_ready

from localtag import cli
from localtag.cli.serve import check_bind
from localtag.core import decode, memory
from localtag.core.config import Settings
from localtag.core.loader import load
from localtag.core.redact import redact_text, redact_url

KEY = "hardening-key-0123"
HDR = {"Authorization": f"Key {KEY}"}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def settings(random_store, cache_dir):
    return Settings(models_dir=random_store, model="tiny-random", cache_dir=cache_dir, device="cpu",
                    api_keys=[SecretStr(KEY)], fetch_timeout=1.0, batch_size=8, workers=2)


@pytest.fixture(scope="module")
def loaded(settings):
    return load(settings)


@pytest.fixture(scope="module")
def jpegs(coco_images):
    return [p.read_bytes() for p in coco_images[:2]]


def png(side: int) -> bytes:
    """A real side×side RGB PNG (flat colour: a few KB on the wire, side² pixels to decode)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 200)).save(buf, "PNG")
    return buf.getvalue()


def jpeg(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 120, 40)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def trickler(port: int, path: str = GENERAL, length: int = 100_000, headers_only: bool = False) -> socket.socket:
    """A connection that sends headers (or only part of them) and then a body byte now and then."""
    s = connect(port)
    s.sendall(post_head(path, None, complete=False) if headers_only else post_head(path, KEY, length) + b"{")
    return s


def drip(socks: list[socket.socket], stop: threading.Event, every: float = 0.2) -> threading.Thread:
    def run():
        while not stop.wait(every):
            for s in socks:
                try:
                    s.send(b" ")
                except OSError:
                    pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def answer(s: socket.socket, wait: float) -> bytes:
    """What the server sent on ``s`` until it closed it (or ``wait`` passed)."""
    return read_all(s, wait)[0]


def metric(base: str, pattern: str) -> float:
    m = re.search(pattern, httpx.get(base + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


# -- item 1: slow bodies, slow headers, caps ------------------------------------------------------
def test_slow_bodies_do_not_starve_rest_or_grpc_and_time_out(settings, loaded, jpegs):
    s = settings.model_copy(update={"max_queue": 4, "body_timeout": 2.0, "grpc_port": 0})
    with LiveServer(s, loaded) as srv:
        socks = [trickler(srv.port) for _ in range(12)]  # 3 × max_queue bodies trickling
        stop = threading.Event()
        dripper = drip(socks, stop)
        try:
            deadline = time.monotonic() + 5
            while srv.service.reading < 12 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert srv.service.reading == 12
            r = httpx.post(srv.base + GENERAL, json=one(jpegs[0]), headers=HDR, timeout=10)
            assert r.status_code == 200 and r.json()["status"]["code"] == 10000, r.text
            channel = ClarifaiChannel.get_insecure_grpc_channel(base="127.0.0.1", port=srv.grpc_port)
            stub = service_pb2_grpc.V2Stub(channel)
            req = service_pb2.PostModelOutputsRequest(model_id="general-image-recognition", inputs=[
                resources_pb2.Input(data=resources_pb2.Data(image=resources_pb2.Image(base64=jpegs[1])))])
            g = stub.PostModelOutputs(req, metadata=(("authorization", f"Key {KEY}"),), timeout=10)
            channel.close()
            assert g.status.code == sc.SUCCESS
            ready = httpx.get(srv.base + "/readyz").json()
            assert ready["queue"] == 0 and ready["waiting"] == 0 and ready["reading"] == 12  # truthful
            assert metric(srv.base, r"^localtag_body_readers (\S+)$") == 12
            # past body_timeout every trickler is answered 408 and closed
            replies = [answer(sk, 5) for sk in socks]
        finally:
            stop.set()
            dripper.join()
            for sk in socks:
                sk.close()
        assert all(rep.startswith(b"HTTP/1.1 408") for rep in replies), replies[:2]
        assert srv.service.reading == 0
        assert metric(srv.base, r'^localtag_requests_total\{.*http_status="500"\} (\S+)$') == 0


def test_slow_headers_time_out_and_connections_are_capped(settings, loaded, jpegs):
    s = settings.model_copy(update={"header_timeout": 1.0, "max_connections": 6, "max_body_readers": 2,
                                    "body_timeout": 1.5})
    with LiveServer(s, loaded) as srv:
        slow = [trickler(srv.port, headers_only=True) for _ in range(6)]
        try:
            time.sleep(0.2)
            with httpx.Client(base_url=srv.base, headers=HDR, timeout=10) as c:
                assert c.post(GENERAL, json=one(jpegs[0])).status_code == 503  # uvicorn's connection cap
            replies = [answer(sk, 4) for sk in slow]  # the header timeout closes them
        finally:
            for sk in slow:
                sk.close()
        assert all(rep.startswith(b"HTTP/1.1 408") for rep in replies), replies[:2]
        with httpx.Client(base_url=srv.base, headers=HDR, timeout=10) as c:
            assert c.post(GENERAL, json=one(jpegs[0])).json()["status"]["code"] == 10000
            # the body-reader cap: two bodies trickling, a third body is refused at once
            bodies = [trickler(srv.port) for _ in range(2)]
            try:
                deadline = time.monotonic() + 5
                while srv.service.reading < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                r = c.post(GENERAL, json=one(jpegs[0]))
                assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["status"]["code"] == 21354
            finally:
                for sk in bodies:
                    answer(sk, 3)
                    sk.close()
            assert c.post(GENERAL, json=one(jpegs[0])).json()["status"]["code"] == 10000


# -- item 2: pixel budgets, fair decoding, draft, memory ------------------------------------------
def test_request_pixel_budget_counts_drafted_jpegs(settings, loaded):
    s = settings.model_copy(update={"max_request_pixels": 20_000_000})
    big_png, big_jpeg = png(3000), jpeg(4096)  # 9 MP each to decode; the JPEG (16.8 MP) is drafted to 512² (1/8)
    assert len(big_png) < 200_000
    seen = []
    decode.decode(big_jpeg, draft=512, on_size=lambda w, h: seen.append((w, h)))
    assert seen == [(512, 512)]
    with LiveServer(s, loaded) as srv:
        body = {"inputs": [one(big_png)["inputs"][0]] * 3 + [one(big_jpeg)["inputs"][0]] * 2}
        r = httpx.post(srv.base + GENERAL, json=body, headers=HDR, timeout=60).json()
        codes = [o["status"]["code"] for o in r["outputs"]]
        assert codes == [10000, 10000, sc.INPUT_OVER_LIMIT, 10000, 10000], codes
        assert "budget" in r["outputs"][2]["status"]["details"]
        assert srv.service.decoder.used == 0


def test_heavy_request_does_not_stall_others(settings, loaded, jpegs):
    heavy = {"inputs": [one(png(3500))["inputs"][0]] * 20}  # 20 × 12 MP of PNG to decode
    with LiveServer(settings, loaded) as srv:
        with httpx.Client(base_url=srv.base, headers=HDR, timeout=120) as c:
            c.post(GENERAL, json=one(jpegs[0]))  # warm
            done = {}

            def run_heavy():
                t = time.monotonic()
                done["codes"] = [o["status"]["code"] for o in c.post(GENERAL, json=heavy).json()["outputs"]]
                done["heavy"] = time.monotonic() - t

            th = threading.Thread(target=run_heavy)
            th.start()
            deadline = time.monotonic() + 10
            while srv.service.load < 20 and time.monotonic() < deadline:
                time.sleep(0.005)
            t = time.monotonic()
            with httpx.Client(base_url=srv.base, headers=HDR, timeout=120) as c2:
                assert c2.post(GENERAL, json=one(jpegs[1])).json()["status"]["code"] == 10000
            small = time.monotonic() - t
            th.join()
    assert done["codes"] == [10000] * 20
    assert small < done["heavy"] / 2, (small, done["heavy"])  # FIFO decoding made it wait for all 20


def test_memory_helpers():
    assert memory.rss_bytes() > 10_000_000
    if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
        memory.trim()  # callable on glibc; returns whether memory was released


# -- item 3: Filestack chunked upload ---------------------------------------------------------------
def test_filestack_chunked_multipart_stops_at_the_cap(settings, loaded):
    s = settings.model_copy(update={"max_bytes": 100_000})  # body cap: 100 KB + 1 MB of envelope
    with LiveServer(s, loaded) as srv:
        sk = connect(srv.port)
        sk.sendall(filestack_head(KEY))
        framed = chunk(b"z" * 65536)
        sent, reply = 0, b""
        sk.settimeout(0.05)
        while sent < 50_000_000:
            try:
                sk.sendall(framed)
                sent += 65536
                reply += sk.recv(4096)
                if reply:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        reply += answer(sk, 3)
        sk.close()
        assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
        assert sent < 8_000_000, sent  # stopped near the cap, not after the whole upload


# -- items 5-7: 4xx, not 500 ----------------------------------------------------------------------
def test_deep_json_and_lone_surrogates(settings, loaded, jpegs, caplog):
    caplog.set_level(logging.INFO)
    deep = b"[" * 10_000 + b"]" * 10_000
    with LiveServer(settings, loaded) as srv, httpx.Client(base_url=srv.base, headers=HDR, timeout=30) as c:
        for path in (GENERAL, "/filestack/tags"):
            r = c.post(path, content=deep, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, r.text)
        assert r.json()["code"] == 11100
        r = c.post(GENERAL, content=b'{"inputs": ' + deep + b"}", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["status"]["code"] == 11100
        assert c.post(GENERAL, json=one(jpegs[0])).status_code == 200  # same keep-alive connection
        raw = json.dumps(one(jpegs[0], id="\ud800")).encode()  # json.dumps writes it as the escape \ud800
        r = c.post(GENERAL, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["outputs"][0]["input"]["id"] == "\ud800"
        assert metric(srv.base, r'^localtag_requests_total\{.*http_status="500"\} (\S+)$') == 0
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


def test_client_disconnect_mid_body_is_not_an_error(settings, loaded, caplog):
    caplog.set_level(logging.INFO)
    with LiveServer(settings, loaded) as srv:
        for path in (GENERAL, "/filestack/tags"):
            sk = trickler(srv.port, path=path)
            sk.sendall(b" " * 1000)
            time.sleep(0.2)
            sk.close()
        deadline = time.monotonic() + 5
        while srv.service.reading and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert metric(srv.base, r'^localtag_requests_total\{.*http_status="499"\} (\S+)$') == 1
        assert metric(srv.base, r'^localtag_requests_total\{.*http_status="500"\} (\S+)$') == 0
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


# -- item 8: secrets never logged, logs on stderr ---------------------------------------------------
def test_redact():
    assert redact_url("https://u:pw@h.example:81/p?access_token=t#f") == "https://h.example:81/p"
    assert redact_url("/filestack/tags?url=http%3A//h/a%3Faccess_token%3Dt") == "/filestack/tags?…"
    text = 'HTTP Request: GET http://127.0.0.1:8055/assets/x?access_token=abc "HTTP/1.1 200 OK"'
    assert "abc" not in redact_text(text) and "http://127.0.0.1:8055/assets/x" in redact_text(text)


def test_serve_logs_go_to_stderr_without_secrets(random_store, cache_dir, jpegs, tmp_path):
    token = "sEcReT-token-4242"
    with ImageServer({"a": jpegs[0]}, token=token) as web:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "LOCALTAG_API_KEYS": json.dumps([KEY]),
               "LOCALTAG_CACHE_DIR": str(cache_dir), "LOCALTAG_DEVICE": "cpu"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "localtag", "serve", "--models-dir", str(random_store), "--model", "tiny-random",
             "--port", str(port), "--allow-host", web.host], env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            base = f"http://127.0.0.1:{port}"
            assert wait_ready(base, proc, 120), "serve did not start"
            url = f"{web.base}/assets/a?access_token={token}"
            body = {"inputs": [{"data": {"image": {"url": url}}},
                               {"data": {"image": {"url": f"http://user:{token}@{web.host}/assets/a?access_token=x"}}}]}
            r = httpx.post(base + GENERAL, json=body, headers=HDR, timeout=30)
            assert r.json()["outputs"][0]["status"]["code"] == 10000
            r = httpx.get(base + "/filestack/tags", params={"url": url}, headers=HDR, timeout=30)
            assert r.status_code == 200
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    err_text = err.decode()
    assert out == b""
    assert "/filestack/tags" in err_text and "200" in err_text  # the access log is there, on stderr
    assert token not in err_text


# -- item 9: API keys from the environment ---------------------------------------------------------
@pytest.mark.parametrize("value, says", [
    ('"my-key-1234"', "JSON list"), ("my-key-1234", "JSON list"), ('["", "  "]', "empty"),
    ('["my-key-1234", 5]', "not a string")])
def test_api_keys_env_errors(monkeypatch, random_store, caplog, value, says):
    monkeypatch.setenv("LOCALTAG_API_KEYS", value)
    with pytest.raises(ValueError) as e:
        Settings()
    assert says in str(e.value) and "my-key-1234" not in str(e.value)
    caplog.set_level(logging.INFO)
    assert cli.main(["serve", "--models-dir", str(random_store), "--model", "tiny-random"]) == 2
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert says in logged and "my-key-1234" not in logged


# -- item 18: a bad model at start ------------------------------------------------------------------
def test_serve_with_a_missing_or_corrupt_model_exits_2(random_store, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("LOCALTAG_API_KEYS", raising=False)
    store = tmp_path / "store"
    shutil.copytree(random_store, store)
    weights = next((store / "tiny-random").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    caplog.set_level(logging.INFO)
    for model in ("no-such-model", "tiny-random"):
        caplog.clear()
        argv = ["serve", "--models-dir", str(store), "--model", model, "--cache-dir", str(tmp_path / "c")]
        assert cli.main(argv) == 2
        errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is None and "\n" not in errors[0].getMessage()


# -- item 19: --host [::1] ----------------------------------------------------------------------------
def test_bracketed_ipv6_loopback_host_serves(settings, loaded):
    s = settings.model_copy(update={"host": "[::1]"})
    s = Settings(**{**s.model_dump(), "host": "[::1]"})
    assert s.host == "::1"
    check_bind(s.model_copy(update={"api_keys": []}))
    with LiveServer(s, loaded) as srv:
        assert srv.base.startswith("http://[::1]:")
        assert httpx.get(srv.base + "/healthz").json() == {"status": "ok"}
