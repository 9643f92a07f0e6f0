"""Why one input failed: :class:`ImageError` and its kinds (a leaf module: everything may import it)."""

from __future__ import annotations

NOT_IMAGE = "not_image"
CORRUPT = "corrupt"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_MANY_BYTES = "too_many_bytes"
FETCH_FAILED = "fetch_failed"
URL_REFUSED = "url_refused"
NOT_FOUND = "not_found"
#: not the input's fault: a bug or a broken environment (logged with its traceback, never called bad input)
INTERNAL = "internal"


class ImageError(Exception):
    """One input failed. ``kind`` is one of the module constants; the message is for people."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message
