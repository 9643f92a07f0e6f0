"""uvicorn as ``localtag serve`` runs it: connection limits, a header timeout, logs on stderr, redacted.

:func:`uvicorn_config` is the one builder, used by ``serve`` and by the tests' live server:

- ``max_connections`` → uvicorn's ``limit_concurrency`` (past it, 503), ``keep_alive_timeout`` →
  ``timeout_keep_alive``, ``max_header_bytes`` → ``h11_max_incomplete_event_size``;
- ``header_timeout``: uvicorn has none, so :class:`GuardedH11` closes a connection (408) whose
  request headers have not arrived in full that long after it opened or after its last response;
- the body timeout and the body-reader cap are the app's (:func:`localtag.serve.server.read_body`);
- :func:`log_config`: every log line (uvicorn's access log included) goes to **stderr** through
  :class:`localtag.core.redact.RedactFilter`, and httpx's per-request INFO lines are off.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..core.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

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

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the body timeout is the app's
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # waiting for the next request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol(header_timeout: float) -> type[GuardedH11]:
    return type("GuardedH11", (GuardedH11,), {"header_timeout": header_timeout})


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
        http=protocol(settings.header_timeout), lifespan="on", server_header=False,
        log_level=log_level.lower(), log_config=log_config(log_level) if logs is True else logs,
        limit_concurrency=settings.max_connections, timeout_keep_alive=max(1, int(settings.keep_alive_timeout)),
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
