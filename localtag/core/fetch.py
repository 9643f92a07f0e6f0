"""The guarded URL fetcher: image URLs given by callers are fetched on their behalf, so they are checked.

- Only ``http`` and ``https``. Every hop (the first URL and each redirect) is resolved once; every
  resolved address must be public, and the connection goes to that exact address (the ``Host``
  header and TLS SNI carry the name), so a second DNS answer cannot swap in another address
  (no DNS-rebinding gap).
- Refused: loopback, private, link-local (cloud metadata at 169.254.169.254 included), shared
  (100.64/10), multicast, reserved and unspecified addresses, IPv4-mapped forms of them, and
  anything else that is not globally routable.
- ``allow_hosts`` names hosts that may be reached although they are local, e.g. a Directus on
  ``127.0.0.1:8055``: entries are ``host`` (any port) or ``host:port``.
- Redirects are followed by hand, at most ``max_redirects``; connect and read timeouts, and an overall
  deadline of three times the timeout; the body is streamed with a byte cap.
- ``Content-Encoding``: the raw bytes are read (httpx's own decoding is never used: it inflates a
  whole chunk at a time, on the event loop, before any cap). ``identity`` or none is the body itself;
  one ``gzip`` or ``deflate`` layer is inflated off the event loop with an output limit of
  ``max_bytes``; anything else (two layers, ``br``, ``zstd``) is refused. The byte cap applies to what
  is decoded, not to what is on the wire (a compression bomb is stopped at ``max_bytes``).
- Query strings (``?access_token=…``) are sent but never written into error messages.
"""

from __future__ import annotations

import asyncio
import socket
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from .addresses import IPAddress, is_public, parse_ip
from .errors import FETCH_FAILED, NOT_FOUND, TOO_MANY_BYTES, URL_REFUSED, ImageError
from .limits import TooLarge, read_capped_async
from .redact import redact_url

REDIRECTS = {301, 302, 303, 307, 308}
#: the one layer of ``Content-Encoding`` inflated (zlib's window bits: gzip, zlib-wrapped deflate)
INFLATE = {"gzip": 31, "x-gzip": 31, "deflate": 15}
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int = 20_000_000
    timeout: float = 10.0
    max_redirects: int = 5
    allow_hosts: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings) -> FetchPolicy:
        return cls(max_bytes=settings.max_bytes, timeout=settings.fetch_timeout,
                   max_redirects=settings.max_redirects, allow_hosts=tuple(settings.allow_hosts))


def redact(url: httpx.URL | str) -> str:
    """A URL fit for messages: scheme, host, port and path; no credentials, query or fragment."""
    return redact_url(url)


