"""The guarded URL fetcher against real local HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from urllib.parse import quote

import pytest
from live_server import ImageServer

from localtag.core import errors
from localtag.core.addresses import is_public
from localtag.core.errors import ImageError
from localtag.core.fetch import FetchPolicy, fetch, host_allowed, redact

JPEG = b"\xff\xd8\xff\xe0" + b"jpeg-ish payload" * 10


@pytest.fixture(scope="module")
def web():
    with ImageServer({"a.jpg": JPEG}) as server:
        yield server


def run(url: str, **kw) -> bytes:
    return asyncio.run(fetch(url, FetchPolicy(**{"timeout": 1.0, "max_redirects": 3, **kw})))


def refused(url: str, **kw) -> ImageError:
    with pytest.raises(ImageError) as e:
        run(url, **kw)
    return e.value


def test_allow_listed_local_host_is_fetched(web):
    assert run(f"{web.base}/img/a.jpg", allow_hosts=(web.host,)) == JPEG
    # the connection went to the checked IP, with the name in the Host header
    assert web.seen[-1] == ("/img/a.jpg", web.host)


def test_allow_list_by_host_without_port_and_by_name(web):
    assert run(f"{web.base}/img/a.jpg", allow_hosts=("127.0.0.1",)) == JPEG
    assert run(f"http://localhost:{web.port}/img/a.jpg", allow_hosts=(f"localhost:{web.port}",)) == JPEG
    assert web.seen[-1] == ("/img/a.jpg", f"localhost:{web.port}")
    assert not host_allowed("127.0.0.1", web.port + 1, [web.host])


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/img/a.jpg",
    "http://localhost:{port}/img/a.jpg",
    "http://[::1]:{port}/img/a.jpg",
    "http://2130706433:{port}/img/a.jpg",  # 127.0.0.1 as one decimal number
    "http://0.0.0.0:{port}/img/a.jpg",
    "http://[::ffff:127.0.0.1]:{port}/img/a.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/x.jpg",
    "http://192.168.1.1/x.jpg",
    "http://172.16.0.1/x.jpg",
    "http://100.100.100.200/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://224.0.0.1/x.jpg",
])
def test_non_public_addresses_are_refused_before_connecting(web, url):
    start = time.monotonic()
    err = refused(url.format(port=web.port), allow_hosts=("example.invalid",))
    assert err.kind == errors.URL_REFUSED
    assert "not a public address" in err.message
    assert time.monotonic() - start < 0.5  # refused from the address, no connection attempt


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "gopher://x/", "not a url",
                                 "http:///nohost"])
def test_only_http_urls(url):
    assert refused(url).kind == errors.URL_REFUSED


@pytest.mark.parametrize("target", ["http://127.0.0.1:{other}/img/a.jpg", "http://169.254.169.254/latest/meta-data/",
                                    "http://10.0.0.1/x.jpg"])
def test_redirect_to_a_refused_address_is_refused(web, target):
    # the first hop is allowed (the local image server); the redirect target is checked again
    url = f"{web.base}/redirect?to=" + target.format(other=web.port + 1)
    err = refused(url, allow_hosts=(web.host,))
    assert err.kind == errors.URL_REFUSED


def test_redirects_are_followed_and_bounded(web):
    assert run(f"{web.base}/redirect?to=/img/a.jpg", allow_hosts=(web.host,)) == JPEG
    chain = f"{web.base}/img/a.jpg"
    for _ in range(3):  # exactly max_redirects hops
        chain = f"{web.base}/redirect?to={quote(chain, safe='')}"
    assert run(chain, allow_hosts=(web.host,), max_redirects=3) == JPEG
    err = refused(chain, allow_hosts=(web.host,), max_redirects=2)
    assert err.kind == errors.FETCH_FAILED and "redirects" in err.message
    err = refused(f"{web.base}/loop", allow_hosts=(web.host,))
    assert err.kind == errors.FETCH_FAILED and "redirects" in err.message


def test_404_500_and_token(web):
    assert refused(f"{web.base}/nothing", allow_hosts=(web.host,)).kind == errors.NOT_FOUND
    assert refused(f"{web.base}/error", allow_hosts=(web.host,)).kind == errors.FETCH_FAILED
    # Directus-style ?access_token=: works when right; the token never appears in an error message
    assert run(f"{web.base}/assets/a.jpg?access_token={web.token}", allow_hosts=(web.host,)) == JPEG
    err = refused(f"{web.base}/assets/a.jpg?access_token=wrong-secret", allow_hosts=(web.host,))
    assert err.kind == errors.FETCH_FAILED and "403" in err.message and "wrong-secret" not in err.message
    assert redact("https://u:pw@h.example:81/p?access_token=t#f") == "https://h.example:81/p"


def test_stall_and_slow_drip_time_out(web):
    start = time.monotonic()
    err = refused(f"{web.base}/stall", allow_hosts=(web.host,), timeout=0.5)
    assert err.kind == errors.FETCH_FAILED and "timed out" in err.message
    assert time.monotonic() - start < 2
    start = time.monotonic()
    err = refused(f"{web.base}/drip", allow_hosts=(web.host,), timeout=0.5)  # never idle 0.5 s, never done
    assert err.kind == errors.FETCH_FAILED and "timed out" in err.message
    assert time.monotonic() - start < 3


def test_byte_cap(web):
    err = refused(f"{web.base}/huge", allow_hosts=(web.host,))
    assert err.kind == errors.TOO_MANY_BYTES
    err = refused(f"{web.base}/chunked", allow_hosts=(web.host,), max_bytes=1_000_000)
    assert err.kind == errors.TOO_MANY_BYTES
    assert len(run(f"{web.base}/chunked", allow_hosts=(web.host,), max_bytes=5_000_000)) == 64 * 65536


def test_no_dns_rebinding_gap(web, monkeypatch):
    """A name that answers a public address first and a loopback one later: the checked address is used."""
    real = socket.getaddrinfo
    calls = []

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.example":
            calls.append(host)
            ip = PUBLIC if len(calls) == 1 else "127.0.0.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    err = refused(f"http://rebind.example:{web.port}/img/a.jpg", timeout=0.3)
    # had the client resolved the name again it would have reached the local server and succeeded
    assert err.kind == errors.FETCH_FAILED
    assert calls == ["rebind.example"]
    assert ("/img/a.jpg", f"rebind.example:{web.port}") not in web.seen


PUBLIC = "8.8.8.8"  # a public address; nothing answers it here, so the pinned connection fails


def test_is_public():
    for ip in ("8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"):
        assert is_public(ipaddress.ip_address(ip))
    for ip in ("127.0.0.1", "10.1.2.3", "172.31.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
               "224.0.0.251", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
               "::ffff:10.0.0.1", "2002:7f00:1::1", "192.0.2.1"):
        assert not is_public(ipaddress.ip_address(ip)), ip
