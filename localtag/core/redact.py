"""Redaction of URLs for messages and logs (a leaf module): the one place secrets are taken out.

:func:`redact_url` keeps scheme, host, port and path of a URL and drops credentials, query and
fragment (``?access_token=…``); a bare path keeps its path and shows ``?…`` for a dropped query.
:func:`redact_text` does the same to every URL in free text, and :class:`RedactFilter` applies it to
every log record (uvicorn's access log, httpx, localtag's own), so no token reaches a log.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_SECRET_PARAM = re.compile(r"((?:access_token|token|key|secret|password|api_key)=)[^&\s\"']+", re.I)


def redact_url(url: object) -> str:
    """A URL (or a path with a query) fit for messages: no credentials, query or fragment."""
    text = str(url)
    if "://" not in text:  # a request target such as /filestack/tags?url=…
        path, sep, _ = text.partition("?")
        return path + ("?…" if sep else "")
    try:
        u = urlsplit(text)
        host = u.hostname or ""
        port = f":{u.port}" if u.port else ""
    except ValueError:
        return "<invalid URL>"
    host = f"[{host}]" if ":" in host else host
    return f"{u.scheme}://{host}{port}{u.path}"


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted, and any leftover ``access_token=…``-style value masked."""
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return _SECRET_PARAM.sub(r"\1…", text)


class RedactFilter(logging.Filter):
    """A handler filter: the record's message with URLs redacted (uvicorn's access log included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) >= 3:
            args = list(record.args)
            args[2] = redact_url(args[2])  # (client, method, full_path, http_version, status)
            record.args = tuple(args)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logged as it is
            return True
        clean = redact_text(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True