def host_allowed(host: str, port: int, allow_hosts: Iterable[str]) -> bool:
    host = host.lower().strip("[]")
    for entry in allow_hosts:
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry.startswith("["):  # [v6]:port or [v6]
            name, _, rest = entry[1:].partition("]")
            entry_port = rest[1:] if rest.startswith(":") else ""
        elif entry.count(":") == 1:
            name, entry_port = entry.split(":")
        else:
            name, entry_port = entry, ""
        if name == host and (not entry_port or entry_port == str(port)):
            return True
    return False


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    literal = parse_ip(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise ImageError(FETCH_FAILED, f"cannot resolve host {host!r}: {e}") from None
    out: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = parse_ip(sockaddr[0])
        if ip is not None and ip not in out:
            out.append(ip)
    if not out:
        raise ImageError(FETCH_FAILED, f"host {host!r} has no address")
    return out


async def pin(url: httpx.URL, policy: FetchPolicy) -> tuple[httpx.URL, dict[str, str], dict]:
    """Check one hop; return the URL to connect to (the checked IP), its headers and extensions."""
    if url.scheme not in DEFAULT_PORTS:
        raise ImageError(URL_REFUSED, f"only http and https URLs are fetched, not {url.scheme or 'no scheme'!r}")
    host = url.host
    if not host:
        raise ImageError(URL_REFUSED, "the URL has no host")
    port = url.port or DEFAULT_PORTS[url.scheme]
    addresses = await resolve(host, port)
    if not host_allowed(host, port, policy.allow_hosts):
        bad = [ip for ip in addresses if not is_public(ip)]
        if bad:
            via = "" if str(bad[0]) == host.strip("[]") else f" ({host} resolves to it)"
            raise ImageError(URL_REFUSED, f"{redact(url)}: refused, {bad[0]} is not a public address{via}")
    ip = addresses[0]
    target = url.copy_with(host=str(ip))  # connect to the address just checked, never re-resolve
    host_header = f"[{host}]" if ":" in host else host
    if url.port and url.port != DEFAULT_PORTS[url.scheme]:
        host_header += f":{url.port}"
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return target, {"Host": host_header}, extensions


async def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The bytes behind ``url``, or an :class:`ImageError` (URL_REFUSED, NOT_FOUND, FETCH_FAILED, TOO_MANY_BYTES)."""
    try:
        parsed = httpx.URL(url)
    except Exception as e:  # noqa: BLE001 - httpx raises several types for garbage
        raise ImageError(URL_REFUSED, f"invalid URL: {e}") from None
    try:
        return await asyncio.wait_for(_follow(parsed, policy), policy.timeout * 3)
    except asyncio.TimeoutError:
        raise ImageError(FETCH_FAILED, f"{redact(parsed)}: timed out after {policy.timeout * 3:g} s") from None


async def _follow(current: httpx.URL, policy: FetchPolicy) -> bytes:
    timeout = httpx.Timeout(policy.timeout, pool=policy.timeout)
    # trust_env=False: an environment proxy would reconnect by name and undo the address check
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                                 headers={"User-Agent": "localtag", "Accept-Encoding": "identity"}) as client:
        for _hop in range(policy.max_redirects + 1):
            target, headers, extensions = await pin(current, policy)
            request = client.build_request("GET", target, headers=headers, extensions=extensions)
            try:
                response = await client.send(request, stream=True)
            except httpx.TimeoutException:
                raise ImageError(FETCH_FAILED, f"{redact(current)}: timed out") from None
            except httpx.HTTPError as e:
                raise ImageError(FETCH_FAILED, f"{redact(current)}: {type(e).__name__}: {e}") from None
            try:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    try:
                        current = current.join(response.headers["location"])
                    except Exception:  # noqa: BLE001
                        raise ImageError(FETCH_FAILED, f"{redact(current)}: invalid redirect") from None
                    continue
                return await _read(response, current, policy.max_bytes)
            except httpx.TimeoutException:
                raise ImageError(FETCH_FAILED, f"{redact(current)}: timed out") from None
            except httpx.HTTPError as e:
                raise ImageError(FETCH_FAILED, f"{redact(current)}: {type(e).__name__}: {e}") from None
            finally:
                await response.aclose()
        raise ImageError(FETCH_FAILED, f"{redact(current)}: more than {policy.max_redirects} redirects")


async def _read(response: httpx.Response, url: httpx.URL, max_bytes: int) -> bytes:
    if response.status_code in (404, 410):
        raise ImageError(NOT_FOUND, f"{redact(url)}: HTTP {response.status_code}")
    if response.status_code >= 400 or response.status_code < 200:
        raise ImageError(FETCH_FAILED, f"{redact(url)}: HTTP {response.status_code}")
    codings = [c.strip().lower() for c in response.headers.get("content-encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if len(codings) > 1 or (codings and codings[0] not in INFLATE):
        raise ImageError(FETCH_FAILED, f"{redact(url)}: Content-Encoding {', '.join(codings)!r} is not accepted "
                                       "(one gzip or deflate layer at most)")
    try:
        raw = await read_capped_async(response.aiter_raw(), max_bytes, response.headers.get("content-length"))
        if not codings:
            return raw
        return await asyncio.to_thread(inflate, raw, codings[0], max_bytes)
    except TooLarge as e:
        raise ImageError(TOO_MANY_BYTES, f"{redact(url)}: {e}") from None
    except zlib.error as e:
        raise ImageError(FETCH_FAILED, f"{redact(url)}: bad {codings[0]} data: {e}") from None


def inflate(raw: bytes, coding: str, max_bytes: int) -> bytes:
    """One layer of gzip or deflate, at most ``max_bytes`` out; raises :class:`TooLarge` past it."""
    wbits = INFLATE[coding]
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(raw, max_bytes + 1)
    except zlib.error:
        if coding != "deflate":
            raise
        d = zlib.decompressobj(-15)  # raw deflate, as some servers send it
        out = d.decompress(raw, max_bytes + 1)
    if len(out) > max_bytes or d.unconsumed_tail:
        raise TooLarge(max_bytes)
    return out


