"""API keys: where they come from (``LOCALTAG_API_KEYS``, ``--api-keys-file``) and how a request names one."""

from __future__ import annotations

from ..core.config import Settings


def load_keys(settings: Settings) -> list[bytes]:
    keys = [k.get_secret_value().strip() for k in settings.api_keys]
    if settings.api_keys_file is not None:
        lines = settings.api_keys_file.read_text().splitlines()
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not from_file:
            raise ValueError(f"{settings.api_keys_file}: no API keys in the file")
        keys += from_file
    return [k.encode() for k in keys if k]


def parse_authorization(header: str | None) -> str | None:
    """The token of ``Key <token>`` or ``Bearer <token>`` (scheme in any case), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() not in ("key", "bearer") or not token or " " in token:
        return None
    return token
