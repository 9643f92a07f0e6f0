"""uvicorn as ``localtag serve`` runs it: connection limits and deadlines, logs on stderr, redacted.

:func:`uvicorn_config` is the one builder, used by ``serve`` and by the tests' live server:

- ``keep_alive_timeout`` → ``timeout_keep_alive`` (the idle deadline), ``max_header_bytes`` →
  ``h11_max_incomplete_event_size`` (the app checks complete headers too: 431);
- :class:`GuardedH11` (uvicorn's h11 protocol) adds what uvicorn lacks:

  - caps on open connections, overall (``max_connections``) and per client address
    (``max_client_connections``): a connection past either is answered 503 with Clarifai's 21354 and
    ``Retry-After``, then closed;
  - a header deadline (``header_timeout``, 408), a body deadline (the app's ``body_timeout`` answers
    408 first; a body nobody reads is cut off a little later) and a total one (``connection_max_age``:
    closed after its current answer);
  - a request answered before its body arrived (a 401, ``/healthz`` with a body) reads no more of it:
    the answer is followed by the end of the stream, body bytes are discarded for at most
    :data:`LINGER` seconds, then the connection is closed;
- the body-reader caps, the minimum upload rate and the byte budgets are the app's
  (:func:`localtag.serve.server.read_body`);
- :func:`log_config`: every log line (uvicorn's access log included) goes to **stderr** through
  :class:`localtag.core.redact.RedactFilter`, httpx's per-request INFO lines are off, and repeated resource
  errors are logged once per interval with a count (:mod:`localtag.serve.logthrottle`).
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
import uvicorn
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..core import clarifai
from ..core.config import Settings
from .budgets import Full, Slots

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: seconds an answered request may go on sending its body (discarded) before its connection is closed
LINGER = 2.0
#: bytes discarded while lingering before the connection is closed at once
LINGER_BYTES = 1_000_000
#: a body nobody reads is cut off this long after the app's body timeout
BODY_GRACE = 2.0

log = logging.getLogger(__name__)


def refusal(e: Full) -> bytes:
    """A whole HTTP/1.1 503 answer, Clarifai-shaped (21354, ``Retry-After``), for a refused connection."""
    body = json.dumps(clarifai.error_response(clarifai.MODEL_BUSY, str(e),
                                              description="Model is busy, please retry")).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with connection caps and header, body, linger and total deadlines."""

    header_timeout = 10.0
    body_timeout = 30.0 + BODY_GRACE
    max_age = 600.0
    gate = Slots("connections", None)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._age_timer: asyncio.TimerHandle | None = None
        self._linger: int | None = None  # body bytes discarded after the answer; None: not lingering
        self._refused: Full | None = None
        self._gated = False
        super().connection_made(transport)
        self._ip = self.client[0] if self.client else ""
        try:
            self.gate.take(self._ip)
        except Full as e:
            self._refused = e
            log.warning("refused: connection from %s: %s", self._ip, e)
            self._header_timer = self.loop.call_later(1.0, self._refuse)  # answered on its first bytes
            return
        self._gated = True
        self._age_timer = self.loop.call_later(self.max_age, self._too_old)
        self._arm()

    def _refuse(self) -> None:
        if not self.transport.is_closing() and self._refused is not None:
            self.transport.write(refusal(self._refused))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return self._refuse()
        if self._linger is not None:
            self._linger += len(data)
            if self._linger > LINGER_BYTES:
                self.transport.close()
            return
        super().data_received(data)

    # deadlines
    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        self.transport.close()

    def _body_late(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
            self.transport.close()  # the app sees a disconnect

    def _too_old(self) -> None:
        self._age_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # closed after this answer
        else:
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not cycle:  # a new request: see _early_answer
            self.cycle.send = self._early_answer(self.cycle)
        state = self.conn.their_state
        if state is not h11.IDLE:  # the headers are in
            self._disarm()
        if state is h11.SEND_BODY:
            if self._body_timer is None and self._linger is None:
                self._body_timer = self.loop.call_later(self.body_timeout, self._body_late)
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _early_answer(self, cycle):
        """The cycle's ``send``, wrapped: an answer that starts before the request's body is in says
        ``connection: close`` (so no client reuses a connection that reads no more), and the close that
        follows it lingers (see :meth:`_start_linger`) instead of resetting the connection under the
        answer while body bytes are still arriving."""
        send = cycle.send

        async def wrapped(message):
            if message["type"] == "http.response.start" and self.conn.their_state is h11.SEND_BODY:
                message = {**message, "headers": [*message.get("headers", []), CLOSE_HEADER]}
                cycle.keep_alive = False
                cycle.transport = _Lingering(self)
            await send(message)

        return wrapped

    def _start_linger(self) -> None:
        """Read no more of the body: discard what still comes for at most LINGER seconds (or
        LINGER_BYTES), after sending the end of the stream, then close."""
        if self._linger is not None or self.transport.is_closing():
            return
        self._linger = 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        try:
            self.transport.write_eof()  # the client reads the answer, then the end of the stream
        except (NotImplementedError, OSError, RuntimeError):
            pass
        self.loop.call_later(LINGER, self.transport.close)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:  # answered before its body came: read no more of it
            self._start_linger()
        elif self.conn.their_state is h11.IDLE:
            self._arm()  # waiting for the next request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        for timer in (self._body_timer, self._age_timer):
            if timer is not None:
                timer.cancel()
        self._body_timer = self._age_timer = None
        if self._gated:
            self._gated = False
            self.gate.give(self._ip)
        super().connection_lost(exc)


class _Lingering:
    """The transport as an early answer's cycle sees it: closing it starts the protocol's linger."""

    def __init__(self, protocol: GuardedH11):
        self._protocol = protocol

    def __getattr__(self, name: str):
        return getattr(self._protocol.transport, name)

    def close(self) -> None:
        self._protocol._start_linger()


def protocol(settings: Settings) -> type[GuardedH11]:
    """A :class:`GuardedH11` with ``settings``' deadlines and its own connection gate (one per server)."""
    return type("GuardedH11", (GuardedH11,), {
        "header_timeout": settings.header_timeout,
        "body_timeout": settings.body_timeout + BODY_GRACE,
        "max_age": settings.connection_max_age,
        "gate": Slots("connections", settings.max_connections, settings.max_client_connections),
    })


def log_config(level: str = "INFO") -> dict:
    """``logging.config.dictConfig`` for the server: one redacting stderr handler for everything."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": "localtag.core.redact.RedactFilter"}},
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "plain", "filters": ["redact"]}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["stderr"], "level": level, "propagate": False},
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
        "root": {"handlers": ["stderr"], "level": level},
    }


def uvicorn_config(app, settings: Settings, *, host: str | None = None, port: int | None = None,
                   log_level: str = "info", logs: dict | None | bool = True) -> uvicorn.Config:
    """The uvicorn config of ``settings`` (``logs``: True for :func:`log_config`, None to leave logging be)."""
    return uvicorn.Config(
        app, host=host or settings.host, port=settings.port if port is None else port,
        loop="asyncio",  # the gRPC server shares the loop, and grpc.aio does not support uvloop
        http=protocol(settings), lifespan="on", server_header=False,
        log_level=log_level.lower(), log_config=log_config(log_level) if logs is True else logs,
        timeout_keep_alive=max(1, int(settings.keep_alive_timeout)),
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
